"""Timed greedy decoding with a KV cache, for offloaded and fully loaded models alike."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeResult:
    tokens: list[int]  # generated (or teacher-forced) tokens, prompt excluded
    prefill_seconds: float
    decode_seconds: float
    step_seconds: list[float] = field(repr=False, default_factory=list)
    logits: list[torch.Tensor] = field(repr=False, default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return len(self.step_seconds) / self.decode_seconds if self.decode_seconds else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(model, prompt_ids: list[int], *, max_new_tokens: int = 0, teacher: list[int] | None = None,
           keep_logits: bool = False, on_step=None) -> DecodeResult:
    """Prefill ``prompt_ids``, then one token per step: the argmax (greedy generation) or, with
    ``teacher``, the given tokens (so every configuration processes the same text)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    steps = len(teacher) if teacher is not None else max_new_tokens
    t0 = time.perf_counter()
    out = model(torch.tensor([prompt_ids], device=device), past_key_values=cache, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    res = DecodeResult([], prefill, 0.0)
    last = out.logits[0, -1]
    for i in range(steps):
        if keep_logits:
            res.logits.append(last.float().cpu())
        nxt = teacher[i] if teacher is not None else int(last.argmax())
        res.tokens.append(nxt)
        if i == steps - 1 and teacher is None:
            break  # the last generated token needs no forward pass
        t = time.perf_counter()
        out = model(torch.tensor([[nxt]], device=device), past_key_values=cache, use_cache=True)
        last = out.logits[0, -1]
        _sync(device)
        res.step_seconds.append(time.perf_counter() - t)
        if on_step is not None:
            on_step(i)
    res.decode_seconds = sum(res.step_seconds)
    return res
