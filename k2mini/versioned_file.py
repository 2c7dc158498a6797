"""Read a JSON artefact a user hands back to us (plan.json, analysis.json), versioned and typed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from k2mini.errors import UsageError

M = TypeVar("M", bound=BaseModel)


def load_versioned(cls: type[M], path: str | Path, *, flag: str, version: int, what: str) -> M:
    """Parse ``path`` into ``cls``; any problem is one UsageError line naming ``flag`` and the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != version:
        v = data.get("version") if isinstance(data, dict) else None
        raise UsageError(f"{flag} {path}: version {v} is not supported (expected {version})")
    try:
        return cls.model_validate(data)
    except ValueError as exc:
        first = str(exc).splitlines()
        raise UsageError(f"{flag} {path}: does not match the {what} schema ({' '.join(first[:3])})") from None
