"""The distillation loss: forward KL(teacher || student) over the teacher's cached top-k ids
plus one tail bucket, temperature 1, optionally plus cross-entropy on the corpus tokens.

With the teacher's top-k log-probs ``t_i`` (of its full softmax) the teacher distribution
is collapsed to k + 1 outcomes: each kept id, and "any other id" with mass
``T = 1 - sum_i exp(t_i)``. The student is collapsed the same way: its log-probs ``s_i`` at
those ids and its own mass outside them, ``S = logsumexp(student logits outside the ids) -
logsumexp(all)``, computed from logits, not as ``1 - sum exp(s_i)``, which loses all
precision when the tail is small. Then

    KL = sum_i exp(t_i) (t_i - s_i) + T (log T - S)

which is exact KL when k covers the vocabulary (T = 0) and a lower bound of the full KL
otherwise (collapsing outcomes never increases a divergence). A plain top-k KL
renormalised over the kept ids would drop the tail and bias the student's tail mass
("Sparse Logit Sampling", ACL 2025); the bucket keeps it.
"""

from __future__ import annotations

import torch

# Teacher tail masses at or below this count as none: with k covering (nearly) the whole
# vocabulary, 1 - sum(p) of float16 log-probs comes out slightly negative or tiny, which is
# rounding, not probability, and its log would only add noise.
_TAIL_FLOOR = 1e-6


def collapsed_kl(t_top: torch.Tensor, s_top: torch.Tensor, s_tail: torch.Tensor) -> torch.Tensor:
    """Per position KL(teacher || student) on the k ids + tail bucket (the formula above).

    ``t_top`` [N, k] teacher log-probs, ``s_top`` [N, k] student log-probs at the same ids,
    ``s_tail`` [N] the student's log-mass outside them (only used where the teacher has a tail).
    Shared by ``kl_sum`` (full logits) and plan's streamed head (logits in row blocks)."""
    p_top = t_top.exp()
    kl = (p_top * (t_top - s_top)).sum(-1)
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    tail = p_tail * (p_tail.clamp_min(_TAIL_FLOOR).log() - s_tail)
    return kl + torch.where(p_tail > _TAIL_FLOOR, tail, torch.zeros_like(tail))


def kl_sum(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) on the k ids + tail bucket.

    ``logits`` [N, V] (student, any float dtype; computed in float32), ``topk_ids`` [N, k],
    ``topk_logprobs`` [N, k] (teacher, float32).
    """
    logits = logits.float()
    lse = logits.logsumexp(-1)
    s_top = logits.gather(-1, topk_ids) - lse[:, None]
    t_top = topk_logprobs.float()
    s_tail = torch.zeros_like(lse)
    # The student's tail needs a second log-sum-exp over the vocabulary: only when some
    # position's teacher has a tail.
    if bool(((1.0 - t_top.exp().sum(-1)) > _TAIL_FLOOR).any()):
        s_tail = logits.scatter(-1, topk_ids, float("-inf")).logsumexp(-1) - lse
    return collapsed_kl(t_top, s_top, s_tail).sum()


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of ``targets`` [N] (-100: no target) under ``logits`` [N, V]."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L] next-token targets; the last position of each sequence has none (-100)."""
    t = torch.full_like(input_ids, -100)
    t[:, :-1] = input_ids[:, 1:]
    return t
