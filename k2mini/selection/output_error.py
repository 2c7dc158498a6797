"""Output-error expert selection: keep the experts whose removal changes the MoE block's
output least on calibration tokens, with tokens re-routed among the kept experts exactly
as the reduced model will route them (DESIGN section 4).

Published scores (frequency, EAN, REAP) rank experts one at a time; what matters is the
block's output once several experts are gone and their tokens have moved to others. This
measures that directly, by greedy backward elimination: starting from all experts, remove
the one whose removal (given those already removed) raises the relative squared error of the
routed output least. Every expert's output on every calibration token is computed once, so
each candidate costs one re-routing (a top-k and a gather), not a model run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """One MoE layer's router: [E, H] weight, [E] correction bias and its constants."""

    weight: torch.Tensor
    bias: torch.Tensor
    top_k: int
    norm_topk_prob: bool = True
    scaling: float = 1.0


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """f_j(x) for every token and expert: [T, E, H] from fused [E, 2I, H] / [E, H, I]."""
    h = torch.einsum("th,eih->tei", x, gate_up)
    g, u = h.chunk(2, dim=-1)
    return torch.einsum("tei,ehi->teh", torch.nn.functional.silu(g) * u, down)


def routed_output(scores: torch.Tensor, choice: torch.Tensor, outs: torch.Tensor, kept: torch.Tensor, r: Routing) -> torch.Tensor:
    """sum_k w_k f_k(x) with experts outside the boolean ``kept`` mask never chosen."""
    masked = choice.masked_fill(~kept, float("-inf"))
    idx = masked.topk(r.top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if r.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * r.scaling
    picked = outs.gather(1, idx[..., None].expand(-1, -1, outs.shape[-1]))
    return (w[..., None] * picked).sum(1)


def elimination_order(x: torch.Tensor, r: Routing, outs: torch.Tensor, candidates: int | None = None) -> list[int]:
    """Experts in the order greedy backward elimination removes them (first = least needed).

    Keeping the last n of the list is the greedy selection for every n >= top_k at once.
    ``candidates`` limits each round to the experts with the lowest single-removal error
    (None: try all), trading search breadth for time on large E.
    """
    x = x.float()
    scores = torch.sigmoid(x @ r.weight.float().T)
    choice = scores + r.bias.float()
    E = scores.shape[1]
    kept = torch.ones(E, dtype=torch.bool)
    full = routed_output(scores, choice, outs, kept, r)
    denom = full.square().sum().clamp_min(1e-30)
    order: list[int] = []
    while int(kept.sum()) > r.top_k:
        alive = kept.nonzero().flatten().tolist()
        errs = {}
        for c in alive:
            kept[c] = False
            errs[c] = float((routed_output(scores, choice, outs, kept, r) - full).square().sum() / denom)
            kept[c] = True
        ranked = sorted(alive, key=lambda c: (errs[c], c))
        if candidates is not None:
            ranked = ranked[:candidates]
        best = ranked[0]
        kept[best] = False
        order.append(best)
    order += sorted(kept.nonzero().flatten().tolist())
    return order


def scores_from_order(order: list[int]) -> list[float]:
    """Per-expert scores (higher = keep) so that keeping the top n follows the order."""
    s = [0.0] * len(order)
    for rank, e in enumerate(order):
        s[e] = float(rank)
    return s


def relative_error(x: torch.Tensor, r: Routing, outs: torch.Tensor, kept_ids: list[int]) -> float:
    """Relative squared error of the routed output when only ``kept_ids`` remain."""
    x = x.float()
    scores = torch.sigmoid(x @ r.weight.float().T)
    choice = scores + r.bias.float()
    full = routed_output(scores, choice, outs, torch.ones(scores.shape[1], dtype=torch.bool), r)
    kept = torch.zeros(scores.shape[1], dtype=torch.bool)
    kept[kept_ids] = True
    return float((routed_output(scores, choice, outs, kept, r) - full).square().sum() / full.square().sum().clamp_min(1e-30))
