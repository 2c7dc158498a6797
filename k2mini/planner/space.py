"""The cuts ``k2mini plan`` chooses among, and what each needs in memory.

A cut keeps ``layers`` decoder layers (the source's leading dense layers and ``layers -
dense`` MoE layers), ``experts`` routed experts in every kept MoE layer, and writes the
weights as ``dtype`` (convert's --dtype names). Its bytes come from validate's memory model
(``validate.memory.memory_plan`` on the cut's config): the same numbers ``k2mini validate
--gpu`` prints for the written output.

That model is exactly affine in (dense layers, MoE layers, MoE layers x experts): every
tensor belongs to one layer or to none, an MoE layer's tensors are a fixed part plus one
block per expert (router rows included), and the KV cache grows by a fixed amount per
layer. So ``MemoryModel`` evaluates ``memory_plan`` at four small anchor configs per dtype,
solves for the coefficients, and checks a fifth anchor exactly; scanning K2's 61 x 384 x 4
cuts then costs arithmetic instead of 90,000 walks over up to 139,000 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from k2mini.errors import UsageError
from k2mini.validate.gpus import GpuProfile
from k2mini.validate.memory import memory_plan, weights_from_config

# convert --dtype name -> (validate's dtype, group size for weights_from_config)
DTYPE_LAYOUT: dict[str, tuple[str, int | str | None]] = {
    "bf16": ("bf16", None), "fp8": ("fp8", None), "int8": ("int8", None),
    "int4": ("int4", "auto"), "int4-g64": ("int4", 64), "int4-g32": ("int4", 32),
}
DEFAULT_DTYPES = ("bf16", "fp8", "int8", "int4")


@dataclass(frozen=True, order=True)
class Cut:
    layers: int  # decoder layers kept (dense ones included)
    experts: int  # routed experts kept per MoE layer
    dtype: str  # convert --dtype name

    def label(self) -> str:
        return f"{self.layers}L x {self.experts}E {self.dtype}"


def cut_config(cfg: dict[str, Any], dense: int, moe: int, experts: int) -> dict[str, Any]:
    """The config of a cut with ``dense`` leading dense layers and ``moe`` MoE layers (what
    convert writes, as far as the memory model reads it)."""
    out = {k: v for k, v in cfg.items() if k not in ("auto_map", "quantization_config")}
    n_group = int(cfg.get("n_group") or 1)
    if experts % n_group or experts // n_group < 2:
        n_group = 1
    out.update(model_type="deepseek_v3", num_hidden_layers=dense + moe, first_k_dense_replace=dense,
               n_routed_experts=experts, num_experts_per_tok=min(int(cfg["num_experts_per_tok"]), experts),
               n_group=n_group, topk_group=min(int(cfg.get("topk_group") or 1), n_group), num_nextn_predict_layers=0)
    return out


@dataclass(frozen=True)
class _Affine:
    c0: Fraction
    dense: Fraction
    moe: Fraction
    expert: Fraction

    def at(self, dense: int, moe: int, experts: int) -> int:
        v = self.c0 + self.dense * dense + self.moe * moe + self.expert * moe * experts
        if v.denominator != 1:
            raise AssertionError(f"memory model is not integral at {dense}/{moe}/{experts}: {v}")
        return int(v)

    @classmethod
    def fit(cls, f, dense_src: int, top_k: int, e2: int) -> _Affine:
        a1, a2, a3 = f(dense_src, 1, top_k), f(dense_src, 2, top_k), f(dense_src, 1, e2)
        ce = Fraction(a3 - a1, e2 - top_k)
        cm = a2 - a1 - ce * top_k
        cd = Fraction(a1 - f(0, 1, top_k), dense_src) if dense_src else Fraction(0)
        c0 = a1 - cd * dense_src - cm - ce * top_k
        model = cls(Fraction(c0), cd, Fraction(cm), ce)
        check = (dense_src, 3, e2)
        if model.at(*check) != f(*check):
            raise AssertionError(f"memory model is not affine in layers and experts at {check}")
        return model


class MemoryModel:
    """Weights (and, with a GPU profile, the whole need) of every cut of one source config."""

    def __init__(self, cfg: dict[str, Any], dtypes: tuple[str, ...], *, profile: GpuProfile | None = None,
                 context: int = 8192, batch: int = 1):
        self.cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        self.profile, self.context, self.batch = profile, context, batch
        self.total_layers = int(cfg["num_hidden_layers"])
        self.dense = min(int(cfg.get("first_k_dense_replace") or 0), self.total_layers)
        self.n_experts = int(cfg.get("n_routed_experts") or 0)
        self.top_k = int(cfg.get("num_experts_per_tok") or 1)
        if not self.n_experts or self.total_layers <= self.dense:
            raise UsageError("plan: the source has no MoE layers to cut (n_routed_experts / first_k_dense_replace)")
        for d in dtypes:
            if d not in DTYPE_LAYOUT:
                raise UsageError(f"--dtypes {d}: unknown (choose from {', '.join(DTYPE_LAYOUT)})")
        e2 = self.n_experts if self.n_experts != self.top_k else self.top_k + 1
        self._weights = {d: _Affine.fit(lambda a, b, c, d=d: self._weights_exact(d, a, b, c), self.dense, self.top_k, e2) for d in dtypes}
        self._need = ({d: _Affine.fit(lambda a, b, c, d=d: self.exact_plan(d, a, b, c).needed_latent_bytes, self.dense, self.top_k, e2)
                       for d in dtypes} if profile is not None else {})

    def _weights_exact(self, dtype: str, dense: int, moe: int, experts: int) -> int:
        vd, group = DTYPE_LAYOUT[dtype]
        return sum(weights_from_config(cut_config(self.cfg, dense, moe, experts), vd, group if vd == "int4" else "auto").values())

    def exact_plan(self, dtype: str, dense: int, moe: int, experts: int):
        """validate's MemoryPlan of the cut (walks every tensor of its config)."""
        vd, group = DTYPE_LAYOUT[dtype]
        return memory_plan(cut_config(self.cfg, dense, moe, experts), self.profile, context=self.context, batch=self.batch,
                           dtype=vd, group_size=group if vd == "int4" else "auto")

    def split(self, cut: Cut) -> tuple[int, int]:
        """(dense, moe) layers of a cut: the leading dense layers are always kept."""
        return self.dense, cut.layers - self.dense

    def weights(self, cut: Cut) -> int:
        return self._weights[cut.dtype].at(*self.split(cut), cut.experts)

    def needed(self, cut: Cut) -> int:
        """Weights + MLA-latent KV cache at the context and batch + activations + reserved
        (validate's ``needed_latent_bytes``: what vLLM / SGLang hold)."""
        return self._need[cut.dtype].at(*self.split(cut), cut.experts)

    def max_experts(self, dtype: str, layers: int, capacity: int, *, weights_only: bool) -> int | None:
        """The most experts per MoE layer a cut of ``layers`` can keep within ``capacity``
        (None: not even top-k fit)."""
        model = (self._weights if weights_only else self._need)[dtype]
        dense, moe = self.dense, layers - self.dense
        fixed = model.c0 + model.dense * dense + model.moe * moe
        per = model.expert * moe
        e = min(self.n_experts, int((capacity - fixed) // per)) if per > 0 else self.n_experts
        return e if e >= self.top_k else None
