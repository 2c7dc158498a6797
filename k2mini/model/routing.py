"""K2 / DeepSeek-V3 MoE routing (noaux_tc), the one implementation every stage uses: the
layer-streamed runner, analyze's expert statistics, output-error selection and the nano study
(docs/facts.md §2).

Sigmoid scores; the correction bias only for choosing; group-limited choice when
n_group > 1; the weights are the chosen sigmoid scores, normalised and scaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Routing:
    """One MoE layer's router: [E, H] weight, [E] correction bias and its constants."""

    weight: torch.Tensor
    bias: torch.Tensor
    top_k: int
    norm_topk_prob: bool = True
    scaling: float = 1.0
    # Group-limited routing (DeepSeek-V3: 8 groups, top 4) of the unpruned model.
    n_group: int = 1
    topk_group: int = 1

    @classmethod
    def from_config(cls, cfg: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor | None) -> Routing:
        """The config's routing constants for a router ``weight`` (no bias: zeros)."""
        bias = bias if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
        return cls(weight, bias, int(cfg["num_experts_per_tok"]), bool(cfg.get("norm_topk_prob", True)),
                   float(cfg.get("routed_scaling_factor", 1.0)), int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1))

    @classmethod
    def of_gate(cls, gate: torch.nn.Module) -> Routing:
        """The router of a transformers DeepseekV3 MoE gate module."""
        return cls(gate.weight.detach(), gate.e_score_correction_bias.detach(), gate.top_k, gate.norm_topk_prob,
                   gate.routed_scaling_factor, int(gate.num_group or 1), int(gate.topk_group or 1))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] sigmoid router scores (float32)."""
        return torch.sigmoid(x.float() @ self.weight.float().T)

    def choice(self, scores: torch.Tensor) -> torch.Tensor:
        """What top-k chooses on: the scores plus the correction bias."""
        return scores + self.bias.float()

    def pick(self, scores: torch.Tensor, choice: torch.Tensor, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain top-k of ``choice`` (among the boolean ``kept`` mask, [E] or per-row [N, E]):
        ids [N, k] and their scores, normalised and scaled."""
        if kept is not None:
            choice = choice.masked_fill(~kept, float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        return idx, self.weights(scores, idx)

    def weights(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, k]`` expert ids and weights for tokens ``x`` [T, H], groups honoured."""
        scores = self.scores(x)
        choice = self.choice(scores)
        if self.n_group > 1:
            n_exp = self.weight.shape[0]
            grouped = choice.view(-1, self.n_group, n_exp // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(n_exp // self.n_group, dim=1), float("-inf"))
        return self.pick(scores, choice)
