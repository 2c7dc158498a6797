"""Logit agreement between a reference model and its quantized copy on held-out text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Agreement:
    tokens: int
    top1: float  # share of positions where both models' argmax token agrees
    kl: float  # mean KL(reference || quantized) per position, nats
    max_kl: float


def held_out_batches(checkpoint_dir: str | Path, n_seqs: int = 8, seq_len: int = 64) -> list[torch.Tensor]:
    """Token windows from prose the fixture tokenizer never saw: it is trained on the first
    200k characters of the corpus, these come from after 300k."""
    from transformers import PreTrainedTokenizerFast

    from k2mini.textdata import prose_corpus

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(checkpoint_dir) / "tokenizer.json"))
    ids = tok(prose_corpus()[300_000:400_000])["input_ids"]
    return [torch.tensor([ids[i * seq_len : (i + 1) * seq_len]]) for i in range(n_seqs) if (i + 1) * seq_len <= len(ids)]


@torch.no_grad()
def logit_agreement(reference, quantized, batches: list[torch.Tensor]) -> Agreement:
    agree = total = 0
    kl_sum, kl_max = 0.0, 0.0
    for x in batches:
        a = reference(x).logits.float().log_softmax(-1)
        b = quantized(x).logits.float().log_softmax(-1)
        if not torch.isfinite(b).all():
            raise ValueError("quantized model produced non-finite logits")
        kl = (a.exp() * (a - b)).sum(-1)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0] * a.shape[1]
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
    return Agreement(total, agree / total, kl_sum / total, kl_max)
