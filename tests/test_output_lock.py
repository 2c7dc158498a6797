"""OutputDir's lock under the two interleavings that defeat an unlinked flock file.

flock locks belong to an open file description, so two OutputDirs in one process exclude
each other exactly as two processes do; the interleavings are forced with hooks on the
os calls output.py makes, so these tests are deterministic.
"""

from __future__ import annotations

import fcntl
import os

import pytest

from k2mini import output
from k2mini.errors import UsageError
from k2mini.output import OutputDir, lock_path


def test_lock_taken_on_a_file_unlinked_meanwhile_is_retried(tmp_path, monkeypatch):
    """B opens the lock file, A finishes (unlinks it, closes), B's flock then succeeds on the
    orphaned inode. B must not count that as holding the lock: a third run C would create
    the path afresh and lock it too."""
    out = tmp_path / "out"
    a = OutputDir(out).__enter__()
    real_flock = fcntl.flock
    calls = []

    def flock_after_a_finishes(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            a.__exit__(None, None, None)
        return real_flock(fd, op)

    monkeypatch.setattr(output.fcntl, "flock", flock_after_a_finishes)
    b = OutputDir(out).__enter__()
    monkeypatch.setattr(output.fcntl, "flock", real_flock)
    assert len(calls) == 2  # the first lock was on the orphaned inode; B tried again
    held, named = os.fstat(b._lock_fd), os.stat(lock_path(out))
    assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    with pytest.raises(UsageError, match="another k2mini run"):
        OutputDir(out).__enter__()
    b.__exit__(None, None, None)
    assert not lock_path(out).exists()


def test_run_starting_between_the_two_release_steps_still_excludes_a_third(tmp_path, monkeypatch):
    """B starts while A is between the two steps of releasing (unlink, close); whichever B
    gets, a third run C started after A is gone must be refused while B holds it."""
    out = tmp_path / "out"
    a = OutputDir(out).__enter__()
    a_fd, lp = a._lock_fd, str(lock_path(out))
    real_close, real_unlink = os.close, os.unlink
    steps: list[str] = []
    started: list[OutputDir] = []

    def step(name):
        steps.append(name)
        if len(steps) == 2:
            started.append(OutputDir(out).__enter__())

    def close(fd):
        if fd == a_fd and "close" not in steps:
            step("close")
        return real_close(fd)

    def unlink(path, *args, **kw):
        if os.fspath(path) == lp and "unlink" not in steps:
            step("unlink")
        return real_unlink(path, *args, **kw)

    monkeypatch.setattr(output.os, "close", close)
    monkeypatch.setattr(output.os, "unlink", unlink)
    a.__exit__(None, None, None)
    monkeypatch.setattr(output.os, "close", real_close)
    monkeypatch.setattr(output.os, "unlink", real_unlink)
    assert sorted(steps) == ["close", "unlink"] and len(started) == 1
    (b,) = started
    with pytest.raises(UsageError, match="another k2mini run"):
        OutputDir(out).__enter__()
    b.__exit__(None, None, None)
