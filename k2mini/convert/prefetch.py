"""Read the next source tensor while the current one is transformed and written.

Reading (disk or network) and writing/dequantizing then overlap instead of alternating.
At most ``budget`` bytes are held ahead (the largest single tensor by default), so peak
memory stays about two tensors whatever the model size.
"""

from __future__ import annotations

import threading

import torch

from k2mini.checkpoint.reader import Checkpoint


class Prefetcher:
    """Reads ``order`` (source tensor names, in the order they will be asked for) ahead.

    ``get(name)`` returns the tensor as ``Checkpoint.read_raw`` would. Names asked for out
    of order are read directly and move the read-ahead cursor past them, so skipped work
    (shards re-used by --resume) is never read.
    """

    def __init__(self, ck: Checkpoint, order: list[str], budget: int | None = None):
        self.ck = ck
        self.order = order
        self.pos = {n: i for i, n in enumerate(order)}
        sizes = [ck.info(n).nbytes for n in order]
        self.sizes = sizes
        self.budget = budget if budget is not None else max(sizes, default=0)
        self.ready: dict[int, torch.Tensor] = {}
        self.ready_bytes = 0
        self.cursor = 0  # next index the thread reads
        self.consumed = 0  # reads of indices below this are stale (discarded on arrival)
        self.reading: int | None = None
        self.error: BaseException | None = None
        self.closed = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and (
                    self.cursor >= len(self.order)
                    or (self.ready_bytes and self.ready_bytes + self.sizes[self.cursor] > self.budget)
                ):
                    self.cond.wait()
                if self.closed:
                    return
                j = self.cursor
                self.cursor += 1
                self.reading = j
            try:
                t = Checkpoint.read_raw(self.ck, self.order[j])
            except BaseException as exc:  # handed to the consumer, which raises it
                with self.cond:
                    self.error, self.reading = exc, None
                    self.cond.notify_all()
                return
            with self.cond:
                self.reading = None
                if j >= self.consumed:
                    self.ready[j] = t
                    self.ready_bytes += self.sizes[j]
                self.cond.notify_all()

    def get(self, name: str) -> torch.Tensor | None:
        i = self.pos.get(name)
        if i is None:
            return None
        if self.thread is None:
            self.cursor = i
            self.thread = threading.Thread(target=self._run, name="k2mini-prefetch", daemon=True)
            self.thread.start()
        with self.cond:
            for j in [j for j in self.ready if j < i]:
                self.ready_bytes -= self.sizes[j]
                del self.ready[j]
            # Reads of i itself (in flight now) are still wanted; only earlier ones are stale.
            self.consumed = max(self.consumed, i)
            while i not in self.ready and self.reading == i and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            t = self.ready.pop(i, None)
            if t is not None:
                self.ready_bytes -= self.sizes[i]
            elif self.cursor <= i:
                self.cursor = i + 1
            self.cond.notify_all()
        return t if t is not None else Checkpoint.read_raw(self.ck, name)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.ready.clear()
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()


class PrefetchedCheckpoint(Checkpoint):
    """The same checkpoint, whose raw reads come from a Prefetcher (read, read_fp8 included)."""

    def __init__(self, ck: Checkpoint, prefetcher: Prefetcher):  # noqa: super().__init__ would re-open
        self.__dict__.update(ck.__dict__)
        self._prefetcher = prefetcher

    def read_raw(self, name: str) -> torch.Tensor:
        t = self._prefetcher.get(name)
        return t if t is not None else super().read_raw(name)
