"""plan.json: which source layers and experts a reduced checkpoint keeps, and why.

``convert`` writes the plan it used into the output; ``convert --plan plan.json`` replays
it (same layers, experts and config fields) on the same or an identical source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from k2mini.analysis.schema import SourceFingerprint
from k2mini.errors import UsageError
from k2mini.model.spec import ModelSpec
from k2mini.versioned_file import load_versioned

PLAN_VERSION = 1
PLAN_FILE = "plan.json"

GroupPolicy = Literal["none", "per-group", "flatten"]


class ExpertSelection(BaseModel):
    """One kept MoE layer: output expert i is source expert ``kept[i]``."""

    source_layer: int
    kept: list[int]
    # The strategy's score for every source expert (higher = more worth keeping), when it has one.
    scores: list[float] | None = None
    # convert --merge: output expert i is sum_j w_j * source expert e_j over
    # merge[i] = [(e_j, w_j), ...]; the kept expert kept[i] comes first, the weights sum to 1.
    merge: list[list[tuple[int, float]]] | None = None


class PlanConfig(BaseModel):
    """The config fields of the reduced checkpoint that the selection decides."""

    num_hidden_layers: int
    first_k_dense_replace: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int


class Plan(BaseModel):
    version: int = PLAN_VERSION
    tool_version: str
    source: SourceFingerprint
    layer_strategy: str
    expert_strategy: str
    layers: list[int]  # kept source layers, in output order
    layer_scores: list[float] | None = None  # per source layer, when the strategy has scores
    experts: list[ExpertSelection]  # one per kept MoE layer, in output order
    # n_group > 1 sources: "per-group" keeps an equal count from every group (routing groups
    # kept); "flatten" sets n_group = topk_group = 1 (plain top-k over the kept experts).
    group_policy: GroupPolicy
    config: PlanConfig
    analysis: str | None = None  # analysis file the scores came from
    merge_similarity: str | None = None  # "router" when pruned experts were merged (ExpertSelection.merge)
    # Output weights as convert --dtype names them (bf16, fp8, int8, int4, int4-g64, ...);
    # None: convert's default. `convert --plan` writes it unless --dtype says otherwise.
    dtype: str | None = None
    notes: list[str] = Field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1) + "\n")

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return load_versioned(cls, path, flag="--plan", version=PLAN_VERSION, what="plan")

    def expert_map(self) -> dict[str, list[int]]:
        """Output layer index -> kept source experts (the provenance block's expert map)."""
        pos = {src: i for i, src in enumerate(self.layers)}
        return {str(pos[e.source_layer]): e.kept for e in self.experts}

    def check(self, spec: ModelSpec, *, where: str = "plan") -> None:
        """Refuse a plan that does not fit the source or would give an inconsistent config."""
        L, E = spec.num_hidden_layers, spec.n_routed_experts
        if not self.layers:
            raise UsageError(f"{where}: keeps no layers")
        for l in self.layers:
            if not 0 <= l < L:
                raise UsageError(f"{where}: layer {l} does not exist (the source has layers 0..{L - 1})")
        if len(set(self.layers)) != len(self.layers) or self.layers != sorted(self.layers):
            raise UsageError(f"{where}: kept layers must be distinct and in increasing order, got {self.layers}")
        kinds = [spec.is_moe(l) for l in self.layers]
        n_dense = kinds.index(True) if True in kinds else len(kinds)
        if any(not k for k in kinds[n_dense:]):
            raise UsageError(f"{where}: a dense layer would follow an MoE layer; DeepseekV3 needs the dense layers first")
        moe = [l for l in self.layers if spec.is_moe(l)]
        if [e.source_layer for e in self.experts] != moe:
            raise UsageError(f"{where}: expert lists are for layers {[e.source_layer for e in self.experts]} but the kept MoE layers are {moe}")
        c = self.config
        counts = {len(e.kept) for e in self.experts}
        if len(counts) > 1:
            raise UsageError(f"{where}: every MoE layer must keep the same number of experts, got {sorted(counts)}")
        for e in self.experts:
            bad = [x for x in e.kept if not 0 <= x < E]
            if bad:
                raise UsageError(f"{where}: layer {e.source_layer}: expert {bad[0]} does not exist (the source has experts 0..{E - 1})")
            if len(set(e.kept)) != len(e.kept):
                raise UsageError(f"{where}: layer {e.source_layer}: an expert is listed twice")
            if e.merge is not None:
                _check_merge(e, E, where)
        n = counts.pop() if counts else c.n_routed_experts
        if (c.num_hidden_layers, c.first_k_dense_replace, c.n_routed_experts) != (len(self.layers), n_dense, n):
            raise UsageError(
                f"{where}: config says {c.num_hidden_layers} layers / {c.first_k_dense_replace} dense / {c.n_routed_experts} experts "
                f"but the selection gives {len(self.layers)} / {n_dense} / {n}"
            )
        if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
            raise UsageError(f"{where}: num_experts_per_tok={c.num_experts_per_tok} must be between 1 and n_routed_experts={c.n_routed_experts}")
        if c.n_group < 1 or c.n_routed_experts % c.n_group or not 1 <= c.topk_group <= c.n_group:
            raise UsageError(f"{where}: n_group={c.n_group}, topk_group={c.topk_group} do not fit {c.n_routed_experts} experts")
        if c.n_group > 1:
            if (c.n_group, c.topk_group) != (spec.n_group, spec.topk_group):
                raise UsageError(f"{where}: with groups kept, n_group/topk_group must stay {spec.n_group}/{spec.topk_group}")
            per = c.n_routed_experts // c.n_group
            size = E // spec.n_group
            for e in self.experts:
                got = [sum(1 for x in e.kept if x // size == g) for g in range(spec.n_group)]
                if got != [per] * spec.n_group:
                    raise UsageError(f"{where}: layer {e.source_layer}: per-group policy needs {per} experts from each group, got {got}")
                if e.kept != sorted(e.kept):
                    raise UsageError(f"{where}: layer {e.source_layer}: with groups kept, experts must be in increasing order")


def _check_merge(e: ExpertSelection, n_experts: int, where: str) -> None:
    at = f"{where}: layer {e.source_layer}: merge groups"
    if len(e.merge) != len(e.kept):
        raise UsageError(f"{at}: {len(e.merge)} groups for {len(e.kept)} kept experts")
    seen: set[int] = set()
    for k, group in zip(e.kept, e.merge):
        if not group or group[0][0] != k:
            raise UsageError(f"{at}: the group of output expert {k} must start with expert {k} itself")
        for x, w in group:
            if not 0 <= x < n_experts:
                raise UsageError(f"{at}: expert {x} does not exist (the source has experts 0..{n_experts - 1})")
            if x in seen or (x != k and x in e.kept):
                raise UsageError(f"{at}: expert {x} is folded in twice or is also kept")
            if not w > 0:
                raise UsageError(f"{at}: expert {x} has weight {w} (must be > 0)")
            seen.add(x)
        if abs(sum(w for _, w in group) - 1.0) > 1e-6:
            raise UsageError(f"{at}: the weights of output expert {k} sum to {sum(w for _, w in group)}, not 1")
