"""``validate(out, options)``: the requested checks, in order, into one ValidationReport."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.validate import ENGINE_TOLERANCE, ENGINES
from k2mini.validate.report import ValidationReport

CHECKS = ("static", "scan", "memory", "run")


@dataclass(frozen=True)
class ValidateOptions:
    gpu: str | None = "h100"
    context: int = 4096
    batch: int = 1
    device: str = "auto"
    dtype: str = "auto"
    reference: str | None = None
    skip: tuple[str, ...] = ()
    samples: int = 4
    seq_len: int = 128
    max_new_tokens: int = 16
    max_kl: float | None = None
    progress: bool = False
    engines: tuple[str, ...] = ()
    engine_python: str | None = None
    engine_tolerance: float = ENGINE_TOLERANCE
    engine_timeout: float = 900.0

    def check(self) -> None:
        for s in self.skip:
            if s not in CHECKS:
                raise UsageError(f"--skip {s}: unknown check (choose from {', '.join(CHECKS)})")
        if self.context < 1 or self.batch < 1:
            raise UsageError("--context and --batch must be positive")
        if self.samples < 1 or self.seq_len < 2:
            raise UsageError("--samples must be >= 1 and --seq-len >= 2")
        if self.reference is not None and "run" in self.skip:
            raise UsageError("--reference needs the run check (it compares the loaded model); drop --skip run")
        if self.engines:
            from k2mini.engine.process import check_engine_python

            for e in self.engines:
                if e not in ENGINES:
                    raise UsageError(f"--engine {e}: choose one of {', '.join(ENGINES)}")
            check_engine_python(self.engine_python)
            if "run" in self.skip:
                raise UsageError("--engine compares with the run check's transformers model; drop --skip run")
            if not self.engine_tolerance > 0 or not self.engine_timeout > 0:
                raise UsageError("--engine-tolerance and --engine-timeout must be positive")
        elif self.engine_python is not None:
            raise UsageError("--engine-python needs --engine")

    def requested(self) -> list[str]:
        out = [c for c in ("static", "scan") if c not in self.skip]
        if self.gpu and "memory" not in self.skip:
            out.append("memory")
        if "run" not in self.skip:
            out.append("run")
        if self.reference:
            out.append("reference")
        out += [f"engine:{e}" for e in self.engines]
        return out


def validate(out: str | Path, opts: ValidateOptions) -> ValidationReport:
    from k2mini.validate.gpus import load_profile
    from k2mini.validate.memory import memory_plan
    from k2mini.model.device import resolve_device
    from k2mini.validate.static import run_static

    opts.check()
    device = str(resolve_device(opts.device)) if "run" not in opts.skip else opts.device  # bad --device before any work
    profile = load_profile(opts.gpu) if opts.gpu and "memory" not in opts.skip else None
    ck = Checkpoint.open(out)
    report = ValidationReport(output=str(out), checks=opts.requested())
    if "static" not in opts.skip or "scan" not in opts.skip:
        report.static = run_static(ck, headers="static" not in opts.skip, scan="scan" not in opts.skip,
                                   progress=opts.progress)
    if profile is not None:
        report.memory = memory_plan(ck.config, profile, context=opts.context, batch=opts.batch, ck=ck)
    if "run" not in opts.skip:
        from k2mini.validate.runcheck import run_checks

        report.run, model, ids = run_checks(out, ck, device=device, dtype=opts.dtype, n_seqs=opts.samples,
                                            seq_len=opts.seq_len, max_new_tokens=opts.max_new_tokens)
        if opts.reference and model is not None:
            from k2mini.validate.reference import compare_with_source

            device = next(model.parameters()).device
            report.reference = compare_with_source(opts.reference, model, ck, ids, device=str(device),
                                                   max_kl=opts.max_kl, progress=opts.progress)
        if opts.engines:
            from k2mini.validate.engines import check_engine

            for engine in opts.engines:
                report.engines.append(check_engine(engine, out, model=model, prompts=ids.tolist(),
                                                   max_new_tokens=opts.max_new_tokens, python=opts.engine_python,
                                                   tolerance=opts.engine_tolerance, timeout=opts.engine_timeout))
    return report.decide()
