"""A checkpoint source whose reads take a while (a round trip), recording how many overlap."""

from __future__ import annotations

import threading
import time

from k2mini.errors import CheckpointError


class SlowSource:
    """Wraps a source; ``fail_at=(file, offset)`` makes that read fail."""

    def __init__(self, inner, concurrency: int, fail_at: tuple[str, int] | None = None):
        self.inner = inner
        self.concurrency = concurrency
        self.fail_at = fail_at
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.started = 0  # bytes of every read begun

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def read_into(self, rel, offset, buf):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.started += len(buf)
        try:
            time.sleep(0.005)
            if (rel, offset) == self.fail_at:
                raise CheckpointError("connection reset", path=rel)
            self.inner.read_into(rel, offset, buf)
        finally:
            with self.lock:
                self.in_flight -= 1
