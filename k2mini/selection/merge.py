"""Expert merging: fold each pruned expert into the kept expert it is most similar to.

Two similarities. Output-based (the study's): the cosine between two experts' outputs on the
same calibration tokens, f_i(X) and f_j(X) flattened over tokens and hidden units; it needs
every expert run on every calibration token, which ``analyze`` does not do (it runs each
expert on its routed tokens only). Router-logit (``convert --merge router``): the cosine of
the two experts' router weight rows, i.e. of their routing logits w_i.x over inputs x with no
preferred direction; it needs no data, only the router weights. Router similarity says which
tokens two experts want, not whether they compute the same thing. The merged
expert's gate/up/down matrices are the routing-frequency-weighted mean of its group
(the kept expert and the pruned ones folded into it); the kept expert's router row and
correction bias are unchanged, so routing among kept experts is what pruning alone gives.
A merge plan is a map kept id -> [(source id, weight)], so a streaming writer can
accumulate each output expert tensor by tensor, one source tensor at a time.
"""

from __future__ import annotations

import torch


def output_similarity(outs: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarity of expert outputs ``outs`` [T, E, H] over all tokens."""
    return _row_cosines(outs.permute(1, 0, 2).reshape(outs.shape[1], -1))


def router_similarity(router_weight: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarity of the router weight rows ``router_weight`` [E, H]."""
    return _row_cosines(router_weight)


def _row_cosines(m: torch.Tensor) -> torch.Tensor:
    """[R, R] cosine similarity of the rows of ``m`` (computed in float64)."""
    m = m.double()
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (m @ m.T).float()


def merge_plan(kept: list[int], similarity: torch.Tensor, frequency: list[float]) -> dict[int, list[tuple[int, float]]]:
    """Each pruned expert joins its most similar kept expert; weights are routing frequency
    shares within the group (+1 token each, so an expert never routed to still counts a little
    rather than dividing by zero)."""
    E = similarity.shape[0]
    kept_set = set(kept)
    groups: dict[int, list[int]] = {k: [k] for k in kept}
    ks = torch.tensor(sorted(kept))
    for e in range(E):
        if e in kept_set:
            continue
        target = int(ks[similarity[e, ks].argmax()])
        groups[target].append(e)
    plan = {}
    for k, members in groups.items():
        f = [float(frequency[m]) + 1.0 for m in members]
        total = sum(f)
        plan[k] = [(m, fm / total) for m, fm in zip(members, f)]
    return plan


def merge_tensor(parts: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Weighted sum of one projection over a merge group, accumulated in float32 one
    source tensor at a time (a streaming writer passes them as it reads them)."""
    acc = None
    for t, w in parts:
        term = t.float() * w
        acc = term if acc is None else acc.add_(term)
    return acc
