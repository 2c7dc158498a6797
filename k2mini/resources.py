"""Data files the code reads at run time (GPU profiles, presets).

configs/ at the repository top is the only copy; k2mini/configs is a symlink to it, so an
editable install reads it in place, and a wheel, whose build copies what the link points
at into k2mini/configs (pyproject package-data), reads the same relative path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_dir(kind: str) -> Path:
    """k2mini/configs/<kind> of the imported package (always a directory on disk: we never
    run from a zip)."""
    return Path(str(files("k2mini") / "configs" / kind))
