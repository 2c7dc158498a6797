"""Build transformers' DeepseekV3ForCausalLM with every non-expert weight resident on the
device and every MoE layer's routed experts offloaded to an ``ExpertCache``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from k2mini.checkpoint.names import Role, expert_weights
from k2mini.errors import CheckpointError
from k2mini.model.hf import fill_module, hf_config, load_checkpoint_model
from k2mini.offload.cache import ExpertCache
from k2mini.offload.module import OffloadedExperts


@dataclass
class OffloadedModel:
    model: nn.Module
    cache: ExpertCache
    resident_bytes: int  # non-expert weights on the device
    expert_bytes: int  # all routed experts in the compute dtype (what a full load would add)
    n_experts: int  # routed experts over all MoE layers

    def close(self) -> None:
        self.cache.close()


def load_offloaded(ck, *, budget: int, host_budget: int = 0, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, prefetch: bool = True, progress: bool = False) -> OffloadedModel:
    """Non-expert weights read (FP8 dequantized) one tensor at a time straight onto ``device``;
    routed experts left in the checkpoint behind a cache of ``budget`` bytes."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    device = torch.device(device)
    config = hf_config(ck.config)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    n_layers = config.num_hidden_layers
    names = [n for n in ck.weight_names()
             if ck.tensors[n].parsed.role not in (Role.EXPERT, Role.INV_FREQ)
             and (ck.tensors[n].parsed.layer is None or ck.tensors[n].parsed.layer < n_layers)]  # drops an MTP layer
    resident = fill_module(model, ((n, ck.read(n)) for n in tqdm(names, desc="resident weights", unit="tensor", disable=not progress)),
                           dtype, device=device, requires_grad=False, complete=False)
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them on the device.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)

    cache = ExpertCache(ck, budget=budget, host_budget=host_budget, device=device, dtype=dtype, prefetch=prefetch)
    moe = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, DeepseekV3MoE)]
    n_experts = 0
    expert_bytes = 0
    for j, (i, mlp) in enumerate(moe):
        nxt = moe[j + 1] if j + 1 < len(moe) else None
        missing = [n for e in range(mlp.experts.num_experts) for n in expert_weights(i, e) if n not in ck.tensors]
        if missing:
            raise CheckpointError(f"expert tensor {missing[0]} is not in the checkpoint", path=ck.description)
        expert_bytes += sum(cache.expert_bytes((i, e)) for e in range(mlp.experts.num_experts))
        n_experts += mlp.experts.num_experts
        mlp.experts = OffloadedExperts(i, mlp.experts.num_experts, mlp.experts.act_fn, cache,
                                       next_router=nxt[1].gate if nxt else None, next_layer=nxt[0] if nxt else None)
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"checkpoint has no tensor for {left[0]} ({len(left)} missing)", path=ck.description)
    return OffloadedModel(model.eval(), cache, resident, expert_bytes, n_experts)


def load_full(ck, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The whole model resident (the reference an offloaded run is measured against)."""
    return load_checkpoint_model(ck, dtype).to(device)
