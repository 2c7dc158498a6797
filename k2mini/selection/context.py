"""What every selector sees: the open source checkpoint, its spec, the analysis and options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from k2mini.analysis.schema import Analysis
from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.model.spec import ModelSpec


@dataclass
class SelectOptions:
    layers: int | None = None  # None: keep the source's count
    experts: int | None = None
    top_k: int | None = None  # None: the source's num_experts_per_tok
    layer_strategy: str = "uniform"
    expert_strategy: str = "weights"
    keep_layers: list[int] | None = None
    # explicit experts: one list for every MoE layer, or {source layer: list}
    keep_experts: list[int] | dict[int, list[int]] | None = None
    protect_ends: bool = True
    layer_metric: Literal["block_influence", "nll_increase"] = "block_influence"
    groups: Literal["auto", "keep", "flatten"] = "auto"
    merge: Literal["router"] | None = None  # fold pruned experts into kept ones (needs an analysis)


@dataclass
class SelectionContext:
    ck: Checkpoint
    spec: ModelSpec
    options: SelectOptions
    analysis: Analysis | None = None
    analysis_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def require_analysis(self, strategy: str) -> Analysis:
        if self.analysis is None:
            raise UsageError(f"strategy {strategy!r} needs --analysis analysis.json (from `k2mini analyze`)")
        return self.analysis
