"""Which torch device a command computes on, from its ``--device`` flag."""

from __future__ import annotations

import os

import torch

from k2mini.errors import UsageError


def resolve_device(spec: str | torch.device | None, *, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when present; under torchrun the rank's local GPU), ``cpu``, ``cuda``, ``cuda:N``."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"{flag} {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {spec!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: this torch has no CUDA device (torch {torch.__version__}); use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev
