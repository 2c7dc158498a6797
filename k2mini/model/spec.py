"""From a Kimi-K2 / DeepSeek-V3 config to the exact list of tensors it implies.

Used to find missing or unexpected tensors (inspect, validate), to count parameters and
bytes without reading weights (convert --dry-run, the memory plan), and to generate
fixtures of any size.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from k2mini.checkpoint.fp8_grid import scale_grid_shape
from k2mini.checkpoint.names import Role, expert_prefix, layer_prefix, parse_name, router_bias, router_weight, scale_name
from k2mini.errors import CheckpointError
from k2mini.model.fp8_layout import hf_module, is_skipped

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}

# Config fields that feed arithmetic, with the range a real model can have. Values
# outside these are refused rather than used to size allocations.
_INT_FIELDS = {
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "moe_intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 4096),
    "num_attention_heads": (1, 4096),
    "n_routed_experts": (1, 1 << 16),
    "num_experts_per_tok": (1, 1 << 16),
    "vocab_size": (1, 1 << 24),
    "kv_lora_rank": (1, 1 << 16),
    "qk_nope_head_dim": (0, 1 << 12),
    "qk_rope_head_dim": (0, 1 << 12),
    "v_head_dim": (1, 1 << 12),
}


# Optional fields (None or absent means the default) and their ranges; bounds may name
# another field. Each feeds a range(), a tensor shape or a tensor view somewhere.
_OPTIONAL_INT_FIELDS = {
    "first_k_dense_replace": (0, "num_hidden_layers"),
    "moe_layer_freq": (0, "num_hidden_layers"),
    "n_shared_experts": (0, 64),
    "n_group": (0, "n_routed_experts"),
    "topk_group": (0, "n_group"),
    "num_nextn_predict_layers": (0, 16),
}
# Expected-tensor count grows with layers x experts; K2 has 61 x 384 (11x below the limit). Far beyond is an
# attack on the tools that enumerate every expected tensor (inspect, validate, plans).
_MAX_LAYER_EXPERTS = 1 << 18


def _check_derived_fields(cfg: dict[str, Any]) -> None:
    def bound(b: int | str) -> int:
        return b if isinstance(b, int) else int(cfg.get(b) or 1)

    for key, (lo, hi) in _OPTIONAL_INT_FIELDS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not bound(lo) <= v <= bound(hi):
            raise CheckpointError(f"config.json: {key}={reprlib.repr(v)} is not an integer in [{bound(lo)}, {bound(hi)}]")
    n_group = cfg.get("n_group") or 1
    if cfg["n_routed_experts"] % n_group:
        raise CheckpointError(f"config.json: n_routed_experts={cfg['n_routed_experts']} is not divisible by n_group={n_group}")
    if cfg["num_experts_per_tok"] > cfg["n_routed_experts"]:
        raise CheckpointError(
            f"config.json: num_experts_per_tok={cfg['num_experts_per_tok']} exceeds n_routed_experts={cfg['n_routed_experts']}"
        )
    if cfg["num_hidden_layers"] * cfg["n_routed_experts"] > _MAX_LAYER_EXPERTS:
        raise CheckpointError(
            f"config.json: {cfg['num_hidden_layers']} layers x {cfg['n_routed_experts']} experts exceeds {_MAX_LAYER_EXPERTS}"
        )
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"config.json: quantization_config must be an object, not {type(qc).__name__}")
    if isinstance(qc, dict) and not isinstance(qc.get("weight_block_size", []), list):
        raise CheckpointError(f"config.json: weight_block_size={reprlib.repr(qc.get('weight_block_size'))} is not a list")
    rope = cfg.get("rope_scaling")
    if rope is not None and not isinstance(rope, dict):
        raise CheckpointError(f"config.json: rope_scaling must be an object, not {type(rope).__name__}")
    factor = (rope or {}).get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor <= 1e4):
        raise CheckpointError(f"config.json: rope_scaling.factor={reprlib.repr(factor)} is outside [1, 10000]")
    for key in ("max_position_embeddings", "original_max_position_embeddings"):
        v = (rope or {}).get(key) if key.startswith("original") else cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 24):
            raise CheckpointError(f"config.json: {key}={reprlib.repr(v)} is not an integer in [1, {1 << 24}]")
    for key in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e12):
            raise CheckpointError(f"config.json: {key}={reprlib.repr(v)} is not a positive finite number")


@dataclass(frozen=True)
class ExpectedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag as stored in the checkpoint being described

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    """The architecture fields of a DeepSeek-V3-family config that decide tensor shapes."""

    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    moe_layer_freq: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    vocab_size: int
    tie_word_embeddings: bool
    has_correction_bias: bool
    fp8: bool  # projection weights stored as FP8 with block scales
    num_nextn_predict_layers: int = 0
    # fp8: quantization_config.modules_to_not_convert (transformers module patterns stored BF16)
    fp8_skip: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        for key, (lo, hi) in _INT_FIELDS.items():
            v = cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise CheckpointError(f"config.json: {key}={v!r} is missing or outside [{lo}, {hi}]")
        _check_derived_fields(cfg)
        q_lora = cfg.get("q_lora_rank")
        if q_lora is not None and (not isinstance(q_lora, int) or not 1 <= q_lora <= 1 << 16):
            raise CheckpointError(f"config.json: q_lora_rank={q_lora!r} is outside [1, 65536]")
        qc = cfg.get("quantization_config") or {}
        fp8 = qc.get("quant_method") == "fp8"
        if fp8 and list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
            raise CheckpointError(f"config.json: weight_block_size {qc.get('weight_block_size')} is not supported (only [128, 128])")
        # transformers' FineGrainedFP8Config reads ignored_layers as an alias when the list is absent.
        skip = qc.get("modules_to_not_convert") if qc.get("modules_to_not_convert") is not None else qc.get("ignored_layers")
        if fp8 and skip is not None and (not isinstance(skip, list) or not all(isinstance(p, str) for p in skip)):
            raise CheckpointError(
                f"config.json: quantization_config.modules_to_not_convert={reprlib.repr(skip)} is not a list of names")
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0) or 0),
            moe_layer_freq=int(cfg.get("moe_layer_freq", 1) or 1),
            num_attention_heads=cfg["num_attention_heads"],
            q_lora_rank=q_lora,
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            n_routed_experts=cfg["n_routed_experts"],
            n_shared_experts=int(cfg.get("n_shared_experts", 0) or 0),
            num_experts_per_tok=cfg["num_experts_per_tok"],
            n_group=int(cfg.get("n_group", 1) or 1),
            topk_group=int(cfg.get("topk_group", 1) or 1),
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            has_correction_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc",
            fp8=fp8,
            num_nextn_predict_layers=int(cfg.get("num_nextn_predict_layers", 0) or 0),
            fp8_skip=tuple(skip or ()) if fp8 else (),
        )

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe(i)]

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_moe(i)]

    def _linear(self, name: str, out_f: int, in_f: int) -> Iterator[ExpectedTensor]:
        if self.fp8 and not (self.fp8_skip and is_skipped(hf_module(name), self.fp8_skip)):
            yield ExpectedTensor(name, (out_f, in_f), "F8_E4M3")
            yield ExpectedTensor(scale_name(name), scale_grid_shape((out_f, in_f)), "F32")
        else:
            yield ExpectedTensor(name, (out_f, in_f), "BF16")

    def _mlp(self, prefix: str, inter: int) -> Iterator[ExpectedTensor]:
        h = self.hidden_size
        yield from self._linear(f"{prefix}.gate_proj.weight", inter, h)
        yield from self._linear(f"{prefix}.up_proj.weight", inter, h)
        yield from self._linear(f"{prefix}.down_proj.weight", h, inter)

    def layer_tensors(self, layer: int) -> Iterator[ExpectedTensor]:
        h, p = self.hidden_size, layer_prefix(layer).rstrip(".")
        heads, qk_head = self.num_attention_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        yield ExpectedTensor(f"{p}.input_layernorm.weight", (h,), "BF16")
        a = f"{p}.self_attn"
        if self.q_lora_rank is not None:
            yield from self._linear(f"{a}.q_a_proj.weight", self.q_lora_rank, h)
            yield ExpectedTensor(f"{a}.q_a_layernorm.weight", (self.q_lora_rank,), "BF16")
            yield from self._linear(f"{a}.q_b_proj.weight", heads * qk_head, self.q_lora_rank)
        else:
            yield from self._linear(f"{a}.q_proj.weight", heads * qk_head, h)
        yield from self._linear(f"{a}.kv_a_proj_with_mqa.weight", self.kv_lora_rank + self.qk_rope_head_dim, h)
        yield ExpectedTensor(f"{a}.kv_a_layernorm.weight", (self.kv_lora_rank,), "BF16")
        yield from self._linear(f"{a}.kv_b_proj.weight", heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank)
        yield from self._linear(f"{a}.o_proj.weight", h, heads * self.v_head_dim)
        yield ExpectedTensor(f"{p}.post_attention_layernorm.weight", (h,), "BF16")
        if not self.is_moe(layer):
            yield from self._mlp(f"{p}.mlp", self.intermediate_size)
            return
        yield ExpectedTensor(router_weight(layer), (self.n_routed_experts, h), "BF16")
        if self.has_correction_bias:
            yield ExpectedTensor(router_bias(layer), (self.n_routed_experts,), "F32")
        for e in range(self.n_routed_experts):
            yield from self._mlp(expert_prefix(layer, e).rstrip("."), self.moe_intermediate_size)
        if self.n_shared_experts:
            yield from self._mlp(f"{p}.mlp.shared_experts", self.moe_intermediate_size * self.n_shared_experts)

    def tensors(self) -> Iterator[ExpectedTensor]:
        """Every tensor a complete checkpoint of this config holds (inv_freq buffers excluded)."""
        h = self.hidden_size
        yield ExpectedTensor("model.embed_tokens.weight", (self.vocab_size, h), "BF16")
        for layer in range(self.num_hidden_layers):
            yield from self.layer_tensors(layer)
        yield ExpectedTensor("model.norm.weight", (h,), "BF16")
        if not self.tie_word_embeddings:
            yield ExpectedTensor("lm_head.weight", (self.vocab_size, h), "BF16")

    def param_count(self) -> int:
        """Parameters (scale grids are not parameters)."""
        return sum(t.numel for t in self.tensors() if not parse_name(t.name).is_scale)

    def param_breakdown(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors():
            pn = parse_name(t.name)
            if pn.is_scale:
                continue
            out[pn.role.value] = out.get(pn.role.value, 0) + t.numel
        return out

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return out


def is_projection(name: str) -> bool:
    """True for the Linear weights that K2 stores in FP8 (everything but router, embeddings, norms)."""
    return name.endswith(".weight") and parse_name(name).role in (
        Role.ATTN,
        Role.DENSE_MLP,
        Role.EXPERT,
        Role.SHARED_EXPERT,
    )
