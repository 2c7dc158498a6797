"""k2mini validate: static checks, memory plan, run checks and comparison with the source."""
