"""Per-GPU memory of a heal run, from the config alone (what ``heal --dry-run --gpus N`` prints).

Per method, in bytes per GPU:
- weights: every parameter in BF16 (2 B), sharded over the GPUs under FSDP (``full`` on
  more than one GPU), replicated under DDP;
- trainable state: for each trainable parameter an FP32 master copy when the weights are
  BF16 (4 B), its gradient (4 B) and AdamW's two moments (8 B); sharded under FSDP;
- activations: Korthikanti et al.'s count for a transformer layer, ``34*s*b*h`` bytes in
  16-bit (s tokens per sequence, b sequences per GPU, h hidden; their ``5*a*s/h`` term for
  the attention matrix is left out: SDPA's fused kernels never store it). With gradient
  checkpointing (heal's default on CUDA) each layer keeps only its input (``2*s*b*h``)
  and one layer's activations exist at a time during recomputation; without it, every
  layer's. Plus one chunk of float32 logits and its gradient (the loss computes the head in
  chunks of HEAD_CHUNK_BYTES).
An estimate, not a measurement: allocator fragmentation and CUDA's own context (about
0.5-1 GiB) come on top, which the profile's reserved memory stands for.
"""

from __future__ import annotations

import math
from typing import Any

from k2mini.checkpoint.names import parse_name
from k2mini.heal.methods import LORA_MODULES, METHODS
from k2mini.heal.recipe import HEAD_CHUNK_BYTES
from k2mini.model.spec import ModelSpec


def trainable_params(spec: ModelSpec, method: str, lora_rank: int) -> int:
    if method == "full":
        return spec.param_count()
    n = 0
    for t in spec.tensors():
        if parse_name(t.name).is_scale:
            continue
        leaf = t.name.split(".")[-2] if t.name.endswith(".weight") else ""
        if method == "router" and t.name.endswith("mlp.gate.weight"):
            n += t.numel
        elif method == "lora" and len(t.shape) == 2 and leaf in LORA_MODULES:
            n += lora_rank * (t.shape[0] + t.shape[1])  # routed experts too: one update per expert
    return n


def plan(cfg: dict[str, Any], *, gpus: int, gpu_bytes: int, seq_len: int, batch_per_gpu: int, lora_rank: int,
         checkpointing: bool = True) -> dict[str, dict]:
    """Per method: bytes per GPU by part, the total, and whether it fits ``gpu_bytes``."""
    spec = ModelSpec.from_config(cfg)
    params = spec.param_count()
    s, b, h = seq_len, batch_per_gpu, spec.hidden_size
    layers = spec.num_hidden_layers
    act_layers = s * b * h * (2 * layers + 34 if checkpointing else 34 * layers)
    head_positions = min(s * b, max(1, HEAD_CHUNK_BYTES // (spec.vocab_size * 4)))
    logits = 2 * head_positions * spec.vocab_size * 4
    out = {}
    for method in METHODS:
        trainable = trainable_params(spec, method, lora_rank)
        shard = gpus if (method == "full" and gpus > 1) else 1
        weights = params * 2 / shard
        state = trainable * (4 + 4 + 8) / shard  # fp32 master, fp32 grad, AdamW m and v
        total = weights + state + act_layers + logits
        out[method] = {
            "trainable_params": trainable,
            "parallel": "FSDP2" if shard > 1 else "DDP",
            "weights": int(weights), "trainable_state": int(state), "activations": int(act_layers + logits),
            "total": int(total), "fits": total <= gpu_bytes,
            "max_batch_per_gpu": max(0, math.floor((gpu_bytes - weights - state - logits) / max(1, act_layers / max(b, 1)))),
        }
    return {"params": params, "gpus": gpus, "gpu_bytes": gpu_bytes, "seq_len": seq_len, "batch_per_gpu": b,
            "gradient_checkpointing": checkpointing, "methods": out}
