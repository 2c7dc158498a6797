"""Two-tier cache of routed experts under byte budgets.

Device tier: experts dequantized to the compute dtype on the compute device (on CPU, process
memory), LRU under ``budget`` bytes. Host tier (optional): the checkpoint's FP8 bytes and
scales in host memory (pinned when the device is CUDA), LRU under ``host_budget`` bytes; a
host hit saves the read but still pays the dequantization. Anything else is read from the
checkpoint (page cache or disk) with ``Checkpoint.read_fp8``.

Experts a forward pass is using are pinned: eviction skips them, so a prefetch for the next
layer can never push out the experts the current layer is about to multiply by. An expert
that does not fit next to the pinned ones is used once and dropped (the budget holds).

Prefetches run on one background thread. A demand for an expert a prefetch is already
reading waits for it; one still queued is cancelled and read by the demand itself, so a
backlog of stale guesses never delays the forward pass.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from k2mini.checkpoint import fp8
from k2mini.checkpoint.names import expert_weights
from k2mini.offload.stats import OffloadStats

Key = tuple[int, int]  # (layer, expert)
def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mmap.

    Why: glibc raises its mmap threshold after each large free (up to 32 MiB), so expert
    tensors evicted from the cache end up as holes in the heap of whichever thread allocated
    them (the prefetch thread has its own arena); RSS then exceeds the live bytes by a few
    experts (measured: +0.16 GiB on a real-dims run with prefetch). A fixed threshold returns
    an evicted expert's pages at once. Process-wide; False where mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class ExpertCache:
    def __init__(self, ck, *, budget: int, host_budget: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16, prefetch: bool = True, record_trace: bool = True):
        self.ck = ck
        self.budget = int(budget)
        self.host_budget = int(host_budget)
        self.device = torch.device(device)
        self.dtype = dtype
        self.record_trace = record_trace
        self.stats = OffloadStats()
        self._lock = threading.Lock()
        self._device: OrderedDict[Key, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self._host: OrderedDict[Key, tuple[list[tuple[torch.Tensor, torch.Tensor | None]], int]] = OrderedDict()
        self.device_bytes = 0
        self.host_bytes = 0
        self.peak_device_bytes = 0
        self._prefetched: set[Key] = set()
        self._pinned: set[Key] = set()
        self._inflight: dict[Key, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="k2mini-prefetch") if prefetch else None

    # -- public --------------------------------------------------------------------------

    def expert_bytes(self, key: Key) -> int:
        """Bytes one expert takes in the device tier (compute dtype)."""
        n = sum(self.ck.info(name).numel for name in expert_weights(*key))
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def prefetching(self) -> bool:
        return self._pool is not None

    def pin(self, keys: Iterable[Key]) -> None:
        """Keep these experts from eviction until unpinned (the current layer's working set)."""
        with self._lock:
            self._pinned |= set(keys)

    def unpin(self, keys: Iterable[Key]) -> None:
        with self._lock:
            self._pinned -= set(keys)

    def get(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of an expert, from whichever tier has it."""
        t0 = time.perf_counter()
        with self._lock:
            self.stats.lookups += 1
            if self.record_trace:
                self.stats.trace.append(key)
            hit = self._device.get(key)
            if hit is not None:
                self._device.move_to_end(key)
                self.stats.device_hits += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch_hits += 1
                return hit[0], hit[1]
            fut = self._inflight.get(key)
            if fut is not None and not fut.cancel():
                waiting = fut
            else:
                waiting = None
                if fut is not None:
                    self._inflight.pop(key, None)
                fut = Future()
                self._inflight[key] = fut
        if waiting is not None:
            got = waiting.result()
            if got is None:  # the prefetch found no room and read nothing
                with self._lock:
                    self.stats.lookups -= 1
                    if self.record_trace:
                        self.stats.trace.pop()
                return self.get(key)
            gate_up, down = got
            with self._lock:
                self.stats.device_hits += 1
                self.stats.inflight_hits += 1
                self._prefetched.discard(key)
                self.stats.fetch_seconds += time.perf_counter() - t0
            return gate_up, down
        try:
            gate_up, down, tier = self._load(key)
            with self._lock:
                self.stats.host_hits += tier == "host"
                self.stats.disk_reads += tier == "disk"
                self._insert(key, gate_up, down, prefetched=False)
            fut.set_result((gate_up, down))
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                if self._inflight.get(key) is fut:
                    del self._inflight[key]
                self.stats.fetch_seconds += time.perf_counter() - t0
        return gate_up, down

    def prefetch(self, keys: Iterable[Key]) -> None:
        """Start reading experts a later layer will probably need (no-op without a pool)."""
        if self._pool is None:
            return
        for key in keys:
            with self._lock:
                if key in self._device or key in self._inflight:
                    continue
                self.stats.prefetch_issued += 1
                fut = self._pool.submit(self._prefetch_one, key)
                self._inflight[key] = fut

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def drain(self) -> None:
        """Wait for every queued prefetch (between measurements)."""
        while True:
            with self._lock:
                futs = list(self._inflight.values())
            if not futs:
                return
            for f in futs:
                with contextlib.suppress(BaseException):
                    f.result()

    # -- internals -----------------------------------------------------------------------

    def _room_for(self, nbytes: int) -> bool:
        free = self.budget - self.device_bytes
        return free >= nbytes or free + sum(n for k, (_, _, n) in self._device.items() if k not in self._pinned) >= nbytes

    def _prefetch_one(self, key: Key) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            with self._lock:
                if not self._room_for(self.expert_bytes(key)):
                    # Reading it would only make a copy the budget cannot keep.
                    self.stats.prefetch_skipped += 1
                    return None
            gate_up, down, tier = self._load(key)
            with self._lock:
                if not self._insert(key, gate_up, down, prefetched=True):
                    self.stats.prefetch_skipped += 1
            return gate_up, down
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _load(self, key: Key):
        with self._lock:
            held = self._host.get(key)
            if held is not None:
                self._host.move_to_end(key)
        if held is not None:
            raw, tier = held[0], "host"
        else:
            raw, nbytes = self._read(key)
            tier = "disk"
            with self._lock:
                self.stats.bytes_read += nbytes
                self._insert_host(key, raw, nbytes)
        gate_up, down = self._materialise(raw)
        return gate_up, down, tier

    def _read(self, key: Key):
        raw, nbytes = [], 0
        for name in expert_weights(*key):
            if self.ck.is_fp8(name):
                w, s = self.ck.read_fp8(name)
                nbytes += w.nbytes + s.nbytes
            else:  # a BF16 checkpoint (a converted output) runs through the same cache
                w, s = self.ck.read_raw(name), None
                nbytes += w.nbytes
            if self.device.type == "cuda" and self.host_budget:
                w, s = w.pin_memory(), (s.pin_memory() if s is not None else None)
            raw.append((w, s))
        return raw, nbytes

    def _materialise(self, raw) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for w, s in raw:
            w = w.to(self.device, non_blocking=True)
            t = fp8.dequantize(w, s.to(self.device, non_blocking=True)) if s is not None else w
            parts.append(t.to(self.dtype))
        gate, up, down = parts
        return torch.cat([gate, up]), down

    def _insert_host(self, key: Key, raw, nbytes: int) -> None:
        if nbytes > self.host_budget or key in self._host:
            return
        while self.host_bytes + nbytes > self.host_budget:
            _, (_, n) = self._host.popitem(last=False)
            self.host_bytes -= n
        self._host[key] = (raw, nbytes)
        self.host_bytes += nbytes

    def _insert(self, key: Key, gate_up: torch.Tensor, down: torch.Tensor, *, prefetched: bool) -> bool:
        """Put an expert in the device tier, evicting unpinned LRU entries; False if it cannot fit."""
        if key in self._device:
            return True
        nbytes = gate_up.nbytes + down.nbytes
        if nbytes > self.budget:
            return False
        victims, free = [], self.budget - self.device_bytes
        if free < nbytes:
            for k, (_, _, n) in self._device.items():
                if k in self._pinned:
                    continue
                victims.append(k)
                free += n
                if free >= nbytes:
                    break
            if free < nbytes:
                return False
        for k in victims:
            self.device_bytes -= self._device.pop(k)[2]
            self.stats.evictions += 1
            if k in self._prefetched:
                self._prefetched.discard(k)
                self.stats.prefetch_wasted += 1
        self._device[key] = (gate_up, down, nbytes)
        self.device_bytes += nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        if prefetched:
            self._prefetched.add(key)
        return True
