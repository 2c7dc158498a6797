"""Run an unpruned K2 / DeepSeek-V3 checkpoint within a memory budget: every routed expert
stays in the checkpoint and is fetched on demand into a byte-budgeted cache (device tier,
optional host tier of FP8 bytes), with next-layer prefetch guessed from the router."""

from k2mini.offload.cache import ExpertCache
from k2mini.offload.loader import OffloadedModel, load_full, load_offloaded
from k2mini.offload.stats import OffloadStats, lru_hit_curve, plateau_capacity

__all__ = ["ExpertCache", "OffloadStats", "OffloadedModel", "load_full", "load_offloaded", "lru_hit_curve",
           "plateau_capacity"]
