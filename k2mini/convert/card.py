"""README.md model card for a reduced checkpoint: provenance, the plan, how to load it, and
what it does not promise. Deterministic (no dates) so identical runs give identical files."""

from __future__ import annotations

from typing import Any

from k2mini.selection.plan import Plan


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _merge_section(plan: Plan) -> str:
    if not plan.merge_similarity:
        return ""
    rows = []
    for e in plan.experts:
        for k, group in zip(e.kept, e.merge or []):
            if len(group) > 1:
                rows.append(f"| {e.source_layer} | {k} | " + ", ".join(f"{m} ({w:.3f})" for m, w in group) + " |")
    return f"""
Merged experts (`--merge {plan.merge_similarity}`): each pruned expert was folded into the kept
expert whose router row is most similar (cosine); the output expert's gate/up/down weights are
the weighted sum below, weights (routing frequency + 1) / sum over the group. Router rows and
correction biases are the kept expert's own.

| source layer | kept expert | source experts (weight) |
|---|---|---|
{chr(10).join(rows)}
"""


def _fp8_line(quant: dict[str, Any]) -> str:
    line = "FP8 e4m3 block-scaled weights copied bit for bit from the source (`quantization_config` kept)"
    skip = [m for m in quant.get("modules_to_not_convert") or [] if m != "lm_head"]  # lm_head is BF16 in K2 too
    if skip:
        line += (f", except {len(skip)} modules stored BF16 (dequantized; listed in `modules_to_not_convert`): their "
                 "shapes are not whole 128x128 blocks, which transformers' FP8 loader cannot read, or they share a "
                 "fused GEMM with such a module in vLLM")
    return line


def _int_line(q: dict[str, Any]) -> str:
    """Weights written by `k2mini quantize` or `convert --dtype int4|int8` (the k2mini.quantize block)."""
    if q["format"] == "bnb":
        line = (f"bitsandbytes {'NF4' if q['bits'] == 4 else 'LLM.int8'} linear weights, routed experts BF16 "
                "(bitsandbytes replaces nn.Linear modules only)")
    elif q["format"] == "quanto":
        line = (f"BF16 weights that transformers quantizes to INT{q['bits']} with optimum-quanto at load time, "
                "routed experts excepted (quanto replaces nn.Linear modules only)")
    else:
        if q.get("group_size") == "auto":
            scale = ("one scale per 128, 64 or 32 input columns, the largest that divides each weight, or per output "
                     "channel where none does; `quantization_config.config_groups` lists which")
        elif q.get("group_size"):
            scale = f"one scale per {q['group_size']} input columns"
        else:
            scale = "one scale per output channel"
        line = f"INT{q['bits']} linear weights (`{q['format']}` pack-quantized, {scale})"
    kept = ", ".join(f"`{m}`" for m in q.get("ignore") or [])
    return (line + "; embeddings, norms" + (f" and {kept}" if kept else "") + " stay BF16; per-tensor errors and the "
            "share of weights stored as integers are in `quantization_report.json`")


def model_card(cfg: dict[str, Any], plan: Plan, *, params: int, total_size: int, src_layers: int, src_experts: int) -> str:
    k = cfg["k2mini"]
    layers = ", ".join(map(str, plan.layers))
    expert_rows = "\n".join(
        f"| {i} | {e.source_layer} | {', '.join(map(str, e.kept))} |"
        for i, e in ((plan.layers.index(e.source_layer), e) for e in plan.experts)
    )
    notes = "\n".join(f"- {n}" for n in plan.notes) or "- none"
    merge = _merge_section(plan)
    quant = cfg.get("quantization_config")
    dtype_line = (_fp8_line(quant or {}) if k["dtype"] == "fp8" else
                  f"`{k['dtype']}` weights" + ("" if quant is None else f" (`quantization_config`: {quant.get('quant_method', quant.get('format', '?'))})"))
    if k.get("quantize"):
        dtype_line = _int_line(k["quantize"])
    return f"""---
library_name: transformers
tags:
- k2mini
- moe
- pruned
- deepseek_v3
---

# Reduced checkpoint made with k2mini {k['tool_version']}

This is a **pruned** version of `{k['source']}`: {len(plan.layers)} of {src_layers} decoder layers and
{cfg['n_routed_experts']} of {src_experts} routed experts per MoE layer, {_fmt_params(params)} parameters,
{total_size / 1e9:.2f} GB of tensors, {dtype_line}. It has not been retrained ("healed"):
expect lower quality than the source, and measure it on your task before relying on it
(`k2mini validate OUT --reference SOURCE`).

It loads natively as `model_type: deepseek_v3` (no remote code):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")
```

## Selection

| | |
|---|---|
| layer strategy | `{plan.layer_strategy}` |
| expert strategy | `{plan.expert_strategy}` |
| routing groups | `{plan.group_policy}` (n_group {cfg.get('n_group')}, topk_group {cfg.get('topk_group')}) |
| experts per token | {cfg['num_experts_per_tok']} |
| analysis | {('`' + plan.analysis + '`') if plan.analysis else 'none'} |
| merge | {('`' + plan.merge_similarity + '` similarity, frequency-weighted') if plan.merge_similarity else 'none (pruned experts dropped)'} |
| source config sha256 | `{k['source_config_sha256']}` |

Kept source layers, in order: {layers}.

| output layer | source layer | kept source experts (output expert i = i-th listed) |
|---|---|---|
{expert_rows}
{merge}
Notes:
{notes}

The full plan is in `plan.json` (replay it with `k2mini convert --plan plan.json`); the same
provenance is in the `k2mini` block of `config.json`.
"""
