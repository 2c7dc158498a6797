"""A nano Kimi-K2 trained on CPU in minutes, so that quality studies rank selection
strategies on a model that learned something (random weights cannot)."""
