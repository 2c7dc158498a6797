"""Fault injection for the robustness tests: run a k2mini command and, at the Nth write
event, die by SIGKILL, fail with ENOSPC, or raise MemoryError.

A write event is any point where a command commits bytes: opening a file for writing,
writing one tensor into a shard, fsync, rename/replace. Counting these (mode ``count``)
gives the number of distinct points at which a run can be interrupted; the tests then
strike at several of them. Nothing here is imported by the tool itself: the hooks are
installed only in a process started through this module.

    python -m k2mini.testing.faults kill@7 convert --source SRC ... -o OUT
    python -m k2mini.testing.faults count:/tmp/n.txt analyze --source SRC ...
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import sys
import time
from collections.abc import Callable

_WRITE_MODES = set("wax+")


class _Injector:
    """``kill@N``, ``enospc@N``, ``memory@N``, ``hold@N:MARKER`` (write MARKER, then sleep
    so another process can act meanwhile) or ``count:FILE`` (record the number of events)."""

    def __init__(self, spec: str):
        head, _, self.arg = spec.partition(":")
        self.mode, _, at = head.partition("@")
        if self.mode not in ("kill", "enospc", "memory", "hold", "count"):
            raise ValueError(f"unknown fault {spec!r}")
        self.at = int(at) if self.mode != "count" else None
        self.n = 0

    def event(self, what: str, filename: object = None) -> None:
        self.n += 1
        if self.mode == "count":
            # Written on every event so the total survives however the command exits.
            with _real_open(self.arg, "w") as f:
                f.write(str(self.n))
            return
        if self.n != self.at:
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hold":
            with _real_open(self.arg, "w") as f:
                f.write(what)
            time.sleep(600)
        if self.mode == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename) if filename else None)
        raise MemoryError(f"injected at {what}")


_real_open = io.open


def _wrap(fn: Callable, inj: _Injector, what: str, writes: Callable[..., bool] = lambda *a, **k: True) -> Callable:
    def hooked(*args, **kwargs):
        if writes(*args, **kwargs):
            inj.event(what, args[0] if args else None)
        return fn(*args, **kwargs)

    hooked.__wrapped__ = fn
    return hooked


def _opens_for_writing(file, mode="r", *args, **kwargs) -> bool:
    return isinstance(mode, str) and bool(_WRITE_MODES & set(mode)) and not isinstance(file, int)


def install(spec: str) -> _Injector:
    from k2mini.checkpoint import safetensors_format

    inj = _Injector(spec)
    hooked_open = _wrap(_real_open, inj, "open", _opens_for_writing)
    builtins.open = hooked_open
    io.open = hooked_open
    for name in ("replace", "rename", "fsync"):
        setattr(os, name, _wrap(getattr(os, name), inj, name))
    # One event per tensor written into a shard: the long stretches of a convert.
    safetensors_format._write_tensor = _wrap(safetensors_format._write_tensor, inj, "tensor")
    # numpy and torch write through their own C code; count their saves as events too.
    import numpy
    import torch

    numpy.save = _wrap(numpy.save, inj, "numpy.save")
    torch.save = _wrap(torch.save, inj, "torch.save")
    return inj


def run(spec: str, args: list[str], log: str) -> None:
    """Run one command with faults installed, stdout and stderr to ``log``; exits like the CLI.

    Meant as the target of a forked worker (multiprocessing forkserver with k2mini
    preloaded), so each interrupted run costs milliseconds of start-up, not an import of torch.
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    install(spec)
    from k2mini.cli import cli

    cli.main(args=args, prog_name="k2mini")


if __name__ == "__main__":
    install(sys.argv[1])
    from k2mini.cli import cli

    cli.main(args=sys.argv[2:], prog_name="k2mini")
