"""What heal trains: the routers, LoRA adapters, or every weight (docs/facts.md §7).

- ``router``: each MoE layer's gate rows by gradient. The correction bias only picks
  experts (a top-k: no gradient reaches it), so it is trained by its own rule, DeepSeek-V3's
  auxiliary-loss-free balancing (bias += gamma * sign(mean load - load) per step), the rule
  it was trained with.
- ``lora``: peft LoRA on attention (q_a, q_b, kv_a, kv_b, o), the dense MLP and the shared
  experts (nn.Linear modules), and on the fused routed-expert tensors through peft's
  ``target_parameters`` (one low-rank update per expert: dim 0 is the expert axis).
  Adapters are merged into the weights before writing: vLLM drops or misreads LoRA on fused
  MoE experts, so a merged checkpoint is what serves.
- ``full``: every weight (the correction bias balanced, as for ``router``).
"""

from __future__ import annotations

import torch

METHODS = ("router", "lora", "full")
LORA_MODULES = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def gates(model) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def prepare(model, method: str, *, lora_rank: int = 16, lora_alpha: float | None = None):
    """``model`` set up for ``method``: returns the module to train (a peft model for lora)."""
    if method not in METHODS:
        raise ValueError(method)
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method == "router":
        for g in gates(model):
            g.weight.requires_grad_(True)
        return model
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank, lora_dropout=0.0,
                     target_modules=LORA_MODULES, target_parameters=LORA_PARAMETERS)
    return get_peft_model(model, cfg)


def base_model(trained):
    """The DeepseekV3ForCausalLM inside ``trained`` (a peft model's adapters stay injected)."""
    from peft import PeftModel

    return trained.get_base_model() if isinstance(trained, PeftModel) else trained
