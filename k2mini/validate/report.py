"""The validation report: what each check found, as one pydantic object (JSON on demand)."""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import BaseModel, Field

from k2mini.sizes import format_size

Severity = Literal["error", "warning", "info"]
ENGINES = ("transformers", "vLLM", "SGLang")


class Finding(BaseModel):
    check: str  # stable id, e.g. "tensor.missing", "config.experts_per_tok"
    severity: Severity
    message: str
    tensor: str | None = None
    breaks: list[str] = Field(default_factory=list)  # engines this makes fail or compute garbage

    def line(self) -> str:
        where = f" [breaks {', '.join(self.breaks)}]" if self.breaks else ""
        return f"{self.severity.upper()}: {self.message}{where}"


class StaticReport(BaseModel):
    format: str  # bf16 / fp8 / compressed-tensors int4 g128 / ...
    tensors: int
    tensors_scanned: int  # tensors whose values were read (0 with --no-scan)
    bytes_scanned: int
    seconds: float
    findings: list[Finding]


class KVCache(BaseModel):
    context: int
    batch: int
    dtype_bytes: int
    latent_bytes_per_token: int  # all layers: (kv_lora_rank + qk_rope_head_dim) per layer (vLLM/SGLang MLA)
    expanded_bytes_per_token: int  # all layers: heads * (qk_head_dim + v_head_dim) per layer
    latent_bytes: int
    expanded_bytes: int


class MemoryPlan(BaseModel):
    gpu: str
    memory_bytes: int
    reserved_bytes: int
    params: int
    weights_source: Literal["headers", "config"]
    weights_by_dtype: dict[str, int]  # bytes as stored (what vLLM keeps resident)
    weights_bytes: int
    transformers_weights_bytes: int  # after transformers decompresses what it cannot keep packed
    kv: KVCache
    activation_bytes: int
    activation_formula: str
    needed_latent_bytes: int  # weights + latent KV + activations + reserved
    needed_expanded_bytes: int  # transformers weights + expanded KV + activations + reserved
    fits_latent: bool
    fits_expanded: bool
    notes: list[str] = Field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.fits_latent


class ModuleStat(BaseModel):
    module: str
    max_abs: float
    nonfinite: int


class RouterStat(BaseModel):
    layer: int
    tokens: int
    experts: int
    indices_in_range: bool
    experts_hit: int
    max_load_share: float  # busiest expert's share of all assignments
    load_cv: float  # coefficient of variation of per-expert load


class RunReport(BaseModel):
    device: str
    dtype: str
    load_seconds: float
    peak_memory_bytes: int | None  # torch.cuda.max_memory_allocated on CUDA; None on CPU
    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[str]
    tokens: int
    layers: list[ModuleStat]  # one per decoder layer (its output)
    first_nonfinite: str | None  # "model.layers.3.mlp.experts" = first module (execution order)
    routers: list[RouterStat]
    generated_text: str | None
    generated_tokens: int
    findings: list[Finding]


class ReferenceReport(BaseModel):
    source: str
    tokens: int
    kl_mean: float  # KL(source || reduced), nats per token
    kl_p95: float
    kl_max: float
    top1_agreement: float
    ppl_source: float
    ppl_reduced: float
    findings: list[Finding]


class EngineReport(BaseModel):
    engine: str  # vllm
    python: str  # the interpreter it ran in
    status: Literal["served", "refused", "not_installed"]
    version: str | None = None
    reason: str | None = None  # refused / not installed: the engine's own words, one line
    seconds: float | None = None  # the whole engine run, start-up included
    load_seconds: float | None = None
    tolerance: float | None = None  # nats, on the mean prompt log-prob difference
    tokens_compared: int = 0  # prompt tokens whose log-prob both computed
    max_abs_logprob_diff: float | None = None  # |log p_engine - log p_transformers|, nats
    mean_abs_logprob_diff: float | None = None
    greedy_steps: int = 0  # engine's greedy tokens, each checked against transformers in the same context
    greedy_identical: int = 0  # of those, transformers' argmax too
    greedy_worst_gap: float | None = None  # largest transformers log p(its argmax) - log p(engine's token), nats
    log_tail: str | None = None  # the engine's last log lines when it refused
    findings: list[Finding]

    def line(self) -> str:
        name = f"{self.engine} {self.version}" if self.version else self.engine
        if self.status == "not_installed":
            return f"engine {name}: not installed ({self.reason})"
        if self.status == "refused":
            return f"engine {name}: refused: {self.reason}"
        if self.max_abs_logprob_diff is None:
            return f"engine {name}: served (not compared); {self.seconds:.0f} s"
        return (f"engine {name}: served; prompt log-probs vs transformers: mean |diff| {self.mean_abs_logprob_diff:.4f} "
                f"nats (tolerance {self.tolerance:g}), max {self.max_abs_logprob_diff:.4f}, over {self.tokens_compared} "
                f"tokens; greedy tokens {self.greedy_identical}/{self.greedy_steps} identical"
                + (f", worst near-tie {self.greedy_worst_gap:.4f} nats" if self.greedy_identical < self.greedy_steps else "")
                + f"; {self.seconds:.0f} s")


class ValidationReport(BaseModel):
    output: str
    checks: list[str]
    static: StaticReport | None = None
    memory: MemoryPlan | None = None
    run: RunReport | None = None
    reference: ReferenceReport | None = None
    engines: list[EngineReport] = Field(default_factory=list)
    passed: bool = False

    def findings(self) -> list[Finding]:
        out: list[Finding] = []
        for part in (self.static, self.run, self.reference, *self.engines):
            if part is not None:
                out.extend(part.findings)
        return out

    def errors(self) -> list[Finding]:
        return [f for f in self.findings() if f.severity == "error"]

    def decide(self) -> ValidationReport:
        self.passed = not self.errors() and (self.memory is None or self.memory.fits)
        return self

    def summary(self) -> str:
        gib = partial(format_size, binary=True)
        lines = [f"validate {self.output}"]
        if self.static:
            s = self.static
            lines.append(f"static: {s.format}, {s.tensors} tensors, {s.tensors_scanned} scanned "
                         f"({gib(s.bytes_scanned)}) in {s.seconds:.1f} s")
        if self.memory:
            m = self.memory
            kv = m.kv
            lines.append(
                f"memory plan for {m.gpu} ({gib(m.memory_bytes)}, {gib(m.reserved_bytes)} reserved): "
                f"{m.params / 1e9:.3f} B params, weights {gib(m.weights_bytes)} "
                f"({', '.join(f'{k} {gib(v)}' for k, v in sorted(m.weights_by_dtype.items()))})"
            )
            lines.append(
                f"  KV cache at {kv.context} tokens x batch {kv.batch}: MLA latent {gib(kv.latent_bytes)}, "
                f"expanded per-head {gib(kv.expanded_bytes)}; activations {gib(m.activation_bytes)}"
            )
            lines.append(
                f"  latent cache (vLLM/SGLang): needs {gib(m.needed_latent_bytes)} -> "
                f"{'FITS' if m.fits_latent else 'DOES NOT FIT'}; expanded cache + transformers weights: "
                f"{gib(m.needed_expanded_bytes)} -> {'fits' if m.fits_expanded else 'does not fit'}"
            )
            lines.extend(f"  note: {n}" for n in m.notes)
        if self.run:
            r = self.run
            peak = f", peak GPU memory {gib(r.peak_memory_bytes)}" if r.peak_memory_bytes is not None else ""
            top = max(r.layers, key=lambda m: m.max_abs) if r.layers else None
            lines.append(
                f"run on {r.device} ({r.dtype}): loaded in {r.load_seconds:.1f} s{peak}; {r.tokens} tokens; "
                + (f"largest activation {top.max_abs:.3g} at {top.module}; " if top else "")
                + (f"first NaN/Inf at {r.first_nonfinite}" if r.first_nonfinite else "no NaN/Inf")
            )
            if r.routers:
                worst = max(r.routers, key=lambda x: x.max_load_share)
                lines.append(f"  routers: {len(r.routers)} MoE layers, indices in range: "
                             f"{all(x.indices_in_range for x in r.routers)}, busiest expert share {worst.max_load_share:.2f} (layer {worst.layer})")
            if r.generated_text is not None:
                lines.append(f"  greedy generation ({r.generated_tokens} tokens): {r.generated_text!r}")
        if self.reference:
            f = self.reference
            lines.append(
                f"vs source {f.source}: {f.tokens} tokens, KL(source||reduced) mean {f.kl_mean:.4g} p95 {f.kl_p95:.4g} "
                f"max {f.kl_max:.4g} nats, top-1 agreement {f.top1_agreement:.3f}, "
                f"perplexity source {f.ppl_source:.3f} reduced {f.ppl_reduced:.3f}"
            )
        lines.extend(e.line() for e in self.engines)
        for finding in self.findings():
            lines.append(finding.line())
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)
