"""Output-error expert selection: keep the experts whose removal changes the MoE block's
output least on calibration tokens, with tokens re-routed among the kept experts exactly
as the reduced model will route them (docs/facts.md §2).

Published scores (frequency, EAN, REAP) rank experts one at a time; what matters is the
block's output once several experts are gone and their tokens have moved to others. This
measures that directly, by greedy backward elimination: starting from all experts, remove
the one whose removal (given those already removed) raises the relative squared error of the
routed output least. Every expert's output on every calibration token is computed once, so
a candidate costs a re-routing of the tokens it serves (a top-k and a gather), not a model run.

Memory: the outputs are [T, E, H] float32. At Kimi-K2's dims (E 384, H 7168) that is 11 MB
per calibration token (5.6 GB for 512 tokens), which is why ``k2mini analyze`` computes it
on a sample of the calibration tokens (``--output-error-tokens``).
"""

from __future__ import annotations

import torch

from k2mini.model.routing import Routing


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """f_j(x) for every token and expert: [T, E, H] from fused [E, 2I, H] / [E, H, I]."""
    h = torch.einsum("th,eih->tei", x, gate_up)
    g, u = h.chunk(2, dim=-1)
    return torch.einsum("tei,ehi->teh", torch.nn.functional.silu(g) * u, down)


def _combine(outs: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k w_k f_{idx_k}(x_t) for each row's token t."""
    return (w[..., None] * outs[tokens[:, None], idx]).sum(1)


def routed_output(scores: torch.Tensor, choice: torch.Tensor, outs: torch.Tensor, kept: torch.Tensor, r: Routing) -> torch.Tensor:
    """sum_k w_k f_k(x) with experts outside the boolean ``kept`` mask never chosen."""
    return _combine(outs, torch.arange(outs.shape[0]), *r.pick(scores, choice, kept))


def full_output(x: torch.Tensor, r: Routing, outs: torch.Tensor) -> torch.Tensor:
    """The unpruned block's routed output, with group-limited choice when n_group > 1.

    Pruned candidates are always re-routed by plain top-k over the kept experts (what
    convert's ``--groups flatten`` writes); with groups kept per group it is an approximation.
    """
    if r.n_group <= 1:
        scores = r.scores(x)
        return routed_output(scores, r.choice(scores), outs, torch.ones(scores.shape[1], dtype=torch.bool), r)
    return _combine(outs, torch.arange(outs.shape[0]), *r.route(x.float()))


def elimination_order(x: torch.Tensor, r: Routing, outs: torch.Tensor, chunk_floats: int = 1 << 26,
                      residuals: list[float] | None = None) -> list[int]:
    """Experts in the order greedy backward elimination removes them (first = least needed).

    Keeping the last n of the list is the greedy selection for every n >= top_k at once.
    Each round tries every remaining expert. Removing expert c changes only the tokens that
    currently route to c, so candidates are scored on (token, expert it routes to) pairs:
    the total error of candidate c is the current error plus the change on its tokens
    (equal, up to float summation order, to summing every token's error). A pair's
    re-routing is kept from round to round until its token's experts change or the expert
    it brought in is removed, so a round re-routes about T*k*k/E pairs, not T*k. Ties go to
    the lower expert id. ``chunk_floats`` bounds the gathered expert outputs per step
    (pairs * k * H floats). ``residuals``, when given, receives the relative squared error of
    the routed output with 0, 1, ..., E - k experts removed (what ``k2mini plan`` scores cuts by).
    """
    x = x.float()
    scores = r.scores(x)
    choice = r.choice(scores)
    T, E = scores.shape
    k, H = r.top_k, outs.shape[-1]
    full = full_output(x, r, outs)
    kept = torch.ones(E, dtype=torch.bool)
    cur_idx, cur_w = r.pick(scores, choice, kept)
    cur_err = (_combine(outs, torch.arange(T), cur_idx, cur_w) - full).square().sum(-1)
    step = max(1, chunk_floats // (k * H))
    full_sq = float(full.double().square().sum().clamp_min(1e-30))
    if residuals is not None:
        residuals.append(float(cur_err.double().sum()) / full_sq)
    tok = torch.arange(T).repeat_interleave(k)  # pair t*k + s: token t without its s-th expert
    new_idx = torch.empty(T * k, k, dtype=torch.long)
    new_err = torch.empty(T * k)
    stale = torch.ones(T * k, dtype=torch.bool)
    order: list[int] = []
    while int(kept.sum()) > k:
        cand = cur_idx.reshape(-1)
        todo = stale.nonzero().flatten()
        for p0 in range(0, todo.numel(), step):
            p = todo[p0 : p0 + step]
            t, c = tok[p], cand[p]
            mask = kept.expand(p.numel(), E).clone()
            mask[torch.arange(p.numel()), c] = False
            i, w = r.pick(scores[t], choice[t], mask)
            new_idx[p] = i
            new_err[p] = (_combine(outs, t, i, w) - full[t]).square().sum(-1)
        delta = torch.zeros(E, dtype=torch.float64).index_add_(0, cand, (new_err - cur_err[tok]).double())
        alive = kept.nonzero().flatten().tolist()
        best = min(alive, key=lambda c: (float(delta[c]), c))
        moved = cand == best
        t = tok[moved]
        cur_idx[t] = new_idx[moved]
        cur_err[t] = new_err[moved]
        kept[best] = False
        stale = (new_idx == best).any(-1)
        stale.view(T, k)[t] = True
        order.append(best)
        if residuals is not None:
            residuals.append(float(cur_err.double().sum()) / full_sq)
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
    scores = r.scores(x)
    choice = r.choice(scores)
    full = full_output(x, r, outs)
    kept = torch.zeros(scores.shape[1], dtype=torch.bool)
    kept[kept_ids] = True
    return float((routed_output(scores, choice, outs, kept, r) - full).square().sum() / full.square().sum().clamp_min(1e-30))
