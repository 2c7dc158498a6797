"""What is in a checkpoint: architecture, counts, bytes and problems, from headers alone."""

from __future__ import annotations

from pydantic import BaseModel

from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.names import Role
from k2mini.model.spec import ModelSpec
from k2mini.sizes import format_size

MAX_LISTED = 20


class DtypeCount(BaseModel):
    tensors: int
    bytes: int


class Architecture(BaseModel):
    model_type: str | None
    layers: int
    dense_layers: list[int]
    moe_layers: int
    routed_experts: int
    shared_experts: int
    experts_per_token: int
    n_group: int
    topk_group: int
    hidden_size: int
    moe_intermediate_size: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_heads: int
    vocab_size: int
    quantization: str | None


class InspectReport(BaseModel):
    source: str
    architecture: Architecture
    tensors: int
    shards: int
    dtypes: dict[str, DtypeCount]
    params: int
    params_by_role: dict[str, int]
    tensor_bytes: int
    bf16_bytes: int
    problems: list[str]

    def render(self) -> str:
        a = self.architecture
        lines = [
            f"source        {self.source}",
            f"model_type    {a.model_type}   quantization {a.quantization or 'none'}",
            f"layers        {a.layers} ({len(a.dense_layers)} dense: {a.dense_layers}, {a.moe_layers} MoE)",
            f"experts       {a.routed_experts} routed + {a.shared_experts} shared, top-{a.experts_per_token}, "
            f"groups {a.n_group} (top {a.topk_group})",
            f"MLA           hidden {a.hidden_size}, heads {a.attention_heads}, q_lora {a.q_lora_rank}, kv_lora {a.kv_lora_rank}, "
            f"qk {a.qk_nope_head_dim}+{a.qk_rope_head_dim}, v {a.v_head_dim}",
            f"tensors       {self.tensors} in {self.shards} shard(s)",
            "dtypes        " + ", ".join(f"{k}: {v.tensors} ({format_size(v.bytes, binary=True)})" for k, v in sorted(self.dtypes.items())),
            f"parameters    {self.params:,} ({self.params / 1e9:.3f} B)",
            f"bytes         {format_size(self.tensor_bytes, binary=True)} stored, {format_size(self.bf16_bytes, binary=True)} as BF16",
        ]
        if self.problems:
            lines.append(f"problems      {len(self.problems)}")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("problems      none found")
        return "\n".join(lines)


def inspect_checkpoint(ck: Checkpoint) -> InspectReport:
    cfg = ck.config
    spec = ModelSpec.from_config(cfg)
    dtypes: dict[str, DtypeCount] = {}
    params = 0
    by_role: dict[str, int] = {}
    for t in ck.tensors.values():
        d = dtypes.setdefault(t.dtype, DtypeCount(tensors=0, bytes=0))
        d.tensors += 1
        d.bytes += t.nbytes
        if not t.parsed.is_scale and t.parsed.role is not Role.INV_FREQ:
            params += t.numel
            by_role[t.parsed.role.value] = by_role.get(t.parsed.role.value, 0) + t.numel
    problems = [p.message for p in ck.problems]
    problems += _compare_with_config(ck, spec)
    if len(problems) > MAX_LISTED:
        problems = problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more"]
    qc = cfg.get("quantization_config") or {}
    arch = Architecture(
        model_type=cfg.get("model_type"),
        layers=spec.num_hidden_layers,
        dense_layers=spec.dense_layers,
        moe_layers=len(spec.moe_layers),
        routed_experts=spec.n_routed_experts,
        shared_experts=spec.n_shared_experts,
        experts_per_token=spec.num_experts_per_tok,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        hidden_size=spec.hidden_size,
        moe_intermediate_size=spec.moe_intermediate_size,
        q_lora_rank=spec.q_lora_rank,
        kv_lora_rank=spec.kv_lora_rank,
        qk_nope_head_dim=spec.qk_nope_head_dim,
        qk_rope_head_dim=spec.qk_rope_head_dim,
        v_head_dim=spec.v_head_dim,
        attention_heads=spec.num_attention_heads,
        vocab_size=spec.vocab_size,
        quantization=qc.get("quant_method") or qc.get("format"),
    )
    return InspectReport(
        source=ck.description,
        architecture=arch,
        tensors=len(ck.tensors),
        shards=len({t.file for t in ck.tensors.values()}),
        dtypes=dtypes,
        params=params,
        params_by_role=by_role,
        tensor_bytes=ck.total_bytes(),
        bf16_bytes=params * 2,
        problems=problems,
    )


def _compare_with_config(ck: Checkpoint, spec: ModelSpec) -> list[str]:
    """Missing, unexpected and mis-shaped tensors against what config.json implies.

    Only for FP8 and plain BF16 checkpoints; quantized formats (compressed-tensors) rename
    weights and are checked by ``k2mini validate``.
    """
    qc = ck.config.get("quantization_config") or {}
    if qc and qc.get("quant_method") != "fp8":
        return []
    out = []
    expected = {t.name: t for t in spec.tensors()}
    for name, e in expected.items():
        t = ck.tensors.get(name)
        if t is None:
            out.append(f"missing tensor {name} (config implies {e.dtype}{list(e.shape)})")
        elif t.shape != e.shape:
            out.append(f"tensor {name} in {t.file} is {list(t.shape)} but config implies {list(e.shape)}")
        elif (t.dtype == "F8_E4M3") != (e.dtype == "F8_E4M3"):
            out.append(f"tensor {name} in {t.file} is {t.dtype} but config implies {e.dtype}")
    for name, t in ck.tensors.items():
        if name in expected or t.parsed.role is Role.INV_FREQ:
            continue
        if t.parsed.layer is not None and t.parsed.layer >= spec.num_hidden_layers:
            out.append(f"unexpected tensor {name} in {t.file}: layer {t.parsed.layer} >= num_hidden_layers {spec.num_hidden_layers} (MTP layer?)")
        else:
            out.append(f"unexpected tensor {name} in {t.file}")
    return out
