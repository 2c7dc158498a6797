"""Compare the reduced model with its source on the same held-out tokens.

The source is run with analyze's layer-streamed runner (``k2mini.model.layerwise.
stream_forward``): one decoder layer resident at a time and only the experts that receive
tokens are read, so a 1 TB FP8 source never has to fit in memory.
"""

from __future__ import annotations

import math

import torch

from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.validate.report import Finding, ReferenceReport


def _nll(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per position: logits at t predict ids at t+1."""
    return -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def compare_logits(src_logits: torch.Tensor, red_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """KL(source || reduced) per position, top-1 agreement and both perplexities."""
    p = src_logits.double().log_softmax(-1)
    q = red_logits.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).reshape(-1).clamp_min(0.0)
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean()
    return {
        "kl_mean": float(kl.mean()),
        "kl_p95": float(torch.quantile(kl, 0.95)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(top1),
        "ppl_source": math.exp(float(_nll(p, ids).mean())),
        "ppl_reduced": math.exp(float(_nll(q, ids).mean())),
    }


@torch.no_grad()
def compare_with_source(source: str, model, reduced_ck: Checkpoint, ids: torch.Tensor, *, device: str,
                        max_kl: float | None = None, progress: bool = False) -> ReferenceReport:
    from k2mini.model.layerwise import stream_forward

    src = Checkpoint.open(source)
    v_src, v_red = int(src.config["vocab_size"]), int(reduced_ck.config["vocab_size"])
    if v_src != v_red:
        raise UsageError(f"--reference {source}: vocab_size {v_src} differs from the reduced model's {v_red}")
    red_logits = model(ids.to(device)).logits.float().cpu()
    src_logits = stream_forward(src, ids, dtype=torch.float32, progress=progress, device=device).logits
    m = compare_logits(src_logits, red_logits, ids)
    findings: list[Finding] = []
    if not all(math.isfinite(v) for v in m.values()):
        findings.append(Finding(check="reference.nonfinite", severity="error", message="KL or perplexity is not finite",
                                breaks=["transformers", "vLLM", "SGLang"]))
    elif max_kl is not None and m["kl_mean"] > max_kl:
        findings.append(Finding(check="reference.kl", severity="error",
                                message=f"mean KL(source || reduced) {m['kl_mean']:.4g} exceeds --max-kl {max_kl:g}"))
    return ReferenceReport(source=source, tokens=int(ids.numel()), findings=findings, **m)
