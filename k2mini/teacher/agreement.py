"""How far two teacher caches of the same corpus are apart (e.g. the layer-streamed engine's
and vLLM's): what a distillation loss reads from them, compared position by position."""

from __future__ import annotations

import torch

from k2mini.errors import UsageError
from k2mini.teacher.cache import TeacherCache


def agreement(a: TeacherCache, b: TeacherCache, batch: int = 64) -> dict:
    """Per position: whether the top-1 ids agree; |log p_a - log p_b| over the ids both
    top-k lists hold; |tail mass a - tail mass b| (tail = 1 - sum of the top-k probs).
    Read ``batch`` sequences at a time (memory flat in the cache size)."""
    if (a.sequences, a.seq_len) != (b.sequences, b.seq_len):
        raise UsageError(f"{b.path}: {b.sequences} x {b.seq_len} sequences, {a.path} has {a.sequences} x {a.seq_len}")
    positions = top1 = shared = 0
    dlogp_sum, dlogp_max, dtail_sum, dtail_max, tail_sum = 0.0, 0.0, 0.0, 0.0, 0.0
    for s0 in range(0, a.sequences, batch):
        idx = range(s0, min(a.sequences, s0 + batch))
        x, y = a.read(idx), b.read(idx)
        if not torch.equal(x.input_ids, y.input_ids):
            raise UsageError(f"{b.path}: another corpus than {a.path} (sequences {s0}..{idx[-1]} differ)")
        positions += x.input_ids.numel()
        top1 += int((x.topk_ids[..., 0] == y.topk_ids[..., 0]).sum())
        both = x.topk_ids.unsqueeze(-1) == y.topk_ids.unsqueeze(-2)  # [B, L, k, k]: a's i-th id is b's j-th
        d = (x.topk_logprobs.unsqueeze(-1) - y.topk_logprobs.unsqueeze(-2)).abs()[both].double()
        shared += d.numel()
        dlogp_sum += float(d.sum())
        dlogp_max = max(dlogp_max, float(d.max()) if d.numel() else 0.0)
        tx = (1 - x.topk_logprobs.double().exp().sum(-1)).clamp_min(0)
        ty = (1 - y.topk_logprobs.double().exp().sum(-1)).clamp_min(0)
        dt = (tx - ty).abs()
        dtail_sum += float(dt.sum())
        dtail_max = max(dtail_max, float(dt.max()))
        tail_sum += float(tx.sum())
    return {"positions": positions, "top1_agreement": top1 / positions, "shared_ids_per_position": shared / positions,
            "mean_abs_dlogp_shared": dlogp_sum / max(1, shared), "max_abs_dlogp_shared": dlogp_max,
            "mean_abs_dtail": dtail_sum / positions, "max_abs_dtail": dtail_max, "mean_tail": tail_sum / positions}
