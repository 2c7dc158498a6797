"""Named presets (configs/presets/*.json): a ratio and the strategies we recommend for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from k2mini.errors import UsageError
from k2mini.resources import config_dir

PRESET_DIR = config_dir("presets")


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    layers: int | None = None
    experts: int | None = None
    top_k: int | None = None
    layer_strategy: str | None = None
    expert_strategy: str | None = None
    dtype: str | None = None
    groups: Literal["auto", "keep", "flatten"] | None = None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> Preset:
    """A preset by name (``k2-mini``) or by path to a JSON file."""
    path = Path(name)
    if not path.is_file():
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise UsageError(f"--preset {name}: no such preset (known: {', '.join(preset_names()) or 'none'}) and no such file")
    try:
        return Preset.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        msg = " ".join(str(exc).split())[:300]
        raise UsageError(f"--preset {name}: {path} is not a valid preset ({msg})") from None
