"""One output directory per run: checked before anything is written, locked while written,
and renamed into place only when complete.

API::

    check_output(out, source=src, overwrite=False, planned_bytes=n)   # raises UsageError; no side effects
    with OutputDir(out, source=src, overwrite=False, resume=False, planned_bytes=n) as od:
        ...write everything into od.partial...   # e.g. writer.write_sharded(od.partial, units)
        od.commit()                                # atomically becomes `out`

Until ``commit`` the files live in a hidden sibling ``.<name>.k2mini-partial``, so a
killed run never leaves anything at ``out`` that looks like a finished checkpoint; a
later run with ``resume=True`` continues in the same partial directory. An exclusive
``flock`` on the sibling ``.<name>.k2mini-lock`` makes a second run into the same output
fail at once with a clear message instead of interleaving shards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from k2mini.checkpoint.source import refuse_output_inside
from k2mini.checkpoint.writer import JOURNAL_FILE
from k2mini.errors import UsageError
from k2mini.sizes import format_size

# Room left for the page cache flush, filesystem metadata and the small files.
_DISK_MARGIN = 64 * 2**20


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.k2mini-partial"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.k2mini-lock"


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_output(
    out: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    planned_bytes: int = 0,
    flag: str = "--output",
) -> None:
    """Every reason not to start writing ``out``, as a one-line UsageError. Writes nothing."""
    out = Path(out)
    if source is not None:
        refuse_output_inside(source, out, flag=flag)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {out}: exists and is not empty (pass --overwrite to replace it)")
    have = 0
    part = partial_dir(out)
    if resume and part.is_dir():
        have = sum(p.stat().st_size for p in part.glob("*.safetensors"))
    need = max(0, planned_bytes - have) + _DISK_MARGIN
    free = shutil.disk_usage(_existing_ancestor(out.parent)).free
    if free < need:
        raise UsageError(
            f"{flag} {out}: not enough free disk: the output needs {format_size(need)}, "
            f"{format_size(free)} is free on {_existing_ancestor(out.parent)}"
        )


class OutputDir:
    """Context manager: check, lock, prepare the partial directory; ``commit()`` publishes it."""

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        source: str | os.PathLike | None = None,
        overwrite: bool = False,
        resume: bool = False,
        planned_bytes: int = 0,
        flag: str = "--output",
    ):
        self.path = Path(out)
        self.partial = partial_dir(self.path)
        self._args = dict(source=source, overwrite=overwrite, resume=resume, planned_bytes=planned_bytes, flag=flag)
        self.resume = resume
        self.resumed = False
        self._lock_fd: int | None = None
        self.committed = False

    def __enter__(self) -> OutputDir:
        # Checked before the lock so a refused run creates nothing, and again under the lock
        # because another run may have finished into the same path meanwhile.
        check_output(self.path, **self._args)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock(lock_path(self.path))
        try:
            check_output(self.path, **self._args)
            if self.resume and self.partial.is_dir():
                self.resumed = True
            else:
                if self.partial.exists():
                    shutil.rmtree(self.partial)
                self.partial.mkdir()
        except BaseException:
            self._release()
            raise
        return self

    def commit(self) -> None:
        """Make the partial directory the output (replacing an old one under --overwrite)."""
        (self.partial / JOURNAL_FILE).unlink(missing_ok=True)
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.k2mini-old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.path, old)
        os.replace(self.partial, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if old is not None:
            shutil.rmtree(old)
        self.committed = True

    def _lock(self, lp: Path) -> int:
        """An fd holding an exclusive flock on the inode that ``lp`` names now."""
        while True:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UsageError(
                        f"{self._args['flag']} {self.path}: another k2mini run is writing it (lock {lp}); "
                        "wait for it to finish or choose another output"
                    ) from None
                raise
            # A run that released between our open and our flock has unlinked the file we
            # opened: a lock on that orphaned inode would not exclude a third run, which
            # creates the path afresh and locks a new inode. Only a lock on the inode the
            # path names after we hold it counts; otherwise open the new file and try again.
            try:
                now = os.stat(lp)
            except FileNotFoundError:
                now = None
            held = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)

    def _release(self) -> None:
        if self._lock_fd is not None:
            # Unlink while still holding the lock, then close. The reverse order lets another
            # run open and lock the old inode after our close and pass _lock's check (the path
            # still names it), and then our unlink lets a third run lock a fresh inode too.
            # In this order a run that opened the old file before our unlink fails _lock's
            # check and retries on the new path.
            lock_path(self.path).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, *exc) -> None:
        # On failure the partial directory stays for --resume; it is hidden and named partial.
        self._release()


@contextlib.contextmanager
def open_on_main_rank(out: str | os.PathLike, *, state, prepare=None, **kwargs) -> Iterator[OutputDir | None]:
    """``with open_on_main_rank(...) as od``: an ``OutputDir`` for a data-parallel run
    (``state``: accelerate's PartialState). Rank 0 opens and locks it (then calls
    ``prepare(od)``, which may refuse), and every rank raises the same error if either
    fails, instead of the others hanging at a barrier. ``od`` is the OutputDir on rank 0,
    None elsewhere; every rank may write into ``partial_dir(out)`` inside the block. The
    lock is released when the block ends, committed or not."""
    check_output(out, **kwargs)
    failure = [None]
    with contextlib.ExitStack() as stack:
        od = None
        if state.is_main_process:
            try:
                od = stack.enter_context(OutputDir(out, **kwargs))
                if prepare is not None:
                    prepare(od)
            except Exception as exc:  # handed to every rank, which all raise it
                failure = [exc]
                stack.close()
                od = None
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(failure, from_process=0)
        if failure[0] is not None:
            raise failure[0]
        yield od
