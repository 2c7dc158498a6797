"""In-process machinery of the selection quality study on a trained nano K2.

A pruned model is the unpruned one with experts masked out of routing (their correction
bias set to -1e9: sigmoid scores are in (0, 1), so a masked expert is never among the
top-k, and the kept experts' weights are renormalised among themselves exactly as in a
sliced checkpoint, docs/facts.md §2) and decoder layers removed from the layer list.
This equals what convert writes, without a round trip through disk per configuration.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from k2mini.checkpoint.reader import Checkpoint
from k2mini.model.hf import load_checkpoint_model
from k2mini.nano.train import fast_experts
from k2mini.selection import merge as merging
from k2mini.selection.experts import rank_positions
from k2mini.model.routing import Routing
from k2mini.analysis.output_error import elimination_order, expert_outputs, scores_from_order

MASKED = -1e9


def load_nano(path) -> tuple[torch.nn.Module, dict]:
    ck = Checkpoint.open(str(path))
    model = load_checkpoint_model(ck)
    fast_experts(model)
    return model.eval(), ck.config


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


def routing_of(model, layer: int) -> Routing:
    return Routing.of_gate(model.model.layers[layer].mlp.gate)


@dataclass
class LayerStats:
    frequency: list[float]
    ean: list[float]
    reap: list[float]
    weights: list[float]
    output_error_order: list[int]
    similarity: torch.Tensor


@dataclass
class Calibration:
    experts: dict[int, LayerStats] = field(default_factory=dict)
    block_influence: dict[int, float] = field(default_factory=dict)
    angular: dict[int, dict[int, float]] = field(default_factory=dict)  # n -> start -> distance
    nll_increase: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def _nll(model, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@torch.no_grad()
def calibrate(model, ids: torch.Tensor, *, layer_metrics: bool = True) -> Calibration:
    """Expert statistics (docs/facts.md §3, with the model's real routing) and layer metrics."""
    cal = Calibration()
    captured: dict[int, torch.Tensor] = {}
    hooks = [model.model.layers[l].mlp.register_forward_pre_hook(
        lambda m, args, l=l: captured.__setitem__(l, args[0].reshape(-1, args[0].shape[-1]).detach())) for l in moe_layers(model)]
    try:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    for l, x in captured.items():
        mlp = model.model.layers[l].mlp
        r = routing_of(model, l)
        idx, w = r.route(x)
        E = r.weight.shape[0]
        outs = expert_outputs(x.float(), mlp.experts.gate_up_proj.float(), mlp.experts.down_proj.float())
        norms = outs.norm(dim=-1)  # [T, E]
        freq, ean, gsum = torch.zeros(E), torch.zeros(E), torch.zeros(E)
        for k in range(r.top_k):
            e = idx[:, k]
            n = norms.gather(1, e[:, None])[:, 0]
            freq.index_add_(0, e, torch.ones_like(n))
            ean.index_add_(0, e, n)
            gsum.index_add_(0, e, w[:, k] * n)
        reap = gsum / freq.clamp_min(1)
        # The same three weight-only signals as convert's ``weights`` scorer, mean rank.
        wnorm = (mlp.experts.gate_up_proj.float().square().sum((1, 2)) + mlp.experts.down_proj.float().square().sum((1, 2))).sqrt()
        ranks = [rank_positions(r.weight.float().norm(dim=1).tolist()), rank_positions(r.bias.tolist()), rank_positions(wnorm.tolist())]
        weights = [sum(rr[i] for rr in ranks) / 3 for i in range(E)]
        cal.experts[l] = LayerStats(freq.tolist(), ean.tolist(), reap.tolist(), weights,
                                    elimination_order(x, r, outs), merging.output_similarity(outs))
    if layer_metrics:
        hs = [h.float() for h in out.hidden_states]  # h[l] = input of layer l; last = after final norm
        L = len(model.model.layers)
        for l in range(L):
            nxt = hs[l + 1] if l + 1 < L else None
            if nxt is not None:
                cal.block_influence[l] = float(1 - torch.nn.functional.cosine_similarity(hs[l], nxt, dim=-1).mean())
        for n in range(1, L):
            cal.angular[n] = {}
            for s in range(1, L - n + 1):
                end = hs[s + n] if s + n < L else None
                if end is None:
                    continue
                c = torch.nn.functional.cosine_similarity(hs[s][:, -1], end[:, -1], dim=-1).clamp(-1, 1)
                cal.angular[n][s] = float((torch.arccos(c) / math.pi).mean())
        base = _nll(model, ids)
        for l in range(1, L):
            cal.nll_increase[l] = _nll(drop_layers(model, [l]), ids) - base
    return cal


def drop_layers(model, dropped: list[int]):
    """A shallow copy of the model without the given decoder layers (weights shared)."""
    # copy.copy of a Module shares its _modules dict: give both levels their own.
    m = copy.copy(model)
    m._modules = dict(model._modules)
    inner = copy.copy(model.model)
    inner._modules = dict(model.model._modules)
    inner._modules["layers"] = torch.nn.ModuleList([layer for i, layer in enumerate(model.model.layers) if i not in set(dropped)])
    inner.config = copy.copy(model.model.config)
    inner.config.num_hidden_layers = len(inner.layers)
    m._modules["model"] = inner
    return m


def select_layers(strategy: str, cal: Calibration, n_layers: int, keep: int, seed: int = 0) -> list[int]:
    """Layers to DROP (layer 0, the dense one, is always kept)."""
    drop = n_layers - keep
    cand = list(range(1, n_layers))
    if drop <= 0:
        return []
    if strategy == "uniform":
        kept = {0} | {cand[round(i * (len(cand) - 1) / max(1, keep - 2))] for i in range(keep - 1)} if keep > 1 else {0}
        return [l for l in range(n_layers) if l not in kept]
    if strategy == "block_influence":
        return sorted(sorted(cand, key=lambda l: (cal.block_influence.get(l, 0.0), l))[:drop])
    if strategy == "nll":
        return sorted(sorted(cand, key=lambda l: (cal.nll_increase[l], l))[:drop])
    if strategy == "angular":
        starts = cal.angular[drop]
        s = min(starts, key=lambda k: (starts[k], k))
        return list(range(s, s + drop))
    raise ValueError(strategy)


def expert_scores(strategy: str, st: LayerStats, seed: int) -> list[float]:
    if strategy in ("frequency", "ean", "reap", "weights"):
        return list(getattr(st, strategy))
    if strategy == "reap_merge":
        return list(st.reap)
    if strategy == "output_error":
        return scores_from_order(st.output_error_order)
    if strategy == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(st.frequency), generator=g).tolist()
    raise ValueError(strategy)


def top(scores: list[float], n: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n])


@torch.no_grad()
def prune_experts(model, cal: Calibration, strategy: str, keep: int, seed: int, kept_by_layer: dict[int, list[int]] | None = None):
    """A copy of ``model`` keeping ``keep`` experts per MoE layer (merging when asked);
    ``kept_by_layer`` (e.g. from a convert plan.json) overrides the strategy's choice."""
    m = copy.deepcopy(model)
    for l, st in cal.experts.items():
        mlp = m.model.layers[l].mlp
        kept = kept_by_layer[l] if kept_by_layer else top(expert_scores(strategy, st, seed + 1000 * l), keep)
        mask = torch.ones(len(st.frequency), dtype=torch.bool)
        mask[kept] = False
        mlp.gate.e_score_correction_bias[mask] = MASKED
        if strategy == "reap_merge":
            plan = merging.merge_plan(kept, st.similarity, st.frequency)
            gu, dn = mlp.experts.gate_up_proj.data.clone(), mlp.experts.down_proj.data.clone()
            for k, parts in plan.items():
                mlp.experts.gate_up_proj.data[k] = merging.merge_tensor([(gu[e], w) for e, w in parts])
                mlp.experts.down_proj.data[k] = merging.merge_tensor([(dn[e], w) for e, w in parts])
    return m


@torch.no_grad()
def reference(model, ids: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([model(input_ids=ids[i : i + batch], use_cache=False).logits.float().log_softmax(-1) for i in range(0, len(ids), batch)])


@torch.no_grad()
def compare(model, ids: torch.Tensor, ref_logp: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """Perplexity on ``ids``, KL(unpruned || pruned) per token and top-1 agreement."""
    logp = reference(model, ids, batch)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
    agree = (ref_logp.argmax(-1) == logp.argmax(-1)).float().mean()
    return {"ppl": float(nll.exp()), "kl": float(kl), "top1": float(agree)}
