"""Run checks: load the reduced model the way a user would (transformers, no remote code),
run held-out text with a forward hook on every module, generate greedily, inspect routers.

The hooks give what the seed project lacked when its model printed "probability tensor
contains inf/nan": the first module, in execution order, whose output holds NaN/Inf, and
each decoder layer's largest activation (against FP16's 65504, the DeepSeek overflow).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k2mini.checkpoint.names import expert_weight, layer_prefix, router_weight
from k2mini.checkpoint.reader import Checkpoint
from k2mini.model.device import resolve_device
from k2mini.model.spec import ModelSpec
from k2mini.validate.report import Finding, ModuleStat, RouterStat, RunReport
from k2mini.validate.static import ALL, FP16_MAX

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str, cfg: dict | None = None) -> torch.dtype:
    if dtype == "auto":
        # transformers dequantizes FP8 checkpoints on CPU to BF16 whatever dtype was asked
        # for, and a float32 activation then meets BF16 weights: compute in BF16 there.
        fp8 = ((cfg or {}).get("quantization_config") or {}).get("quant_method") == "fp8"
        return torch.float32 if device == "cpu" and not fp8 else torch.bfloat16
    return _DTYPES[dtype]


def held_out_ids(ck: Checkpoint, n_seqs: int, seq_len: int) -> tuple[torch.Tensor, object | None]:
    """[n_seqs, seq_len] token ids of text the fixtures' tokenizers never saw (prose after
    character 300k and standard-library code), and the encoder (None: no tokenizer, seeded ids)."""
    from k2mini.analysis.tokenizer import load_tokenizer
    from k2mini.errors import UsageError
    from k2mini.textdata import code_corpus, prose_corpus

    try:
        enc = load_tokenizer(ck)
    except UsageError:
        enc = None
    vocab = int(ck.config["vocab_size"])
    if enc is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (n_seqs, seq_len), generator=g), None
    half = (n_seqs + 1) // 2
    rows = []
    for text, count in ((prose_corpus()[300_000:400_000], half), (code_corpus()[:100_000], n_seqs - half)):
        ids = enc.encode(text)
        rows += [ids[i * seq_len : (i + 1) * seq_len] for i in range(count) if (i + 1) * seq_len <= len(ids)]
    ids = torch.tensor(rows[:n_seqs], dtype=torch.long)
    return ids.clamp_(max=vocab - 1), enc


def _decode(enc, ids: list[int]) -> str:
    for attr in ("tok", "enc"):
        inner = getattr(enc, attr, None)
        if inner is not None:
            return inner.decode(ids)
    return " ".join(map(str, ids))


@dataclass
class _Recorder:
    """Forward hooks on every module: per-module max |output| and NaN/Inf count, the first
    module (execution order) with NaN/Inf, and router choices."""

    n_experts: int
    stats: dict[str, list[float]] = field(default_factory=dict)  # name -> [max_abs, nonfinite]
    first_nonfinite: str | None = None
    routers: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def attach(self, model) -> None:
        for name, module in model.named_modules():
            if not name:
                continue
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, name: str):
        router_layer = _router_layer(name)

        def hook(_module, _inputs, output):
            if router_layer is not None and isinstance(output, tuple) and len(output) == 3:
                self.routers.setdefault(router_layer, []).append(output[2].detach().cpu())
            t = output[0] if isinstance(output, tuple) else output
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                return
            t = t.detach()
            finite = torch.isfinite(t)
            bad = int((~finite).sum())
            amax = float(t.abs().masked_fill(~finite, 0).max())
            s = self.stats.setdefault(name, [0.0, 0])
            s[0] = max(s[0], amax)
            s[1] += bad
            if bad and self.first_nonfinite is None:
                self.first_nonfinite = name

        return hook


def _router_layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 5 and parts[0] == "model" and parts[1] == "layers" and parts[3:] == ["mlp", "gate"]:
        return int(parts[2])
    return None


def router_stats(layer: int, chunks: list[torch.Tensor], n_experts: int) -> RouterStat:
    idx = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])
    flat = idx.reshape(-1)
    in_range = bool(((flat >= 0) & (flat < n_experts)).all())
    counts = torch.bincount(flat.clamp(0, n_experts - 1), minlength=n_experts).double()
    share = float(counts.max() / counts.sum()) if counts.sum() else 0.0
    cv = float(counts.std(unbiased=False) / counts.mean()) if counts.mean() > 0 else 0.0
    return RouterStat(layer=layer, tokens=idx.shape[0], experts=n_experts, indices_in_range=in_range,
                      experts_hit=int((counts > 0).sum()), max_load_share=round(share, 6), load_cv=round(cv, 6))


def load_model(out: str | Path, device: str, dtype: torch.dtype):
    """(model, loading info, seconds); never trusts remote code."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    kwargs = {"dtype": dtype, "output_loading_info": True, "trust_remote_code": False}
    if device != "cpu":
        kwargs["device_map"] = device
    model, info = AutoModelForCausalLM.from_pretrained(str(out), **kwargs)
    return model.eval(), info, time.perf_counter() - t0


def _weights_agree(model, ck: Checkpoint, findings: list[Finding]) -> None:
    """A few loaded parameters against our own reader: catches a loader that misreads a
    format (e.g. FP8 edge blocks, whose scale grid transformers infers from the shape)."""
    cfg = ck.config
    if (cfg.get("quantization_config") or {}).get("quant_method") not in (None, "fp8"):
        return
    moe = ModelSpec.from_config(cfg).moe_layers
    layer = moe[0] if moe else 0
    p = layer_prefix(layer).rstrip(".")
    params = dict(model.named_parameters())
    checks = [(f"{p}.self_attn.kv_a_proj_with_mqa.weight", lambda w: w), (f"{p}.self_attn.o_proj.weight", lambda w: w)]
    if moe:
        inter = int(cfg["moe_intermediate_size"])
        checks += [
            (router_weight(layer), lambda w: w),
            (expert_weight(layer, 0, "gate_proj"), lambda w: w[0, :inter] if w.dim() == 3 else None),
            (expert_weight(layer, 0, "down_proj"), lambda w: w[0] if w.dim() == 3 else None),
        ]
    fused = {"gate_proj": "gate_up_proj", "down_proj": "down_proj"}
    for name, pick in checks:
        if name not in ck.tensors:
            continue
        pname = name
        if ".experts.0." in name:
            pname = f"{p}.mlp.experts.{fused[name.split('.')[-2]]}"
        param = params.get(pname)
        if param is None or param.dtype not in (torch.float32, torch.bfloat16, torch.float16) or param.is_meta:
            continue
        got = pick(param.detach())
        if got is None:
            continue
        ref = ck.read(name).float()
        got = got.float().cpu()
        if got.shape != ref.shape:
            continue
        err = float((got - ref).abs().max())
        scale = float(ref.abs().max()) or 1.0
        if not math.isfinite(err) or err > scale * 2**-6:
            findings.append(Finding(check="run.weights_differ", severity="error", tensor=name, breaks=["transformers"],
                                    message=f"transformers loaded {name} with values up to {err:.3g} away from the "
                                    f"checkpoint's (max |w| {scale:.3g}): the loader misreads this tensor"))


@torch.no_grad()
def _key_findings(info: dict, findings: list[Finding]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) keys transformers reported on load; each kind found is an error."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in (info.get("mismatched_keys") or []))
    for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if keys:
            findings.append(Finding(check=f"run.{kind}_keys", severity="error", breaks=["transformers"],
                                    message=f"transformers reports {len(keys)} {kind} key(s), e.g. {', '.join(keys[:3])}"))
    return missing, unexpected, mismatched


def _activation_findings(rec: _Recorder, logits: torch.Tensor, tdtype: torch.dtype, findings: list[Finding]) -> None:
    """The first NaN/Inf (by module, in execution order) and activations FP16 cannot hold."""
    if rec.first_nonfinite:
        findings.append(Finding(check="run.nonfinite", severity="error", breaks=ALL,
                                message=f"NaN/Inf first appears in the output of {rec.first_nonfinite} "
                                "(forward hooks, execution order)"))
    if not bool(torch.isfinite(logits).all()) and not rec.first_nonfinite:
        findings.append(Finding(check="run.nonfinite", severity="error", breaks=ALL, message="logits hold NaN/Inf"))
    worst = max(rec.stats.items(), key=lambda kv: kv[1][0], default=None)
    if worst and worst[1][0] > FP16_MAX and tdtype is not torch.float16:
        findings.append(Finding(check="run.fp16_overflow", severity="warning", breaks=[],
                                message=f"activations reach {worst[1][0]:.3g} at {worst[0]}: FP16 (max 65504) would "
                                "overflow; serve in bfloat16"))


def _router_findings(rec: _Recorder, findings: list[Finding]) -> list[RouterStat]:
    """Each router's statistics; expert ids out of range (error) and collapse (warning)."""
    routers = [router_stats(layer, chunks, rec.n_experts) for layer, chunks in sorted(rec.routers.items())]
    for r in routers:
        if not r.indices_in_range:
            findings.append(Finding(check="run.router_index", severity="error", breaks=ALL,
                                    message=f"layer {r.layer} router chose expert ids outside [0, {r.experts})"))
        if r.experts > 1 and r.max_load_share > 0.5:
            findings.append(Finding(check="run.router_collapse", severity="warning",
                                    message=f"layer {r.layer}: one expert takes {r.max_load_share:.0%} of routed "
                                    "assignments (router collapse)"))
    return routers


def _generate(model, ids: torch.Tensor, enc, cfg: dict, device: str, max_new_tokens: int,
              findings: list[Finding]) -> tuple[str | None, int]:
    """Greedy generation smoke test: (text, tokens generated); NaN scores or ids outside the
    vocabulary are errors, a failure is one."""
    text, gen_tokens = None, 0
    try:
        prompt = ids[:1, : min(16, ids.shape[1])].to(device)
        gen = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=int(cfg.get("eos_token_id") or 0))
        new = gen.sequences[0, prompt.shape[1]:].tolist()
        gen_tokens = len(new)
        text = _decode(enc, new) if enc is not None else " ".join(map(str, new))
        if any(not bool(torch.isfinite(s).any()) or bool(torch.isnan(s).any()) for s in gen.scores):
            findings.append(Finding(check="run.generate", severity="error", breaks=ALL,
                                    message="greedy generation produced NaN scores (sampling would fail with "
                                    "'probability tensor contains inf/nan')"))
        if any(t < 0 or t >= int(cfg["vocab_size"]) for t in new):
            findings.append(Finding(check="run.generate", severity="error", breaks=ALL,
                                    message="generated token ids outside the vocabulary"))
    except Exception as exc:
        msg = " ".join(str(exc).split())[:400]
        findings.append(Finding(check="run.generate", severity="error", breaks=["transformers"],
                                message=f"greedy generation failed: {type(exc).__name__}: {msg}"))
    return text, gen_tokens


def run_checks(out: str | Path, ck: Checkpoint, *, device: str = "auto", dtype: str = "auto", n_seqs: int = 4,
               seq_len: int = 128, max_new_tokens: int = 16) -> tuple[RunReport, object | None, torch.Tensor]:
    """(report, loaded model or None, held-out ids) — the model is reused by --reference."""
    device = str(resolve_device(device))
    tdtype = resolve_dtype(dtype, device, ck.config)
    dname = str(tdtype).removeprefix("torch.")
    findings: list[Finding] = []
    if tdtype is torch.float16:
        findings.append(Finding(check="run.fp16", severity="warning", breaks=ALL,
                                message="FP16 requested for a DeepSeek-family model: its activations are known to "
                                "exceed 65504 and overflow to inf/nan; use bfloat16"))
    ids, enc = held_out_ids(ck, n_seqs, seq_len)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    empty = dict(device=device, dtype=dname, load_seconds=0.0, peak_memory_bytes=None, missing_keys=[],
                 unexpected_keys=[], mismatched_keys=[], tokens=0, layers=[], first_nonfinite=None, routers=[],
                 generated_text=None, generated_tokens=0)
    try:
        model, info, seconds = load_model(out, device, tdtype)
    except Exception as exc:  # a loader failure is the finding, whatever its type
        msg = " ".join(str(exc).split())[:400]
        findings.append(Finding(check="run.load", severity="error", breaks=["transformers"],
                                message=f"transformers could not load the checkpoint: {type(exc).__name__}: {msg}"))
        return RunReport(**empty, findings=findings), None, ids
    missing, unexpected, mismatched = _key_findings(info, findings)
    _weights_agree(model, ck, findings)

    rec = _Recorder(int(ck.config.get("n_routed_experts") or 0))
    rec.attach(model)
    try:
        logits = model(ids.to(device)).logits
    except Exception as exc:
        rec.detach()
        msg = " ".join(str(exc).split())[:400]
        findings.append(Finding(check="run.forward", severity="error", breaks=["transformers"],
                                message=f"forward pass failed: {type(exc).__name__}: {msg}"))
        return RunReport(**{**empty, "load_seconds": round(seconds, 3)}, findings=findings), model, ids
    rec.detach()
    n_layers = int(ck.config["num_hidden_layers"])
    layers = [ModuleStat(module=f"model.layers.{i}", max_abs=rec.stats[f"model.layers.{i}"][0],
                         nonfinite=int(rec.stats[f"model.layers.{i}"][1])) for i in range(n_layers) if f"model.layers.{i}" in rec.stats]
    _activation_findings(rec, logits, tdtype, findings)
    routers = _router_findings(rec, findings)
    text, gen_tokens = _generate(model, ids, enc, ck.config, device, max_new_tokens, findings)
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    report = RunReport(device=device if not cuda else f"{device} ({torch.cuda.get_device_name()})", dtype=dname,
                       load_seconds=round(seconds, 3), peak_memory_bytes=peak, missing_keys=missing[:50],
                       unexpected_keys=unexpected[:50], mismatched_keys=mismatched[:50], tokens=int(ids.numel()),
                       layers=layers, first_nonfinite=rec.first_nonfinite, routers=routers, generated_text=text,
                       generated_tokens=gen_tokens, findings=findings)
    return report, model, ids
