"""Per-GPU memory of a heal run, from the config alone (what ``heal --dry-run --gpus N`` prints),
for the layouts heal wires: DDP (a replica per GPU), FSDP2 (heal/sharding.py: every decoder
layer, then the root, sharded over the GPUs) and FSDP2 with CPU offload.

Per method, in bytes per GPU:
- params: frozen weights in BF16 (2 B), trained ones as FP32 masters (4 B; under mixed
  precision they are computed in BF16). DDP: all of them; FSDP2: 1/N, plus the gathered
  working set: the root (embeddings, head; gathered for the whole step) and two decoder layers
  in BF16 (the one running and the one prefetched).
- grads: FP32, 4 B per trained parameter; FSDP2: 1/N, plus one layer's unsharded gradient
  (the reduce-scatter's input) when that layer is trained in full.
- optimizer: AdamW's two FP32 moments, 8 B per trained parameter; FSDP2: 1/N.
- activations: Korthikanti et al.'s count for a transformer layer, ``34*s*b*h`` bytes in
  16-bit (s tokens per sequence, b sequences per GPU, h hidden; their ``5*a*s/h`` term for
  the attention matrix is left out: SDPA's fused kernels never store it). With gradient
  checkpointing (heal's default on CUDA) each layer keeps only its input (``2*s*b*h``)
  and one layer's activations exist at a time during recomputation; without it, every
  layer's. Plus one chunk of float32 logits and its gradient (the loss computes the head in
  chunks of HEAD_CHUNK_BYTES).
- CPU offload: FSDP2's shards of params, grads and optimizer state live in host memory
  (``host`` per rank); the GPU keeps the gathered working set and the activations.
An estimate, not a measurement: allocator fragmentation and CUDA's own context (about
0.5-1 GiB) come on top, which the profile's reserved memory stands for.
"""

from __future__ import annotations

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


def _group_params(spec: ModelSpec) -> tuple[int, int]:
    """(parameters outside the decoder layers, parameters of the largest decoder layer)."""
    per_layer: dict[int, int] = {}
    root = 0
    for t in spec.tensors():
        pn = parse_name(t.name)
        if pn.is_scale:
            continue
        if pn.layer is None:
            root += t.numel
        else:
            per_layer[pn.layer] = per_layer.get(pn.layer, 0) + t.numel
    return root, max(per_layer.values(), default=0)


def plan(cfg: dict[str, Any], *, gpus: int, gpu_bytes: int, seq_len: int, batch_per_gpu: int, lora_rank: int,
         checkpointing: bool = True) -> dict[str, Any]:
    """Per method and layout (DDP, FSDP2, FSDP2 + CPU offload): bytes per GPU by part, the
    total, whether it fits ``gpu_bytes``, and the layout heal picks by default."""
    from k2mini.heal.sharding import default_fsdp

    spec = ModelSpec.from_config(cfg)
    params = spec.param_count()
    root, layer = _group_params(spec)
    s, b, h = seq_len, batch_per_gpu, spec.hidden_size
    layers = spec.num_hidden_layers
    act_layers = s * b * h * (2 * layers + 34 if checkpointing else 34 * layers)
    head_positions = min(s * b, max(1, HEAD_CHUNK_BYTES // (spec.vocab_size * 4)))
    activations = act_layers + 2 * head_positions * spec.vocab_size * 4
    out = {}
    for method in METHODS:
        trainable = trainable_params(spec, method, lora_rank)
        frozen = 0 if method == "full" else params - (trainable if method == "router" else 0)
        weights = 2 * frozen + 4 * trainable
        gathered = 2 * (root + 2 * layer)
        layer_grad = 4 * layer if method == "full" else 0
        layouts = {}
        for name, shard, offload in (("DDP", 1, False), ("FSDP2", gpus, False), ("FSDP2+offload", gpus, True)):
            sharded = {"params": weights / shard, "grads": 4 * trainable / shard, "optimizer": 8 * trainable / shard}
            work = {"params": gathered, "grads": layer_grad} if name != "DDP" else {}
            gpu = {k: (0 if offload else sharded.get(k, 0)) + work.get(k, 0) for k in ("params", "grads", "optimizer")}
            gpu["activations"] = activations
            total = sum(gpu.values())
            layouts[name] = {**{k: int(v) for k, v in gpu.items()}, "total": int(total), "fits": total <= gpu_bytes,
                             "host": int(sum(sharded.values())) if offload else 0}
        ddp_fits = layouts["DDP"]["fits"]
        out[method] = {"trainable_params": trainable, "layouts": layouts,
                       "default": "FSDP2" if default_fsdp(gpus, ddp_fits) else "DDP"}
    return {"params": params, "root_params": root, "largest_layer_params": layer, "gpus": gpus, "gpu_bytes": gpu_bytes,
            "seq_len": seq_len, "batch_per_gpu": b, "gradient_checkpointing": checkpointing, "methods": out}
