"""A score for a cut without running it: what the analysis says its parts cost.

    proxy = sum over dropped layers of c_l
          + EXPERT_WEIGHT * sum over kept MoE layers of c_l * r_l(E)
          + QUANT_WEIGHT * sum over kept layers of c_l * q(dtype)

``c_l`` is layer l's skip-layer NLL increase (``analyze --nll``; negative ones count as 0),
the cost of removing all of it. ``r_l(E)`` is the relative squared error of the layer's
routed output with E experts kept, along the output-error order (``analyze`` records it):
1 would be the routed output gone, which is less than the whole layer gone, so this
charges an expert cut at most the layer's cost. ``q(dtype)`` is the relative squared weight
error of the format (``quantize.intq.roundtrip``) on a sample of the source's projections:
a weight perturbation of relative size sqrt(q) perturbs the layer's update by about as
much. All three are in nats of calibration NLL; the two weights were fitted to measured KL
on the nano K2 study (``analysis/study_plan.py``, which reports the rank correlation on the
models they were not fitted on).

Without an analysis (a config alone, e.g. Kimi-K2 before downloading it), every layer costs
the same (``c_l = 1``) and ``r(E) = 1 - E / n_experts`` (the share of routed experts
dropped); the quantization error comes from a Gaussian matrix of the experts' shape. That
prior is a guess and is reported as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from k2mini.analysis.schema import Analysis
from k2mini.model.spec import ModelSpec

# Weights of the expert-cut and quantization terms (the dropped-layer term has weight 1):
# fitted on the nano K2 plan study (analysis/study_plan.py, muon_balanced, 57 measured cuts
# at three budgets), where they raise the rank correlation of proxy and measured KL from
# 0.62 (all weights 1) to 0.98. r_l overstates an expert cut (the layer's attention and
# shared expert stay) and q overstates INT4 (errors of many weights average out).
EXPERT_WEIGHT = 0.3
QUANT_WEIGHT = 0.1

# Projections sampled for q(dtype): this many experts (gate/up/down) in each of at most
# _SAMPLE_LAYERS evenly spaced MoE layers (all 8 of the nano K2; 8 of K2's 60, 96 tensors,
# 1.4 GB of FP8), plus the attention output projection of the first MoE layer.
_SAMPLE_EXPERTS = 4
_SAMPLE_LAYERS = 8


@dataclass
class Proxy:
    layer_cost: list[float]  # c_l per source layer
    residual: dict[int, list[float]]  # MoE layer -> r_l with i experts removed, i = 0 .. E - top_k
    quant_error: dict[str, float]  # dtype -> q
    n_experts: int
    prior: bool  # True: no analysis, the data-free prior
    notes: list[str] = field(default_factory=list)

    def r(self, layer: int, experts: int) -> float:
        res = self.residual.get(layer)
        if res is None:
            return 1.0 - experts / self.n_experts
        return float(res[min(self.n_experts - experts, len(res) - 1)])

    def parts(self, kept: list[int], moe: set[int], experts: int, dtype: str) -> tuple[float, float, float]:
        """(dropped layers, expert cuts, quantization) terms of the score."""
        keep = set(kept)
        q = self.quant_error.get(dtype, 0.0)
        drop = cut = quant = 0.0
        for l, c in enumerate(self.layer_cost):
            if l not in keep:
                drop += c
            else:
                quant += c * q
                cut += c * self.r(l, experts) if l in moe else 0.0
        return drop, cut, quant

    def score(self, kept: list[int], moe: set[int], experts: int, dtype: str) -> float:
        drop, cut, quant = self.parts(kept, moe, experts, dtype)
        return drop + EXPERT_WEIGHT * cut + QUANT_WEIGHT * quant


def quant_error(dtype: str, weights: list[torch.Tensor], spec: ModelSpec) -> float:
    """Relative squared error ||W - roundtrip(W)||^2 / ||W||^2 summed over ``weights``."""
    if not dtype.startswith("int"):
        return 0.0  # bf16 and fp8 keep the source's values (fp8 copies the FP8 bytes)
    from k2mini.quantize import auto_group_size, intq
    from k2mini.quantize.convert_hook import CHOICES

    bits, group = CHOICES[dtype]
    err = ref = 0.0
    for w in weights:
        g = group if group is not None or bits == 8 else auto_group_size(tuple(w.shape), True)
        w32 = w.float()
        err += float((w32 - intq.roundtrip(w32, bits, g)).double().square().sum())
        ref += float(w32.double().square().sum())
    return err / ref if ref else 0.0


def sample_weights(ck, spec: ModelSpec) -> list[torch.Tensor]:
    """A few projections of the source: experts of up to 8 MoE layers, attention of the first."""
    moe = [l for l in range(spec.num_hidden_layers) if spec.is_moe(l)]
    out = []
    for l in moe[:: -(-len(moe) // _SAMPLE_LAYERS)]:
        for e in range(min(_SAMPLE_EXPERTS, spec.n_routed_experts)):
            out += [ck.read(f"model.layers.{l}.mlp.experts.{e}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
    o_proj = f"model.layers.{moe[0]}.self_attn.o_proj.weight"
    return out + ([ck.read(o_proj)] if o_proj in ck.tensors else [])


def gaussian_weights(cfg: dict) -> list[torch.Tensor]:
    """Stand-ins of an expert's shapes when there are no weights (config-only planning)."""
    g = torch.Generator().manual_seed(0)
    h, i = int(cfg["hidden_size"]), int(cfg["moe_intermediate_size"])
    return [torch.randn(i, h, generator=g), torch.randn(h, i, generator=g)]


def build_proxy(spec: ModelSpec, dtypes: tuple[str, ...], analysis: Analysis | None, weights: list[torch.Tensor]) -> Proxy:
    q = {d: quant_error(d, weights, spec) for d in dtypes}
    E = spec.n_routed_experts
    if analysis is None:
        return Proxy([1.0] * spec.num_hidden_layers, {}, q, E, prior=True,
                     notes=["no --analysis: scored by a prior (every layer costs the same, an expert cut costs the share of "
                            "experts dropped); run `k2mini analyze --nll` for a data-driven score"])
    notes = []
    by_layer = {s.layer: s for s in analysis.layers}
    if analysis.has_nll_increase():
        cost = [max(0.0, float(by_layer[l].nll_increase)) for l in range(spec.num_hidden_layers)]
    else:
        cost = [1.0] * spec.num_hidden_layers
        notes.append("the analysis has no skip-layer NLL (analyze --nll): every layer costs the same")
    residual = {}
    for l, s in by_layer.items():
        if s.experts is not None and s.experts.output_error_residual:
            residual[l] = s.experts.output_error_residual
    if not residual:
        notes.append("the analysis has no output-error residuals (analyze from before k2mini plan, or --no-output-error): "
                     "an expert cut costs the share of experts dropped")
    return Proxy(cost, residual, q, E, prior=False, notes=notes)
