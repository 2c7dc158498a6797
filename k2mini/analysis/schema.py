"""analysis.json: the typed, versioned result of ``k2mini analyze``.

One analysis serves any pruning ratio: ``convert --analysis`` reads these scores and
selects at whatever --layers/--experts the user asks for, without re-running calibration.
Layer indices are source layer indices; expert lists are indexed by source expert id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from k2mini.versioned_file import load_versioned

ANALYSIS_VERSION = 1


class SourceFingerprint(BaseModel):
    location: str
    config_sha256: str
    index_sha256: str | None
    num_hidden_layers: int
    n_routed_experts: int

    @classmethod
    def of(cls, ck) -> SourceFingerprint:
        """The fingerprint of an open Checkpoint (hashes of config.json and the index)."""
        cfg = ck.source.read_bytes("config.json")
        idx = ck.source.read_bytes(ck.index_file) if ck.index_file else None
        return cls(
            location=ck.description,
            config_sha256=hashlib.sha256(cfg).hexdigest(),
            index_sha256=hashlib.sha256(idx).hexdigest() if idx is not None else None,
            num_hidden_layers=int(ck.config["num_hidden_layers"]),
            n_routed_experts=int(ck.config.get("n_routed_experts") or 0),
        )

    def same_weights(self, other: SourceFingerprint) -> bool:
        """Same config and tensor index (the location may differ: a copy or a Hub mirror)."""
        return (self.config_sha256, self.index_sha256) == (other.config_sha256, other.index_sha256)


class CalibrationSource(BaseModel):
    name: str  # "builtin:prose", "builtin:code", or a file path
    samples: int


class CalibrationInfo(BaseModel):
    sources: list[CalibrationSource]
    samples: int
    seq_len: int
    seed: int
    tokens: int


class ExpertStats(BaseModel):
    """Per routed expert of one MoE layer, computed with K2's real routing on routed tokens only.

    g_j(x) is the routing weight after top-k normalisation and routed_scaling_factor;
    f_j(x) the expert's output for token x.
    """

    frequency: list[int]  # |X_j|: tokens routed to j
    mean_weight: list[float]  # mean g_j over X_j (0 when |X_j| = 0)
    reap: list[float]  # (1/|X_j|) sum_{X_j} g_j(x) ||f_j(x)||
    ean: list[float]  # sum_{X_j} ||f_j(x)||
    max_activation: list[float]  # max over X_j of max |f_j(x)| ("super experts")
    # Weight-only proxies (no data): router row L2 norm, correction bias, expert weight norm.
    router_norm: list[float] | None = None
    correction_bias: list[float] | None = None
    weight_norm: list[float] | None = None
    # Greedy backward elimination on the block's routed output with re-routing
    # (analysis/output_error.py): expert ids, first = removed first; keep the last n.
    # None in files from before it existed or from ``analyze --no-output-error``.
    output_error_order: list[int] | None = None
    # Relative squared error of the routed output along that order: entry i with its first i
    # experts removed (i = 0 .. E - top_k); ``k2mini plan`` scores expert counts by it.
    output_error_residual: list[float] | None = None


class LayerStats(BaseModel):
    layer: int
    kind: Literal["dense", "moe"]
    block_influence: float  # 1 - mean_t cos(h_l(t), h_{l+1}(t))
    hidden_norm: float  # mean ||h_{l+1}(t)|| over calibration tokens
    nll_increase: float | None = None  # calibration NLL(skip l) - NLL(full), when computed
    experts: ExpertStats | None = None


class Analysis(BaseModel):
    version: int = ANALYSIS_VERSION
    tool_version: str
    source: SourceFingerprint
    calibration: CalibrationInfo
    layers: list[LayerStats]
    # angular_distance[str(n)][l] = arccos(cos(h_l, h_{l+n})) / pi on the last token,
    # averaged over samples, for l = 0..L-n (h_0 = embeddings, h_L = last layer's output).
    angular_distance: dict[str, list[float]] = Field(default_factory=dict)
    baseline_nll: float | None = None
    output_error_tokens: int | None = None  # calibration tokens the output-error orders were computed on

    def has_nll_increase(self) -> bool:
        """Whether every layer has its skip-layer NLL increase (analyze --nll)."""
        return bool(self.layers) and all(s.nll_increase is not None for s in self.layers)

    def has_output_error(self) -> bool:
        """Whether every MoE layer has an output-error elimination order."""
        moe = [s for s in self.layers if s.experts is not None]
        return bool(moe) and all(s.experts.output_error_order is not None for s in moe)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        return load_versioned(cls, path, flag="--analysis", version=ANALYSIS_VERSION, what="analysis")
