"""heal's training checkpoint: the trainable weights (and correction biases) plus the optimizer
state through torch.distributed.checkpoint (DCP), and a small JSON pointer with the step,
the schedule and the log.

DCP writes each rank's shards in parallel and records every tensor's global shape, so a run
saved on N ranks (FSDP2 shards or DDP replicas) loads on M, with or without FSDP: the names
are the unwrapped student's, which neither FSDP2 nor DDP changes. Each save goes into a new
directory; the pointer ``train_state.json`` is replaced atomically only once that directory is
complete, so a run killed at any point resumes from the last complete save, and older
directories are removed after the pointer moves.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

POINTER = "train_state.json"
_PREFIX = "train_state-"


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights are the reduced checkpoint's own: a resume reads them from there again.
    return StateDictOptions(ignore_frozen_params=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(work: Path, student: torch.nn.Module, optimizer, scheduler, step: int, log: list[dict], run: dict[str, Any]) -> None:
    """Every rank calls this; rank 0 moves the pointer once all ranks' shards are written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(student, optimizer, options=_options())
    name = f"{_PREFIX}{step:09d}"
    target = work / name
    if _main():
        shutil.rmtree(target, ignore_errors=True)  # a save of the same step a killed run left half-written
    _barrier()
    with warnings.catch_warnings():  # DCP warns on every single-process save that it is one
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=target, no_dist=not dist.is_initialized())
    _barrier()
    if _main():
        tmp = work / (POINTER + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"dir": name, "step": step, "run": run, "scheduler": scheduler.state_dict(), "log": log}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, work / POINTER)
        for old in work.glob(_PREFIX + "*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load(work: Path, student: torch.nn.Module, optimizer, scheduler, run: dict[str, Any]) -> dict[str, Any] | None:
    """Restore the last complete save into ``student``/``optimizer``/``scheduler`` (resharded to
    this run's ranks); returns the pointer (step, log) or None when there is none. ``run``: the
    options that decide what is trained and in which order; a save made with others is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    pointer = work / POINTER
    if not pointer.is_file():
        return None
    meta = json.loads(pointer.read_text())
    differ = {k: v for k, v in meta.get("run", {}).items() if run.get(k) != v}
    if differ:
        from k2mini.errors import UsageError

        was = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in differ.items())
        raise UsageError(f"--resume: the training checkpoint in {work} was made with {was}; give the same options, or start over "
                         "with --overwrite")
    model_sd, optim_sd = get_state_dict(student, optimizer, options=_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=work / meta["dir"], no_dist=not dist.is_initialized())
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_options())
    scheduler.load_state_dict(meta["scheduler"])
    return meta


def remove(work: Path) -> None:
    """Drop the training checkpoint once the healed model is written."""
    (work / POINTER).unlink(missing_ok=True)
    for d in work.glob(_PREFIX + "*"):
        shutil.rmtree(d, ignore_errors=True)
