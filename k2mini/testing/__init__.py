"""Build K2-format checkpoints of any size for tests and benchmarks (no downloads)."""

from k2mini.testing.fixtures import PRESETS, FixtureSpec, build_fixture

__all__ = ["PRESETS", "FixtureSpec", "build_fixture"]
