"""Counters of an offloaded run and what they mean per token, plus the LRU hit-rate curve of
an access trace (the cache size at which the hit rate stops improving for a given text)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class OffloadStats:
    """Counts of expert lookups by the tier that answered them.

    ``device_hits`` includes ``prefetch_hits`` (first use of an expert a prefetch brought in)
    and ``inflight_hits`` (a demand that waited on a prefetch already reading it).
    """

    lookups: int = 0
    device_hits: int = 0
    host_hits: int = 0
    disk_reads: int = 0
    prefetch_hits: int = 0
    inflight_hits: int = 0
    prefetch_issued: int = 0
    prefetch_skipped: int = 0  # no room without evicting an expert in use
    prefetch_wasted: int = 0  # prefetched, then evicted before any use
    evictions: int = 0
    bytes_read: int = 0  # checkpoint bytes (FP8 + scales) read from the source
    fetch_seconds: float = 0.0  # time the forward pass waited for experts (read + dequant)
    tokens: int = 0
    trace: list[tuple[int, int]] = field(default_factory=list, repr=False)

    def hit_rate(self, tier: str = "device") -> float:
        n = {"device": self.device_hits, "host": self.host_hits, "disk": self.disk_reads}[tier]
        return n / self.lookups if self.lookups else 0.0

    def summary(self, seconds: float | None = None) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "trace"}
        d["hit_rate"] = {t: round(self.hit_rate(t), 4) for t in ("device", "host", "disk")}
        if self.tokens:
            d["bytes_read_per_token"] = self.bytes_read / self.tokens
            d["fetch_ms_per_token"] = 1e3 * self.fetch_seconds / self.tokens
            if seconds is not None:
                d["compute_ms_per_token"] = 1e3 * max(seconds - self.fetch_seconds, 0.0) / self.tokens
                d["ms_per_token"] = 1e3 * seconds / self.tokens
        return d


def lru_hit_curve(trace: Sequence[tuple[int, int]], capacities: Sequence[int]) -> dict[int, float]:
    """Hit rate of an LRU cache holding ``c`` experts on ``trace``, for each ``c`` (simulated,
    no prefetch): the same policy as the device tier when all experts have the same size."""
    out = {}
    for cap in capacities:
        lru: OrderedDict = OrderedDict()
        hits = 0
        for key in trace:
            if key in lru:
                hits += 1
                lru.move_to_end(key)
            else:
                lru[key] = None
                if len(lru) > cap:
                    lru.popitem(last=False)
        out[cap] = hits / len(trace) if trace else 0.0
    return out


def plateau_capacity(trace: Sequence[tuple[int, int]], tolerance: float = 0.01) -> tuple[int, float]:
    """Smallest LRU capacity (in experts) whose hit rate is within ``tolerance`` of the best
    possible on this trace (every distinct expert held; only first touches miss)."""
    distinct = len(set(trace))
    if not trace:
        return 0, 0.0
    best = lru_hit_curve(trace, [distinct])[distinct]
    lo, hi = 0, distinct
    while lo < hi:  # hit rate of LRU is monotone in capacity (stack algorithm)
        mid = (lo + hi) // 2
        if lru_hit_curve(trace, [mid])[mid] >= best - tolerance:
            hi = mid
        else:
            lo = mid + 1
    return lo, best
