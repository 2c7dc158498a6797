"""Serving-engine checks: run the reduced checkpoint in an engine (vLLM's offline ``LLM``
API) and compare what it computes with transformers on the same prompts.

The engine runs in a subprocess of the interpreter that has it (``--engine-python``; vLLM
usually lives in a venv of its own, pinned to its own torch and transformers) through
``engine/vllm_worker.py`` (its ``check`` mode), which imports nothing from k2mini. Three
outcomes per engine:

- served: prompt log-probs and greedy tokens are compared with transformers' forward pass
  (float32 on CPU) over the same token ids; more than the tolerance apart is an error;
- refused: the engine cannot run this output here, in its own words (vLLM's CPU build:
  "CPUFp8BlockScaledMMKernel requires AMX tile support"); an error, since it was asked for;
- not installed: a warning, the check could not be made.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from k2mini.engine.process import check_engine_python, exit_reason, run_once, vllm_here
from k2mini.errors import UsageError
from k2mini.validate import ENGINE_TOLERANCE, ENGINES
from k2mini.validate.report import EngineReport, Finding


def _not_installed(engine: str, python: str, reason: str) -> EngineReport:
    return EngineReport(engine=engine, python=python, status="not_installed", reason=reason,
                        findings=[Finding(check=f"engine.{engine}", severity="warning", breaks=[],
                                          message=f"{engine} was not checked: {reason}")])


@torch.no_grad()
def reference_logprobs(model, prompts: list[list[int]], greedy: list[list[int]]) -> list[torch.Tensor]:
    """transformers' log-probs [len - 1, vocab] over each prompt followed by the engine's
    greedy tokens (teacher-forced, so every generated step is compared in the same context)."""
    device = next(model.parameters()).device
    out = []
    for p, g in zip(prompts, greedy):
        ids = torch.tensor([p + g], device=device)
        out.append(model(ids).logits[0, :-1].double().log_softmax(-1).cpu())
    return out


def compare(prompts: list[list[int]], engine_logprobs: list[list[float | None]], greedy: list[list[int]],
            ref: list[torch.Tensor]) -> dict:
    """Agreement figures of an engine's results with transformers' log-probs ``ref``.

    Prompt token t's log-prob is the reference's row t-1 (the engine gives None for t=0).
    A greedy token is identical when it is the reference's argmax; the gap of one that is
    not is how far the reference ranks it below its own choice."""
    diffs: list[float] = []
    steps = identical = 0
    worst_gap = 0.0
    for p, lp, g, r in zip(prompts, engine_logprobs, greedy, ref):
        for t in range(1, len(p)):
            if lp[t] is not None:
                diffs.append(abs(lp[t] - float(r[t - 1, p[t]])))
        for k, tok in enumerate(g):
            row = r[len(p) - 1 + k]
            steps += 1
            best = int(row.argmax())
            identical += best == tok
            worst_gap = max(worst_gap, float(row[best] - row[tok]))
    d = torch.tensor(diffs, dtype=torch.float64)
    return {
        "tokens_compared": len(diffs),
        "max_abs_logprob_diff": float(d.max()) if diffs else 0.0,
        "mean_abs_logprob_diff": float(d.mean()) if diffs else 0.0,
        "greedy_steps": steps,
        "greedy_identical": identical,
        "greedy_worst_gap": worst_gap,
    }


def disagreements(engine: str, figures: dict, tolerance: float) -> list[Finding]:
    """Errors for an engine that computes something else than transformers.

    The mean log-prob difference must stay within ``tolerance``. A greedy token that is
    not transformers' choice is a near-tie when transformers ranks it closer to its own
    choice than the largest prompt log-prob difference of the same run: that much the
    engine's rounding is seen to move a log-prob, so it may flip such a choice."""
    out = []
    if figures["mean_abs_logprob_diff"] > tolerance:
        out.append(Finding(check=f"engine.{engine}.logprobs", severity="error", breaks=["vLLM"], message=(
            f"{engine}'s prompt log-probs differ from transformers' by {figures['mean_abs_logprob_diff']:.4g} nats on "
            f"average (max {figures['max_abs_logprob_diff']:.4g}; --engine-tolerance {tolerance:g}): the engine "
            "computes something else from these weights")))
    if figures["greedy_worst_gap"] > figures["max_abs_logprob_diff"]:
        out.append(Finding(check=f"engine.{engine}.greedy", severity="error", breaks=["vLLM"], message=(
            f"{engine}'s greedy tokens: {figures['greedy_steps'] - figures['greedy_identical']} of "
            f"{figures['greedy_steps']} are not transformers' choice, one ranked {figures['greedy_worst_gap']:.4g} nats "
            f"below it, more than the largest prompt log-prob difference ({figures['max_abs_logprob_diff']:.4g})")))
    return out


def check_engine(engine: str, out: str | Path, *, model, prompts: list[list[int]], max_new_tokens: int,
                 python: str | None = None, tolerance: float = ENGINE_TOLERANCE, timeout: float = 900.0) -> EngineReport:
    """Run ``out`` in ``engine`` and compare with ``model`` (transformers, already loaded;
    None when it could not load the output)."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    python = check_engine_python(python)
    if python == sys.executable:
        if not vllm_here():
            return _not_installed(engine, python, f"no vllm in this interpreter ({python}); "
                                  "pass --engine-python with the python of a venv that has it")
    request = {"model": str(Path(out).resolve()), "prompts": prompts, "max_new_tokens": max_new_tokens,
               "max_model_len": max(len(p) for p in prompts) + max_new_tokens + 16}
    t0 = time.perf_counter()
    result, tail, code = run_once(python, request, timeout)
    seconds = round(time.perf_counter() - t0, 3)
    if result is None:
        result = {"status": "refused", "reason": exit_reason(code, tail, timeout)}
    status, version, reason = result["status"], result.get("version"), result.get("reason")
    common = dict(engine=engine, python=python, version=version, seconds=seconds, tolerance=tolerance)
    if status == "not_installed":
        return _not_installed(engine, python, f"vllm does not import in {python}: {reason}")
    if status == "refused":
        return EngineReport(**common, status="refused", reason=reason, log_tail=tail, findings=[Finding(
            check=f"engine.{engine}.refused", severity="error", breaks=["vLLM"],
            message=f"--engine {engine} was asked for and {engine} {version or ''}".rstrip() + " cannot run this output on "
                    "this machine (its reason is on the engine's line, engines[].reason in the JSON report)")])
    if model is None:
        return EngineReport(**common, status="served", load_seconds=result.get("load_seconds"), findings=[Finding(
            check=f"engine.{engine}.unchecked", severity="warning", breaks=[],
            message="vLLM served the output but transformers could not load it (see the run check), so nothing was "
                    "compared")])
    ref = reference_logprobs(model, prompts, result["greedy"])
    figures = compare(prompts, result["prompt_logprobs"], result["greedy"], ref)
    return EngineReport(**common, status="served", load_seconds=result.get("load_seconds"),
                        findings=disagreements(engine, figures, tolerance), **figures)
