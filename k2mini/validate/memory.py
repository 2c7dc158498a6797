"""Memory plan: weights + KV cache + activation headroom against a GPU profile.

Weights come from the safetensors headers (what is on disk is what vLLM keeps resident)
or, for a checkpoint that does not exist yet, from the config alone through ModelSpec.
The KV cache is given in both layouts DeepseekV3 engines use:

- MLA latent: ``kv_lora_rank + qk_rope_head_dim`` values per token per layer (vLLM and
  SGLang MLA backends; transformers 5 also caches the latent and expands per layer);
- expanded per head: ``heads * (qk_nope + qk_rope + v_head_dim)`` per token per layer
  (transformers 4.x, and attention backends without MLA weight absorption).
"""

from __future__ import annotations

from typing import Any

from k2mini.checkpoint.reader import Checkpoint
from k2mini.model.fp8_layout import modules_to_not_convert
from k2mini.model.spec import ModelSpec, is_projection
from k2mini.quantize import auto_group_size
from k2mini.validate.gpus import GpuProfile
from k2mini.validate.report import KVCache, MemoryPlan

DEFAULT_PREFILL_CHUNK = 2048
_TAG_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I32": 4, "I64": 8, "I8": 1, "U8": 1}

ACTIVATION_FORMULA = (
    "tokens_in_flight * 2 B * (4*hidden + heads*(qk_nope+qk_rope+v_head) + max(3*intermediate, "
    "3*moe_intermediate*(experts_per_tok + n_shared))) + batch * vocab * 4 B (last-position logits) "
    "+ one layer's expanded K/V for the whole context (batch*context*heads*(qk+v)*2 B, materialised by attention); "
    "tokens_in_flight = batch * min(context, prefill_chunk)"
)


def _cfg_int(cfg: dict[str, Any], key: str, default: int = 0) -> int:
    v = cfg.get(key)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else default


def kv_cache(cfg: dict[str, Any], context: int, batch: int, dtype_bytes: int = 2) -> KVCache:
    layers = _cfg_int(cfg, "num_hidden_layers")
    heads = _cfg_int(cfg, "num_attention_heads")
    latent = layers * (_cfg_int(cfg, "kv_lora_rank") + _cfg_int(cfg, "qk_rope_head_dim")) * dtype_bytes
    qk = _cfg_int(cfg, "qk_nope_head_dim") + _cfg_int(cfg, "qk_rope_head_dim")
    expanded = layers * heads * (qk + _cfg_int(cfg, "v_head_dim")) * dtype_bytes
    return KVCache(context=context, batch=batch, dtype_bytes=dtype_bytes, latent_bytes_per_token=latent,
                   expanded_bytes_per_token=expanded, latent_bytes=latent * context * batch,
                   expanded_bytes=expanded * context * batch)


def activation_bytes(cfg: dict[str, Any], context: int, batch: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
    h = _cfg_int(cfg, "hidden_size")
    heads = _cfg_int(cfg, "num_attention_heads")
    qk = _cfg_int(cfg, "qk_nope_head_dim") + _cfg_int(cfg, "qk_rope_head_dim")
    v = _cfg_int(cfg, "v_head_dim")
    mlp = max(3 * _cfg_int(cfg, "intermediate_size"),
              3 * _cfg_int(cfg, "moe_intermediate_size") * (_cfg_int(cfg, "num_experts_per_tok") + _cfg_int(cfg, "n_shared_experts")))
    tokens = batch * min(context, prefill_chunk)
    per_token = 2 * (4 * h + heads * (qk + v) + mlp)
    one_layer_kv = batch * context * heads * (qk + v) * 2
    return tokens * per_token + batch * _cfg_int(cfg, "vocab_size") * 4 + one_layer_kv


def weights_from_config(cfg: dict[str, Any], dtype: str = "bf16", group_size: int | str | None = "auto") -> dict[str, int]:
    """Bytes per safetensors dtype of a checkpoint of ``cfg`` written as bf16, fp8, int8 or int4.

    int4/int8 follow compressed-tensors pack-quantized: every projection packed into int32
    words, BF16 scales per group (per row for ``group_size=None``; "auto": quantize's INT4
    default, per tensor), an int64 weight_shape; router, embeddings, lm_head and norms stay BF16.
    """
    base = {k: v for k, v in cfg.items() if k != "quantization_config"}
    spec = ModelSpec.from_config(base)
    if dtype == "fp8":
        # As convert --dtype fp8 writes it: modules transformers cannot load as FP8 stay BF16.
        base["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128],
                                       "modules_to_not_convert": list(modules_to_not_convert(spec))}
        return ModelSpec.from_config(base).bytes_by_dtype()
    if dtype == "bf16":
        return spec.bytes_by_dtype()
    bits = {"int4": 4, "int8": 8}[dtype]
    out: dict[str, int] = {}
    for t in spec.tensors():
        if is_projection(t.name):
            rows, cols = t.shape
            g = group_size
            if group_size == "auto":  # quantize's defaults: INT4 per tensor, INT8 per channel
                g = auto_group_size(t.shape, ".mlp.experts." in t.name) if bits == 4 else None
            groups = 1 if g is None else cols // g
            out["I32"] = out.get("I32", 0) + rows * -(-cols * bits // 32) * 4
            out["BF16"] = out.get("BF16", 0) + rows * groups * 2
            out["I64"] = out.get("I64", 0) + 16
        else:
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
    return out


def weights_from_headers(ck: Checkpoint) -> dict[str, int]:
    from k2mini.checkpoint.names import Role

    out: dict[str, int] = {}
    for t in ck.tensors.values():
        if t.parsed.role is not Role.INV_FREQ:
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
    return out


def transformers_resident(cfg: dict[str, Any], by_dtype: dict[str, int], params: int, profile: GpuProfile) -> tuple[int, list[str]]:
    """Bytes transformers holds after loading, and why it differs from the bytes on disk."""
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    stored = sum(by_dtype.values())
    if method == "compressed-tensors":
        # transformers unpacks the per-expert packed tensors into its fused BF16 experts at
        # load time and decompresses packed Linear modules on the first forward pass.
        f32 = by_dtype.get("F32", 0)
        return (params - f32 // 4) * 2 + f32, ["transformers decompresses compressed-tensors weights to BF16 "
                                  "(experts at load, Linear modules on the first forward); vLLM keeps them packed"]
    if method == "fp8" and not (profile.kind == "cuda" and profile.fp8_native):
        fp8 = by_dtype.get("F8_E4M3", 0)
        return stored + fp8, [f"{profile.name} has no FP8 compute: transformers dequantizes FP8 weights to BF16 at load"]
    return stored, []


def memory_plan(
    cfg: dict[str, Any],
    profile: GpuProfile,
    *,
    context: int,
    batch: int,
    ck: Checkpoint | None = None,
    dtype: str = "bf16",
    group_size: int | str | None = "auto",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> MemoryPlan:
    """The plan for ``cfg`` on ``profile``; with ``ck``, weights are read from its headers."""
    if ck is not None:
        from k2mini.validate.static import params_from_headers

        by_dtype, source, params = weights_from_headers(ck), "headers", params_from_headers(ck)
    else:
        by_dtype, source = weights_from_config(cfg, dtype, group_size), "config"
        params = ModelSpec.from_config({k: v for k, v in cfg.items() if k != "quantization_config"}).param_count()
        if dtype != "bf16":
            cfg = {**cfg, "quantization_config": {"quant_method": "fp8" if dtype == "fp8" else "compressed-tensors"}}
    weights = sum(by_dtype.values())
    tf_weights, notes = transformers_resident(cfg, by_dtype, params, profile)
    kv = kv_cache(cfg, context, batch)
    act = activation_bytes(cfg, context, batch, prefill_chunk)
    reserved = profile.reserved_bytes
    need_latent = weights + kv.latent_bytes + act + reserved
    need_expanded = tf_weights + kv.expanded_bytes + act + reserved
    total = profile.memory_bytes
    if profile.kind == "cpu":
        notes.append("cpu profile: this machine's physical RAM")
    notes.append("transformers 5 caches the MLA latent like vLLM; the expanded layout is transformers 4.x's cache")
    return MemoryPlan(
        gpu=profile.name, memory_bytes=total, reserved_bytes=reserved, params=params, weights_source=source,
        weights_by_dtype=dict(sorted(by_dtype.items())), weights_bytes=weights, transformers_weights_bytes=tf_weights,
        kv=kv, activation_bytes=act, activation_formula=ACTIVATION_FORMULA.replace("prefill_chunk", str(prefill_chunk)),
        needed_latent_bytes=need_latent, needed_expanded_bytes=need_expanded,
        fits_latent=need_latent <= total, fits_expanded=need_expanded <= total, notes=notes,
    )



def reduced_config(cfg: dict[str, Any], layers: int, experts: int) -> dict[str, Any]:
    """The docs/facts.md §4 config of ``cfg`` cut to ``layers`` x ``experts`` (no weights needed)."""
    out = {k: v for k, v in cfg.items() if k not in ("auto_map", "quantization_config")}
    n_group = int(cfg.get("n_group") or 1)
    if experts % n_group or experts // n_group < 2:
        n_group = 1
    out.update(model_type="deepseek_v3", num_hidden_layers=layers, n_routed_experts=experts,
               first_k_dense_replace=min(int(cfg.get("first_k_dense_replace") or 0), layers),
               num_experts_per_tok=min(int(cfg["num_experts_per_tok"]), experts), n_group=n_group,
               topk_group=min(int(cfg.get("topk_group") or 1), n_group), num_nextn_predict_layers=0)
    return out


def plan_variants(cfg: dict[str, Any], profile: GpuProfile, *, context: int, batch: int,
                  dtypes: tuple[str, ...] = ("bf16", "fp8", "int4"), group_size: int | str | None = "auto") -> dict[str, MemoryPlan]:
    """One plan per output dtype, all from the config alone."""
    return {d: memory_plan(cfg, profile, context=context, batch=batch, dtype=d, group_size=group_size) for d in dtypes}
