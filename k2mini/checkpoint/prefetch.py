"""Read the next source tensors while the current one is used (transformed and written by
convert, multiplied by analyze's layerwise runner).

Reading (disk or network) and computing then overlap instead of alternating. At most
``budget`` bytes are held, counting the tensor in use (by default the largest tensor, up to
``READ_AHEAD``), so peak memory stays within about one largest tensor plus two budgets
whatever the model size. Tensors are read (and dequantized) into reused buffers
(``RingArena``) rather than fresh allocations.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from collections.abc import Iterable

import numpy as np
import torch

from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.safetensors_format import torch_dtype

# Below this, tensors come from malloc's heap, which reuses freed memory anyway (and a
# scale grid of a few KB is not worth a slot).
ARENA_MIN_BYTES = 1 << 20
# The default read-ahead budget's ceiling: enough to keep a disk or 8 Hub connections busy
# (17 of K2's 14.7 MB FP8 expert weights). Not the largest tensor when that is huge: the
# reused buffer is twice the budget and all of it ends up resident as the ring cycles, so a
# budget of K2's 2.35 GB embedding made a K2 24x16 convert peak at 5.27 GB
# (scripts/bench_k2_scale.py).
READ_AHEAD = 256 << 20


class RingArena:
    """One buffer of ``capacity`` bytes from which tensors are carved in order, like a queue:
    a tensor's bytes become free again when the last reference to its memory is gone, and
    space is reused from the oldest allocation on.

    Why: convert reads, transforms and drops tensors one after another. Fresh allocations
    re-fault every page (glibc maps anything above 32 MiB anew and a thread's arena trims
    freed memory); measured on the build machine (a 2-core VM, load 7-8): reading the 1.49 GB
    that scripts/bench_convert.py selects into a new tensor each took 3.6-5.3 s (155-172k
    page faults), into one reused buffer 1.7-2.3 s (32k). One arena sized to what is held at
    once also keeps peak memory where it was: the pages touched are the arena's.

    A tensor from ``empty`` views a numpy slice of the buffer; torch keeps that slice alive
    while any tensor or view uses the memory, and a weakref finalizer on it frees the slot
    then, never earlier. When the arena has no room (or for tensors under ``min_bytes``),
    ``empty`` is ``torch.empty``. The buffer is allocated on first use; untouched pages
    cost no memory.
    """

    def __init__(self, capacity: int, min_bytes: int = ARENA_MIN_BYTES):
        self.capacity = capacity
        self.min_bytes = min_bytes
        self.buf: np.ndarray | None = None
        self.live: deque[list] = deque()  # [start, end, freed], oldest first
        # Reentrant: a garbage collection inside empty() may run a finalizer (_free).
        self.lock = threading.RLock()

    def _place(self, n: int) -> int | None:
        if not self.live:
            return 0
        oldest, newest_end = self.live[0][0], self.live[-1][1]
        if self.live[-1][0] >= oldest:  # not wrapped: free are [newest_end, cap) and [0, oldest)
            if self.capacity - newest_end >= n:
                return newest_end
            return 0 if oldest >= n else None
        return newest_end if oldest - newest_end >= n else None  # wrapped: free is [newest_end, oldest)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if n < max(self.min_bytes, 1) or n > self.capacity:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            start = self._place(n)
            if start is None:
                return torch.empty(shape, dtype=dtype)
            if self.buf is None:
                self.buf = np.empty(self.capacity, dtype=np.uint8)
            slot = [start, start + n, False]
            self.live.append(slot)
        part = self.buf[start : start + n]
        weakref.finalize(part, self._free, slot)
        return torch.from_numpy(part).view(dtype).view(shape)

    def _free(self, slot: list) -> None:
        with self.lock:
            slot[2] = True
            while self.live and self.live[0][2]:
                self.live.popleft()


def raw_read_order(ck: Checkpoint, names: Iterable[str]) -> list[str]:
    """The raw reads ``ck.read`` makes for ``names``, in order: each weight, then its scale grid if FP8."""
    order = []
    for name in names:
        order.append(name)
        s = ck.scale_of(name) if ck.info(name).dtype == "F8_E4M3" else None
        if s is not None:
            order.append(s.name)
    return order


class Prefetcher:
    """Reads ``order`` (source tensor names, in the order they will be asked for) ahead.

    ``get(name)`` returns the tensor as ``Checkpoint.read_raw`` would. Names asked for out
    of order are read directly and move the read-ahead cursor past them, so skipped work
    (shards re-used by --resume) is never read. ``workers`` threads (the source's
    ``concurrency`` by default: one for a local disk, several for the Hub, where each read
    mostly waits on a round trip) read the next tensors at once; the bytes held, read, in
    flight and the tensor last handed out together, stay within ``budget`` (a tensor larger
    than the budget is read when nothing else is held: by the consumer itself, when it asks
    for it, so that two such tensors, K2's 2.35 GB embedding and lm_head, are never held at
    once).
    """

    def __init__(self, ck: Checkpoint, order: list[str], budget: int | None = None, workers: int | None = None):
        self.ck = ck
        self.order = order
        self.pos = {n: i for i, n in enumerate(order)}
        sizes = [ck.info(n).nbytes for n in order]
        self.sizes = sizes
        self.budget = budget if budget is not None else min(max(sizes, default=0), READ_AHEAD)
        self.workers = max(1, workers if workers is not None else ck.source.concurrency)
        # Held at once: the budget, or one tensor larger than it (which then comes from a fresh
        # allocation, returned to the system when dropped). Twice the budget leaves the ring
        # room to place a tensor while older ones are still being freed.
        self.arena = RingArena(2 * self.budget)
        self.ready: dict[int, torch.Tensor] = {}
        self.held = 0  # bytes of tensors ready, being read, or in the consumer's hands (in_use)
        # The tensor last handed out: the consumer works on it until it asks for the next one.
        # Counting it keeps two of the largest tensors from being held at once (K2's
        # lm_head and embedding, 2.35 GB each, are written one after the other).
        self.in_use = 0
        self.cursor = 0  # next index a thread reads
        self.consumed = 0  # reads of indices below this are stale (discarded on arrival)
        self.reading: set[int] = set()
        self.error: BaseException | None = None
        self.closed = False
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and self.error is None and (
                    self.cursor >= len(self.order)
                    or (self.held and self.held + self.sizes[self.cursor] > self.budget)
                ):
                    self.cond.wait()
                if self.closed or self.error is not None:
                    return
                j = self.cursor
                self.cursor += 1
                self.reading.add(j)
                self.held += self.sizes[j]
            try:
                t = self._read(self.order[j])
            except BaseException as exc:  # handed to the consumer, which raises it
                with self.cond:
                    self.reading.discard(j)
                    self.held -= self.sizes[j]
                    self.error = self.error or exc
                    self.cond.notify_all()
                return
            with self.cond:
                self.reading.discard(j)
                if j >= self.consumed and not self.closed:
                    self.ready[j] = t
                else:
                    self.held -= self.sizes[j]
                self.cond.notify_all()

    def get(self, name: str) -> torch.Tensor | None:
        i = self.pos.get(name)
        if i is None:
            return None
        if not self.threads:
            self.cursor = i
            self.threads = [
                threading.Thread(target=self._run, name=f"k2mini-prefetch-{k}", daemon=True) for k in range(self.workers)
            ]
            for th in self.threads:
                th.start()
        with self.cond:
            self.held -= self.in_use
            self.in_use = 0
            for j in [j for j in self.ready if j < i]:
                self.held -= self.sizes[j]
                del self.ready[j]
            # Reads of i itself (in flight now) are still wanted; only earlier ones are stale.
            self.consumed = max(self.consumed, i)
            while i not in self.ready and i in self.reading and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            t = self.ready.pop(i, None)
            if t is None:
                self.held += self.sizes[i]  # read below, by the consumer
                self.cursor = max(self.cursor, i + 1)
            self.in_use = self.sizes[i]
            self.cond.notify_all()
        return t if t is not None else self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        info = self.ck.info(name)
        return Checkpoint.read_raw(self.ck, name, out=self.arena.empty(info.shape, torch_dtype(info.dtype)))

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.ready.clear()
            self.held = sum(self.sizes[j] for j in self.reading)
            self.cond.notify_all()
        for th in self.threads:
            th.join()


class PrefetchedCheckpoint(Checkpoint):
    """The same checkpoint, whose raw reads come from a Prefetcher (read, read_fp8 included)."""

    def __init__(self, ck: Checkpoint, prefetcher: Prefetcher):  # noqa: super().__init__ would re-open
        self.__dict__.update(ck.__dict__)
        self._prefetcher = prefetcher
        # Dequantized weights are written and dropped one at a time: one buffer of the
        # largest BF16 result.
        fp8_sizes = (ck.info(n).nbytes for n in prefetcher.order if ck.info(n).dtype == "F8_E4M3")
        self._dequant_arena = RingArena(2 * max(fp8_sizes, default=0))

    def read_raw(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:
            return super().read_raw(name, out)
        t = self._prefetcher.get(name)
        return t if t is not None else super().read_raw(name)

    def _dequant_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._dequant_arena.empty(shape, torch.bfloat16)
