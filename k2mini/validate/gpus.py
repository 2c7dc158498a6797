"""GPU profiles (configs/gpus/*.json): how much memory a target device offers.

Profiles are data so users can add their own; each file is validated on load (unknown
fields, non-positive sizes and a name that differs from the file name are refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from k2mini.errors import UsageError
from k2mini.resources import config_dir

PROFILE_DIR = config_dir("gpus")
MIB = 1 << 20


class GpuProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9\-]*$")
    description: str
    kind: Literal["cuda", "cpu"]
    # None: the host's RAM, read when the plan is made (the cpu profile).
    memory_mib: int | None = Field(default=None, gt=0)
    # CUDA context, cuBLAS workspaces and allocator slack that no tensor can use.
    reserved_mib: int = Field(ge=0)
    fp8_native: bool
    bf16: bool

    @model_validator(mode="after")
    def _sizes(self) -> GpuProfile:
        if self.kind == "cuda" and self.memory_mib is None:
            raise ValueError("a cuda profile needs memory_mib")
        if self.memory_mib is not None and self.reserved_mib >= self.memory_mib:
            raise ValueError("reserved_mib must be below memory_mib")
        return self

    @property
    def memory_bytes(self) -> int:
        if self.memory_mib is not None:
            return self.memory_mib * MIB
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_mib * MIB


def available_profiles(directory: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.json"))


def load_profile(name: str, directory: Path = PROFILE_DIR) -> GpuProfile:
    """The profile ``name`` (a file stem in ``directory``), or a JSON file path."""
    path = Path(name) if name.endswith(".json") else directory / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"--gpu {name}: no such profile (available: {', '.join(available_profiles(directory))})")
    try:
        profile = GpuProfile.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        why = f"{'.'.join(map(str, first['loc'])) or 'profile'}: {first['msg']}" if first else str(exc)
        raise UsageError(f"{path}: invalid GPU profile ({why})") from None
    if not name.endswith(".json") and profile.name != path.stem:
        raise UsageError(f"{path}: profile name {profile.name!r} differs from the file name")
    return profile
