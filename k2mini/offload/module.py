"""Drop-in replacement for transformers 5's fused ``DeepseekV3Experts`` that holds no weights:
each routed expert comes from an ``ExpertCache`` when a token routes to it."""

from __future__ import annotations

import torch
from torch import nn

from k2mini.offload.cache import ExpertCache


class OffloadedExperts(nn.Module):
    """``forward(hidden_states, top_k_index, top_k_weights)`` like ``DeepseekV3Experts``.

    The per-expert arithmetic is transformers' own eager loop, op for op and in the same
    expert order, so with the same weights the output is the same bits. ``next_router`` is the
    next MoE layer's ``DeepseekV3TopkRouter``: run on this layer's MLP input it guesses which
    experts the next layer will want, and those are prefetched while this layer computes.
    """

    def __init__(self, layer: int, num_experts: int, act_fn, cache: ExpertCache, next_router: nn.Module | None = None,
                 next_layer: int | None = None):
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.cache = cache
        # A plain attribute, not a submodule: the router belongs to the next layer.
        self.__dict__["next_router"] = next_router
        self.next_layer = next_layer

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        experts = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < self.num_experts]
        keys = [(self.layer, e) for e in experts]
        # Pinned so that prefetches for the next layer cannot evict them before use; fetched
        # one at a time so at most one expert beyond the budget is ever held here.
        self.cache.pin(keys)
        try:
            if self.next_router is not None and self.cache.prefetching:
                with torch.no_grad():
                    _, _, guess = self.next_router(hidden_states)
                self.cache.prefetch((self.next_layer, e) for e in torch.unique(guess).tolist())
            for key in keys:
                e = key[1]
                gate_up_proj, down_proj = self.cache.get(key)
                with torch.no_grad():
                    top_k_pos, token_idx = torch.where((top_k_index == e).T)
                current_state = hidden_states[token_idx]
                gate, up = nn.functional.linear(current_state, gate_up_proj).chunk(2, dim=-1)
                current_hidden_states = self.act_fn(gate) * up
                current_hidden_states = nn.functional.linear(current_hidden_states, down_proj)
                current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
                final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
                del gate_up_proj, down_proj
                self.cache.unpin([key])
        finally:
            self.cache.unpin(keys)
        return final_hidden_states
