"""Write one large file sequentially, past the page cache where the filesystem allows.

    with DirectFile(path) as f:      # O_DIRECT when supported, plain buffered writes otherwise
        f.write(memoryview_or_bytes)  # any sizes; copied into aligned chunks
        f.finish(fsync=True)          # last chunk, exact size, and the data made durable

Why not ``open(path, "wb")``: a shard written through the page cache is all dirty pages when
the final fsync comes, and the kernel writes little of it back before (its background
threshold is 10% of RAM), so writing and flushing alternate instead of overlapping, and
every output byte first costs a fresh page-cache page. Measured on the build machine (a
VM, 2 cores): 1.5-3 GB written from a reused buffer and fsynced ran at 85-524 MB/s through
the page cache and at 0.75-1.7 GB/s with O_DIRECT (load 1.7-11; `scripts/bench_convert.py`
prints both floors each run); 1.6-2.8 GB/s with O_DIRECT since the chunks sit on huge pages
(``chunk_buffers``; load 1.1-1.5). Starting writeback early instead (sync_file_range every 64 MB
plus POSIX_FADV_DONTNEED behind it) reached 0.66-0.92 GB/s in the same test.

O_DIRECT needs the buffer address, file offset and length aligned to the device's logical
block: bytes are copied into page-aligned chunks of ``CHUNK`` bytes (4096-aligned), the last
chunk is zero-padded and the file truncated back to its exact size. A thread writes a full
chunk while the caller fills the next, so producing (reading, dequantizing) overlaps the
disk. Where O_DIRECT is refused (tmpfs on old kernels, some FUSE and network filesystems,
macOS) the same chunks go through the page cache; the bytes on disk are identical either way.
Durability is unchanged: nothing is durable until ``finish(fsync=True)`` or the caller's
own fsync, exactly as with a buffered file.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_O_DIRECT = getattr(os, "O_DIRECT", 0)
ALIGN = 4096  # the largest common logical block size; any multiple of 512 up to it works
CHUNK = 4 << 20  # 4 MiB: as fast as 8 or 16 MiB on the build machine, 12 MiB of buffers in all
BUFFERS = 3
HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size


def chunk_buffers() -> tuple[mmap.mmap, list[memoryview]]:
    """``BUFFERS`` chunks, each starting on a ``HUGE_PAGE`` boundary of private anonymous memory
    that asks for transparent huge pages.

    Why: the kernel splits an O_DIRECT write into one block request per run of physically
    contiguous pages; with 4 KiB pages scattered in memory a 4 MiB pwrite became ~8 requests
    of ~512 KiB (max_segments), with 2 MiB pages one request of 4 MiB. Measured on the build
    machine's virtio disk (1.49 GB, O_DIRECT, fsync, one 4 MiB buffer, load 1-2):
    0.92-1.00 s with huge pages (4039 KB per request) against 1.57-1.61 s without (511 KB),
    and convert shares that disk's one bandwidth between its reads and its writes (see
    scripts/bench_convert.py). MAP_PRIVATE because ``mmap.mmap(-1, n)`` is MAP_SHARED, i.e.
    shmem, which the default THP setting ("madvise" for anonymous memory) never backs with
    huge pages. Where huge pages are unavailable (THP off, macOS) this is plain page-aligned
    memory and only the request sizes differ; the bytes written are the same.
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, BUFFERS * CHUNK + HUGE_PAGE, flags=flags) if flags else mmap.mmap(-1, BUFFERS * CHUNK + HUGE_PAGE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # kernels without THP refuse it with EINVAL
            pass
    mem = memoryview(m)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))  # the exported buffer is released with the temporary
    skip = -addr % HUGE_PAGE
    bufs = [mem[skip + k * CHUNK : skip + (k + 1) * CHUNK] for k in range(BUFFERS)]
    mem.release()  # the slices keep their own exports of the mapping
    return m, bufs


def _open(path: str, flags: int) -> int:
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o666)


class DirectFile:
    """A new file written front to back (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        # builtins.open (not os.open) so a fault injector that watches opens sees this one.
        self.name = str(path)
        self._file = open(Path(path), "wb", buffering=0, opener=_open)  # noqa: SIM115 - closed in close()
        self.fd = self._file.fileno()
        self.direct = bool(_O_DIRECT and fcntl.fcntl(self.fd, fcntl.F_GETFL) & _O_DIRECT)
        self.size = 0  # bytes given to write()
        self._offset = 0  # file offset of the chunk being filled
        self._map, self._bufs = chunk_buffers()  # touched lazily
        self._cur = 0
        self._fill = 0
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2mini-write")

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        pos = 0
        while pos < n:
            take = min(n - pos, CHUNK - self._fill)
            self._bufs[self._cur][self._fill : self._fill + take] = mv[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == CHUNK:
                self._submit(CHUNK)
        self.size += n
        return n

    def _submit(self, length: int) -> None:
        buf = memoryview(self._bufs[self._cur])[:length]
        self._pending.append(self._pool.submit(self._pwrite, buf, self._offset))
        self._offset += length
        self._cur = (self._cur + 1) % BUFFERS
        self._fill = 0
        # The next buffer is the oldest one in flight once all are: wait for it. Raises a
        # failed write (ENOSPC, EIO) here rather than after the last chunk.
        while self._pending and (len(self._pending) >= BUFFERS or self._pending[0].done()):
            self._pending.popleft().result()

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        done = 0
        with buf:  # released here, so close() can unmap the buffers
            while done < len(buf):
                try:
                    done += os.pwrite(self.fd, buf[done:], offset + done)
                except OSError as exc:
                    # A filesystem may accept O_DIRECT at open and refuse the write (a larger
                    # logical block, or a short write left the rest unaligned): go buffered.
                    if exc.errno != errno.EINVAL or not self.direct:
                        # os.pwrite's error names no file; the CLI's one line should.
                        raise OSError(exc.errno, exc.strerror, self.name) from exc
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
                    self.direct = False

    def finish(self, fsync: bool = True) -> None:
        """Write what is buffered, cut the file to ``size`` bytes and optionally fsync it."""
        if self._fill:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._bufs[self._cur][self._fill : padded] = bytes(padded - self._fill)
            self._submit(padded)
        while self._pending:
            self._pending.popleft().result()
        if self._offset != self.size:
            os.ftruncate(self.fd, self.size)
        if fsync:
            os.fsync(self.fd)

    def close(self) -> None:
        try:
            for f in self._pending:  # after an error: let writes in flight end before closing
                f.exception()
        finally:
            self._pool.shutdown(wait=True)
            self._file.close()
            for b in self._bufs:
                b.release()
            try:
                self._map.close()
            except BufferError:  # a traceback still holds a view of it: unmapped with that
                pass

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
