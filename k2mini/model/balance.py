"""DeepSeek-V3's auxiliary-loss-free load balancing of a transformers DeepseekV3 model: count
the tokens each router sends to each expert, and move the correction biases toward the
underloaded ones. Used by nano pre-training and by heal (--method router / full)."""

from __future__ import annotations

import torch


class LoadMeter:
    """Tokens routed to each expert of each MoE layer, read from the routers' top-k."""

    def __init__(self, model):
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.loads = torch.zeros(len(self.gates), self.gates[0].num_experts)
        self._hooks = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i):
        def hook(module, args, out):
            self.loads[i] += torch.bincount(out[2].flatten(), minlength=module.num_experts).float()
        return hook

    def reset(self) -> torch.Tensor:
        loads, self.loads = self.loads, torch.zeros_like(self.loads)
        return loads

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def balance_step(gates, loads: torch.Tensor, gamma: float) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing: bias += gamma * sign(mean load - load)."""
    for gate, load in zip(gates, loads):
        gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
