"""Expert selectors: a score per source expert of one MoE layer (higher = keep).

Register a new one with ``@expert_scorer("name")``: ``fn(ctx, layer) -> list[float]`` of
length n_routed_experts; ``convert --expert-strategy name`` then keeps the top-scoring
experts (an equal number from each routing group when groups are kept). ``explicit`` is
not a scorer: it takes the user's lists as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from k2mini.analysis.schema import ExpertStats
from k2mini.checkpoint.names import expert_weights, router_bias, router_weight
from k2mini.errors import UsageError
from k2mini.selection.context import SelectionContext
from k2mini.analysis.output_error import scores_from_order

ExpertScorer = Callable[[SelectionContext, int], list[float]]
EXPERT_SCORERS: dict[str, ExpertScorer] = {}
EXPLICIT = "explicit"


def expert_scorer(name: str):
    def deco(fn: ExpertScorer) -> ExpertScorer:
        EXPERT_SCORERS[name] = fn
        return fn
    return deco


def expert_strategies() -> list[str]:
    return sorted(EXPERT_SCORERS) + [EXPLICIT]


def analysis_stats(ctx: SelectionContext, layer: int, strategy: str) -> ExpertStats:
    """The analysis' expert statistics of MoE ``layer``; ``strategy`` names what needs them in the error."""
    a = ctx.require_analysis(strategy)
    for s in a.layers:
        if s.layer == layer and s.experts is not None:
            return s.experts
    raise UsageError(f"--analysis {ctx.analysis_path}: MoE layer {layer} has no expert statistics")


def _metric(name: str) -> ExpertScorer:
    def score(ctx: SelectionContext, layer: int) -> list[float]:
        values = getattr(analysis_stats(ctx, layer, name), name)
        if len(values) != ctx.spec.n_routed_experts:
            raise UsageError(f"--analysis {ctx.analysis_path}: layer {layer} has {len(values)} {name} values, "
                             f"the source has {ctx.spec.n_routed_experts} experts")
        return [float(v) for v in values]
    score.__doc__ = f"The analysis file's per-expert {name}."
    return score


for _name in ("frequency", "reap", "ean"):
    expert_scorer(_name)(_metric(_name))


OUTPUT_ERROR = "output-error"


@expert_scorer(OUTPUT_ERROR)
def output_error(ctx: SelectionContext, layer: int) -> list[float]:
    """Keep the experts the analysis' greedy output-error elimination removed last.

    The order was computed on calibration tokens by removing, one at a time, the expert
    whose removal (tokens re-routed among the rest) changed the block's output least
    (analysis/output_error.py), so its last n experts are the greedy choice for any n.
    """
    order = analysis_stats(ctx, layer, OUTPUT_ERROR).output_error_order
    if order is None:
        raise UsageError(f"--analysis {ctx.analysis_path}: layer {layer} has no output-error order (written by an older "
                         "k2mini or by analyze --no-output-error); re-run analyze or pick another --expert-strategy")
    if sorted(order) != list(range(ctx.spec.n_routed_experts)):
        raise UsageError(f"--analysis {ctx.analysis_path}: layer {layer}'s output-error order is not a permutation of "
                         f"the source's {ctx.spec.n_routed_experts} experts")
    return scores_from_order(order)


def rank_positions(values: list[float]) -> list[float]:
    # Rank 0 = smallest; ties broken by expert id so scores are deterministic.
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    r = [0.0] * len(values)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def _fp8_norm_proxy(shape: tuple[int, ...], scale: torch.Tensor) -> float:
    # scale_inv of a block is its max |w| / 448, so sqrt(sum_b n_b * s_b^2) tracks the
    # Frobenius norm (up to the blocks' crest factor) from 1/16384 of the bytes.
    s = scale.double()
    rows, cols = shape
    r = torch.tensor([min(128, rows - 128 * i) for i in range(s.shape[0])], dtype=torch.float64)
    c = torch.tensor([min(128, cols - 128 * j) for j in range(s.shape[1])], dtype=torch.float64)
    return float((s.square() * r[:, None] * c[None, :]).sum())


def weight_proxies(ctx: SelectionContext, layer: int) -> tuple[list[float], list[float], list[float]]:
    """Router row L2 norms, correction bias, expert weight norms (read from the checkpoint)."""
    ck, E = ctx.ck, ctx.spec.n_routed_experts
    router = ck.read(router_weight(layer)).float().norm(dim=1).tolist()
    bias_name = router_bias(layer)
    bias = ck.read(bias_name).float().tolist() if bias_name in ck.tensors else [0.0] * E
    weights = [expert_weights(layer, e) for e in range(E)]
    # All of the layer's scale grids at once (K2: 1152 of 3.6 KB): from the Hub they are
    # 1152 round trips, which read_many overlaps.
    scales = ck.read_many(s.name for ws in weights for w in ws if ck.is_fp8(w) and (s := ck.scale_of(w)) is not None)
    norms = []
    for ws in weights:
        sq = 0.0
        for w in ws:
            s = ck.scale_of(w)
            if s is not None and s.name in scales:
                sq += _fp8_norm_proxy(ck.info(w).shape, scales[s.name])
            else:
                sq += float(ck.read(w).float().square().sum())
        norms.append(math.sqrt(sq))
    return router, bias, norms


@expert_scorer("weights")
def weights(ctx: SelectionContext, layer: int) -> list[float]:
    """No data: mean rank of router row norm, correction bias and expert weight norm.

    A larger router row gives larger-magnitude logits (the expert wins more tokens
    decisively), a larger correction bias raises its choice score, and a larger weight
    norm gives a larger output when it is chosen. Taken from the analysis file when it
    has them, else read from the checkpoint (router rows, biases and FP8 scale grids only).
    """
    st = None
    if ctx.analysis is not None:
        st = next((s.experts for s in ctx.analysis.layers if s.layer == layer and s.experts is not None), None)
    if st is not None and st.router_norm and st.correction_bias and st.weight_norm:
        router, bias, norms = st.router_norm, st.correction_bias, st.weight_norm
    else:
        router, bias, norms = weight_proxies(ctx, layer)
    ranks = [rank_positions(router), rank_positions(bias), rank_positions(norms)]
    return [sum(r[i] for r in ranks) / 3.0 for i in range(ctx.spec.n_routed_experts)]


def pick(scores: list[float], n: int, n_group: int) -> list[int]:
    """Top-n source experts, n/n_group from each contiguous routing group when n_group > 1."""
    E = len(scores)
    size, per = E // n_group, n // n_group
    kept: list[int] = []
    for g in range(n_group):
        members = range(g * size, (g + 1) * size)
        kept += sorted(members, key=lambda i: (-scores[i], i))[:per]
    return sorted(kept)
