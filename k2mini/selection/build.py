"""From options (and an analysis) to a checked Plan."""

from __future__ import annotations

from k2mini import __version__
from k2mini.analysis.schema import Analysis, SourceFingerprint
from k2mini.checkpoint.names import router_weight
from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.model.spec import ModelSpec
from k2mini.selection.context import SelectionContext, SelectOptions
from k2mini.selection import merge as merging
from k2mini.selection.experts import EXPERT_SCORERS, EXPLICIT, analysis_stats, expert_strategies, pick
from k2mini.selection.layers import LAYER_SELECTORS
from k2mini.selection.plan import ExpertSelection, Plan, PlanConfig


def _explicit_experts(o: SelectOptions, layer: int, E: int) -> list[int]:
    ke = o.keep_experts
    if ke is None:
        raise UsageError("--expert-strategy explicit needs --keep-experts 0,5,9,... (or L:ids;L:ids per layer)")
    ids = ke.get(layer) if isinstance(ke, dict) else ke
    if ids is None:
        raise UsageError(f"--keep-experts: no list for MoE layer {layer}")
    bad = [i for i in ids if not 0 <= i < E]
    if bad:
        raise UsageError(f"--keep-experts: expert {bad[0]} does not exist in layer {layer} (the source has experts 0..{E - 1})")
    if len(set(ids)) != len(ids):
        raise UsageError(f"--keep-experts: layer {layer} lists an expert twice")
    return sorted(ids)


def _merge_groups(ctx: SelectionContext, layer: int, kept: list[int]) -> list[list[tuple[int, float]]]:
    """Each pruned expert folded into the kept expert whose router row is closest (cosine),
    weighted by the analysis' routing frequencies (merge.merge_plan: (f + 1) / sum(f + 1))."""
    freq = analysis_stats(ctx, layer, "--merge").frequency
    if len(freq) != ctx.spec.n_routed_experts:
        raise UsageError(f"--analysis {ctx.analysis_path}: layer {layer} has {len(freq)} frequencies, "
                         f"the source has {ctx.spec.n_routed_experts} experts")
    sim = merging.router_similarity(ctx.ck.read(router_weight(layer)).float())
    groups = merging.merge_plan(kept, sim, [float(f) for f in freq])
    return [groups[k] for k in kept]


def build_plan(
    ck: Checkpoint,
    options: SelectOptions,
    analysis: Analysis | None = None,
    analysis_path: str | None = None,
) -> Plan:
    spec = ModelSpec.from_config(ck.config)
    o = options
    fingerprint = SourceFingerprint.of(ck)
    if analysis is not None and not analysis.source.same_weights(fingerprint):
        raise UsageError(f"--analysis {analysis_path}: computed on another checkpoint ({analysis.source.location}; config or index differ)")
    _check_strategies(o)
    n_layers = _layer_count(o, spec.num_hidden_layers)
    n_exp, top_k = _expert_counts(o, spec.n_routed_experts, spec.num_experts_per_tok)

    if o.merge is not None and analysis is None:
        raise UsageError("--merge needs --analysis analysis.json (its routing frequencies weight each merge)")
    ctx = SelectionContext(ck, spec, o, analysis, analysis_path)
    choice = LAYER_SELECTORS[o.layer_strategy](ctx, n_layers)
    if len(choice.layers) != n_layers and o.layer_strategy != "explicit":
        raise AssertionError(f"layer selector {o.layer_strategy} returned {len(choice.layers)} layers for {n_layers}")
    moe_layers = [l for l in choice.layers if spec.is_moe(l)]
    explicit_lists, n_exp = _explicit_experts_per_layer(o, moe_layers, spec.n_routed_experts, n_exp, top_k)
    notes = list(choice.notes or [])
    policy, n_group, topk_group = _group_policy(spec, o, n_exp, top_k, explicit_lists, notes)
    experts = _select_experts(ctx, moe_layers, explicit_lists, n_exp, n_group if policy == "per-group" else 1)

    n_dense = sum(1 for l in choice.layers if not spec.is_moe(l))
    plan = Plan(
        tool_version=__version__,
        source=fingerprint,
        layer_strategy=o.layer_strategy,
        expert_strategy=o.expert_strategy,
        layers=choice.layers,
        layer_scores=choice.scores,
        experts=experts,
        group_policy=policy,
        config=PlanConfig(
            num_hidden_layers=len(choice.layers),
            first_k_dense_replace=n_dense,
            n_routed_experts=n_exp,
            num_experts_per_tok=top_k,
            n_group=n_group,
            topk_group=topk_group,
        ),
        analysis=analysis_path,
        merge_similarity=o.merge if any(e.merge for e in experts) else None,
        notes=notes + ctx.notes,
    )
    plan.check(spec)
    return plan


def _check_strategies(o: SelectOptions) -> None:
    if o.layer_strategy not in LAYER_SELECTORS:
        raise UsageError(f"--layer-strategy {o.layer_strategy}: unknown (choose from {', '.join(sorted(LAYER_SELECTORS))})")
    if o.expert_strategy not in expert_strategies():
        raise UsageError(f"--expert-strategy {o.expert_strategy}: unknown (choose from {', '.join(expert_strategies())})")


def _layer_count(o: SelectOptions, L: int) -> int:
    """Layers to keep, from --layers or --keep-layers (checked against the source's L)."""
    if o.keep_layers is not None:
        bad = [l for l in o.keep_layers if not 0 <= l < L]
        if bad:
            raise UsageError(f"--keep-layers: layer {bad[0]} does not exist (the source has layers 0..{L - 1})")
        if len(set(o.keep_layers)) != len(o.keep_layers):
            raise UsageError("--keep-layers: a layer is listed twice")
        if o.layers is not None and o.layers != len(o.keep_layers):
            raise UsageError(f"--layers {o.layers} disagrees with the {len(o.keep_layers)} layers of --keep-layers")
    n_layers = o.layers if o.layers is not None else (len(o.keep_layers) if o.keep_layers else L)
    if n_layers > L:
        raise UsageError(f"--layers {n_layers} is above the source's {L} layers")
    if n_layers < 1:
        raise UsageError(f"--layers {n_layers} is below 1")
    return n_layers


def _expert_counts(o: SelectOptions, E: int, K: int) -> tuple[int, int]:
    """(experts kept per MoE layer, experts routed per token), checked against the source."""
    explicit_n = None
    if isinstance(o.keep_experts, list):
        explicit_n = len(o.keep_experts)
    elif isinstance(o.keep_experts, dict) and o.keep_experts:
        explicit_n = len(next(iter(o.keep_experts.values())))
    n_exp = o.experts if o.experts is not None else (explicit_n if o.expert_strategy == EXPLICIT and explicit_n else E)
    top_k = o.top_k if o.top_k is not None else K
    if n_exp > E:
        raise UsageError(f"--experts {n_exp} is above the source's n_routed_experts {E}")
    if top_k < 1:
        raise UsageError(f"--top-k {top_k} is below 1")
    if n_exp < top_k:
        raise UsageError(
            f"--experts {n_exp} is below num_experts_per_tok {top_k}; pass --top-k {n_exp} (or lower) to route to fewer experts"
        )
    return n_exp, top_k


def _explicit_experts_per_layer(o: SelectOptions, moe_layers: list[int], E: int, n_exp: int,
                                top_k: int) -> tuple[dict[int, list[int]], int]:
    """--keep-experts per MoE layer (empty for other strategies), and the count they fix."""
    explicit_lists = {l: _explicit_experts(o, l, E) for l in moe_layers} if o.expert_strategy == EXPLICIT else {}
    counts = {len(v) for v in explicit_lists.values()}
    if len(counts) > 1:
        raise UsageError(f"--keep-experts: every MoE layer must keep the same number of experts, got {sorted(counts)}")
    if counts:
        n_exp = counts.pop()
        if o.experts is not None and o.experts != n_exp:
            raise UsageError(f"--experts {o.experts} disagrees with the {n_exp} experts of --keep-experts")
        if n_exp < top_k:
            raise UsageError(f"--keep-experts keeps {n_exp} experts, below num_experts_per_tok {top_k}; pass --top-k to lower it")
    return explicit_lists, n_exp


def _group_policy(spec: ModelSpec, o: SelectOptions, n_exp: int, top_k: int, explicit_lists: dict[int, list[int]],
                  notes: list[str]) -> tuple[str, int, int]:
    """(policy, n_group, topk_group) of the reduced model; appends what it decided to ``notes``.

    Routing groups (docs/facts.md §2, §4): keep them only with an equal count per group, at
    least 2 per group (vLLM falls back to plain top-k otherwise) and enough experts in the
    topk_group best groups to fill top-k; else route over all kept experts."""
    G, TG, E = spec.n_group, spec.topk_group, spec.n_routed_experts
    if G <= 1:
        return "none", 1, 1
    per = n_exp // G
    ok = n_exp % G == 0 and per >= 2 and per * TG >= top_k
    if ok and explicit_lists:
        size = E // G
        ok = all([sum(1 for x in v if x // size == g) for g in range(G)] == [per] * G for v in explicit_lists.values())
    if o.groups == "keep" and not ok:
        raise UsageError(
            f"--groups keep: {n_exp} experts cannot be split into {G} routing groups of at least 2 "
            f"with {TG} groups covering top-k {top_k}; use --groups flatten or --experts a multiple of {G}"
        )
    if o.groups == "flatten" or not ok:
        notes.append(f"routing groups removed: n_group {G} -> 1, topk_group {TG} -> 1 (plain top-{top_k} over the kept experts)")
        return "flatten", 1, 1
    notes.append(f"routing groups kept: {per} experts from each of the {G} groups, topk_group {TG}")
    return "per-group", G, TG


def _select_experts(ctx: SelectionContext, moe_layers: list[int], explicit_lists: dict[int, list[int]], n_exp: int,
                    group_for_pick: int) -> list[ExpertSelection]:
    """Each MoE layer's kept experts (scored by the strategy unless listed), merge groups added."""
    o, E = ctx.options, ctx.spec.n_routed_experts
    experts = []
    for layer in moe_layers:
        if explicit_lists:
            sel = ExpertSelection(source_layer=layer, kept=explicit_lists[layer])
        else:
            scores = EXPERT_SCORERS[o.expert_strategy](ctx, layer)
            sel = ExpertSelection(source_layer=layer, kept=pick(scores, n_exp, group_for_pick), scores=scores)
        if o.merge is not None and len(sel.kept) < E:
            sel.merge = _merge_groups(ctx, layer, sel.kept)
        experts.append(sel)
    return experts


def check_plan_source(plan: Plan, ck: Checkpoint, path: str) -> None:
    """A replayed plan must come from the same weights (a copy or mirror is fine)."""
    if not plan.source.same_weights(SourceFingerprint.of(ck)):
        raise UsageError(f"--plan {path}: made for another checkpoint ({plan.source.location}; config or index differ)")
    plan.check(ModelSpec.from_config(ck.config), where=f"--plan {path}")
