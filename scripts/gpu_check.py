"""The GPU check: the whole k2mini pipeline on one device, one line of figures per step.

Builds a K2-format fixture (or takes --source), then runs, through the k2mini command line
(the same flags a user types, --device DEV wherever the command takes one):

  fixture           k2mini fixture (tiny, or K2's real tensor shapes with --size real-dims)
  analyze           layer-streamed calibration run, output-error orders on
  convert-fp8       convert --analysis --dtype fp8 (FP8 bytes copied)
  convert-bf16      convert --analysis --dtype bf16
  teacher           the unpruned source, layer-streamed (--engine layerwise), top-k cache
  heal              heal --method lora for a few steps (gradient checkpointing on CUDA)
  quantize          quantize the healed model --bits 4 (compressed-tensors)
  validate          validate the INT4 model --reference SOURCE (KL, top-1)
  validate-fp8      validate the FP8 output --reference SOURCE (transformers' FP8 path)
  generate          run SOURCE, every expert resident (the baseline for the next two)
  offload           run SOURCE --offload --no-prefetch (experts on demand)
  offload-prefetch  run SOURCE --offload --prefetch (router-guided prefetch)

Each step runs in this process (imports once; the CLI is called as `k2mini ...` would be)
and is timed alone: wall time, peak device memory (torch.cuda.max_memory_allocated on
CUDA, reset before each step; validate and heal reset it again once they start, with what
is then allocated still counted), peak RSS of this process during the step, and the step's
own figures (tokens/s, hit rates, KL, ...) read from the command's --json output. The
first step that fails stops the run: exit 1 and a line naming the step and the command's
last error lines. Each step's stderr is kept in WORK/logs/STEP.log; the whole table goes to
WORK/gpu_check.json (and to stdout with --json).

On a GPU machine, from a bare checkout (no pip install; the script puts its checkout first
on sys.path, so PYTHONPATH=. is optional):

  PYTHONPATH=. python scripts/gpu_check.py --device cuda --size real-dims --work /tmp/g

What the machine's Python lacks of pyproject's dependencies is listed before the steps run
(a warning: steps that need it then fail, named). Packages can travel as wheels (about 3 MB
for pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions,
compressed-tensors and loguru, which the H200 image's package list lacks): where a registry
is reachable,

  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 ...

then on the GPU machine

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=.:/tmp/site python3 scripts/gpu_check.py --device cuda --size real-dims --work /tmp/g

CI runs `python scripts/gpu_check.py --device cpu --size small --work DIR` so it cannot rot.

Examples:
  python scripts/gpu_check.py --device cpu --size small --work /tmp/g
  python scripts/gpu_check.py --device cpu --work /tmp/g --steps analyze,convert-fp8 --json
  PYTHONPATH=. python scripts/gpu_check.py --device cuda --size real-dims --work /tmp/g --json
  python scripts/gpu_check.py --device cuda --source ./Kimi-K2-Instruct-4layers --work /tmp/g
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = ".k2mini-gpu-check"  # a work directory holding it is ours to clear


@dataclass(frozen=True)
class Size:
    """How big each step's work is."""

    preset: str
    fixture_flags: tuple[str, ...]
    keep_layers: int
    keep_experts: int
    analyze: tuple[str, ...]  # --samples/--seq-len/--output-error-tokens
    teacher: tuple[str, ...]
    heal: tuple[str, ...]
    validate: tuple[str, ...]
    budget: str  # offload device budget: about half of all routed experts (BF16)
    max_new_tokens: int


SIZES = {
    # The tiny preset (hidden 192, 1 dense + 3 MoE layers of 8 experts): seconds per step on a CPU.
    "small": Size(
        preset="tiny", fixture_flags=(), keep_layers=3, keep_experts=4,
        analyze=("--samples", "4", "--seq-len", "64", "--output-error-tokens", "128"),
        teacher=("--samples", "8", "--seq-len", "64", "--top-k", "32"),
        heal=("--steps", "3", "--batch-size", "2", "--eval-fraction", "0.25"),
        validate=("--samples", "2", "--seq-len", "64", "--max-new-tokens", "4"),
        budget="1.3MB", max_new_tokens=8,
    ),
    # Kimi-K2's tensor shapes (hidden 7168, MLA, 2048-wide experts), 1 dense + 3 MoE layers
    # of 8 experts: 1.9 GB of FP8, for a GPU (on 2 CPU cores: analyze 2 min, validate 5 min).
    "real-dims": Size(
        preset="real-dims", fixture_flags=("--layers", "4"), keep_layers=3, keep_experts=4,
        analyze=("--samples", "8", "--seq-len", "128", "--output-error-tokens", "512"),
        teacher=("--samples", "16", "--seq-len", "128", "--top-k", "64"),
        heal=("--steps", "4", "--batch-size", "4", "--eval-fraction", "0.25"),
        validate=("--samples", "4", "--seq-len", "128", "--max-new-tokens", "8"),
        budget="1GB", max_new_tokens=16,
    ),
}

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nThe river"


@dataclass
class Step:
    name: str
    needs: tuple[str, ...]
    args: list[str]  # k2mini's argv
    figures: Callable[[dict, float], dict]  # (--json output, wall seconds) -> figures; raises StepFailed when they are wrong


class StepFailed(Exception):
    pass


@dataclass
class Result:
    name: str
    ok: bool
    wall_s: float
    peak_rss_bytes: int | None
    peak_cuda_bytes: int | None
    figures: dict = field(default_factory=dict)
    error: str | None = None
    command: str = ""


def _finite(name: str, value) -> float:
    if value is None or not math.isfinite(float(value)):
        raise StepFailed(f"{name} is {value}")
    return float(value)


def _analyze_figures(out: dict, wall: float) -> dict:
    tokens = int(out["calibration"]["tokens"])
    moe = [l for l in out["layers"] if l.get("kind") == "moe"]
    n = int(out["source"]["n_routed_experts"])
    # Each MoE layer's output-error order ranks every expert once (convert --analysis keeps its tail).
    ordered = [l for l in moe if sorted(l["experts"].get("output_error_order") or []) == list(range(n))]
    if len(ordered) != len(moe):
        raise StepFailed(f"a full output-error order in {len(ordered)} of {len(moe)} MoE layers")
    return {"tokens": tokens, "tok_per_s": round(tokens / wall, 1), "moe_layers": len(moe),
            "output_error_tokens": out["output_error_tokens"]}


def _convert_figures(out: dict, wall: float) -> dict:
    return {"dtype": out["dtype"], "bytes_written": out["total_size"], "bytes_read": out["bytes_read"],
            "MB_per_s": round(out["total_size"] / max(out["seconds"], 1e-9) / 1e6, 1)}


def _teacher_figures(out: dict, wall: float) -> dict:
    return {"tokens": out["tokens"], "tok_per_s": round(out["tokens"] / max(out["seconds"], 1e-9), 1),
            "cache_bytes": out["cache_bytes"]}


def _heal_figures(out: dict, wall: float) -> dict:
    figs = {"steps": out["steps"], "tok_per_s": out["tokens_per_second"],
            "train_kl": f"{_finite('first_loss', out['first_loss']):.4f}->{_finite('last_loss', out['last_loss']):.4f}"}
    if out.get("first_eval_kl") is not None:
        figs["heldout_kl"] = f"{_finite('first_eval_kl', out['first_eval_kl']):.4f}->{_finite('last_eval_kl', out['last_eval_kl']):.4f}"
    return figs


def _quantize_figures(out: dict, wall: float) -> dict:
    return {"bytes_out": out["bytes_out"], "int_share_linear": round(out["int_byte_share_linear"], 4),
            "mean_rel_error": round(_finite("mean_rel_error", out["mean_rel_error"]), 5)}


def _validate_figures(out: dict, wall: float) -> dict:
    if not out["passed"]:
        errors = [f["message"] for part in ("static", "run", "reference") if out.get(part)
                  for f in out[part]["findings"] if f["severity"] == "error"]
        memory = out.get("memory")
        if memory and not memory["fits_latent"]:
            errors.append(f"does not fit {memory['gpu']}")
        raise StepFailed("validate did not pass: " + "; ".join(errors[:3]))
    ref, run = out["reference"], out["run"]
    return {"kl": round(_finite("kl_mean", ref["kl_mean"]), 5), "top1": round(ref["top1_agreement"], 4),
            "ppl": f"{ref['ppl_source']:.2f}/{ref['ppl_reduced']:.2f}", "load_s": round(run["load_seconds"], 2),
            "gen_tokens": run["generated_tokens"]}


def _generate_figures(out: dict, wall: float) -> dict:
    return {"decode_tok_per_s": out["decode_tokens_per_second"], "new_tokens": out["new_tokens"],
            "load_s": out["load_seconds"]}


def _offload_figures(out: dict, wall: float) -> dict:
    st = out["offload_stats"]
    return {"decode_tok_per_s": out["decode_tokens_per_second"], "prefetch": out["prefetch"],
            "hit_device": st["hit_rate"]["device"], "hit_host": st["hit_rate"]["host"],
            "MiB_read_per_token": round(st.get("bytes_read_per_token", 0) / 2**20, 3),
            "fetch_ms_per_token": round(st.get("fetch_ms_per_token", 0), 2),
            "peak_expert_bytes": out["memory"]["peak_device_tier_bytes"]}


def build_steps(size: Size, device: str, work: Path, source: Path) -> list[Step]:
    w = str(work)
    src = str(source)
    on_cuda = device.startswith("cuda")
    prune = ("--analysis", f"{w}/analysis.json", "--layers", str(size.keep_layers), "--experts", str(size.keep_experts))
    validate = ("--reference", src, "--device", device, "--gpu", "h200", *size.validate, "--json", "--quiet")
    generate = ("run", src, "--prompt", PROMPT, "--max-new-tokens", str(size.max_new_tokens), "--device", device, "--json",
                "--quiet")
    offload = (*generate, "--offload", "--budget", size.budget)
    return [
        Step("fixture", (), ["fixture", src, "--preset", size.preset, *size.fixture_flags],
             lambda out, wall: {"preset": out["preset"], "layers": out["layers"], "experts": out["experts"]}),
        Step("analyze", ("fixture",), ["analyze", "-s", src, "-o", f"{w}/analysis.json", *size.analyze, "--device", device,
                                      "--output-error", "--no-plots", "--json", "--quiet"], _analyze_figures),
        Step("convert-fp8", ("analyze",), ["convert", "-s", src, *prune, "--dtype", "fp8", "-o", f"{w}/fp8", "--json",
                                          "--no-progress"], _convert_figures),
        Step("convert-bf16", ("analyze",), ["convert", "-s", src, *prune, "--dtype", "bf16", "-o", f"{w}/bf16", "--json",
                                           "--no-progress"], _convert_figures),
        Step("teacher", ("fixture",), ["teacher", "-s", src, "-o", f"{w}/teacher", *size.teacher, "--engine", "layerwise",
                                      "--device", device, "--json", "--quiet"], _teacher_figures),
        Step("heal", ("convert-bf16", "teacher"),
             ["heal", f"{w}/bf16", "--teacher", f"{w}/teacher", "-o", f"{w}/healed", "--method", "lora", *size.heal,
              "--gradient-checkpointing" if on_cuda else "--no-gradient-checkpointing", "--device", device, "--json",
              "--quiet"], _heal_figures),
        Step("quantize", ("heal",), ["quantize", f"{w}/healed", "--bits", "4", "-o", f"{w}/int4", "--json", "--quiet"],
             _quantize_figures),
        Step("validate", ("quantize",), ["validate", f"{w}/int4", *validate], _validate_figures),
        Step("validate-fp8", ("convert-fp8",), ["validate", f"{w}/fp8", *validate], _validate_figures),
        # Every expert resident: the baseline for the two offload steps (and their warm-up).
        Step("generate", ("fixture",), list(generate), _generate_figures),
        Step("offload", ("fixture",), [*offload, "--no-prefetch"], _offload_figures),
        Step("offload-prefetch", ("fixture",), [*offload, "--prefetch"], _offload_figures),
    ]


def refuse(message: str) -> None:
    """Bad input: one line, exit 2 (as k2mini's own errors), nothing run."""
    print(f"gpu_check: error: {message}", file=sys.stderr)
    sys.exit(2)


def select(steps: list[Step], wanted: list[str] | None, have_source: bool) -> list[Step]:
    """The steps asked for and every step they need, in pipeline order."""
    by_name = {s.name: s for s in steps}
    if wanted is None:
        chosen = set(by_name)
    else:
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            refuse(f"--steps {','.join(unknown)}: not a step (steps: {', '.join(by_name)})")
        chosen, todo = set(), list(wanted)
        while todo:
            n = todo.pop()
            if n not in chosen:
                chosen.add(n)
                todo.extend(by_name[n].needs)
    if have_source:
        chosen.discard("fixture")
    return [s for s in steps if s.name in chosen]


def preflight() -> list[str]:
    """pyproject's dependencies this Python lacks or has outside the pinned range (one line each)."""
    from importlib import metadata

    try:
        import tomllib
    except ImportError:  # Python 3.10
        return ["note: no tomllib (Python < 3.11): dependencies not checked"]
    reqs = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    lines = []
    for req in reqs:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            lines.append(f"missing: {req}")
            continue
        if Requirement is not None and not Requirement(req).specifier.contains(have, prereleases=True):
            lines.append(f"outside the range: {name} {have} (pyproject: {req})")
    return lines


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    try:
        env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _reset_peak_rss() -> bool:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so each step's peak is its own.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _invoke(args: list[str]) -> tuple[int, str, str]:
    """k2mini ARGS in this process: (exit code, stdout, stderr)."""
    import click

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            from k2mini.cli import cli  # here: a dependency the machine lacks fails the first step, named

            cli.main(args, prog_name="k2mini", standalone_mode=False)
            code = 0
        except SystemExit as exc:  # the CLI's own exits: K2MiniError -> 2, validate -> 0/1
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
        except click.ClickException as exc:  # bad flags: what click would print, exit 2
            exc.show()
            code = exc.exit_code
        except Exception:  # a bug: the traceback goes to the step's log, its last line to the table
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def run_step(step: Step, device: str, logs: Path) -> Result:
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_own = _reset_peak_rss()
    t0 = time.perf_counter()
    code, out, err = _invoke(step.args)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    res = Result(step.name, False, round(wall, 2), _peak_rss() if rss_own else None,
                 torch.cuda.max_memory_allocated(device) if cuda else None, command="k2mini " + " ".join(map(_quote, step.args)))
    (logs / f"{step.name}.log").write_text(f"$ {res.command}\n(exit {code})\n--- stdout\n{out}\n--- stderr\n{err}")
    try:
        parsed = json.loads(out) if out.strip() else None
    except ValueError:
        parsed = None
    if code != 0 and not (step.name.startswith("validate") and code == 1 and parsed):
        res.error = f"exit {code}: " + _tail(err)
        return res
    if parsed is None:
        res.error = "no JSON on stdout: " + _tail(out or err)
        return res
    try:
        res.figures = step.figures(parsed, wall)
    except StepFailed as exc:
        res.error = str(exc)
        return res
    except (KeyError, TypeError, ValueError) as exc:
        res.error = f"unexpected --json output ({exc.__class__.__name__}: {exc})"
        return res
    res.ok = True
    return res


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[\w./:=,@+-]+", a) else json.dumps(a)


def _tail(text: str, n: int = 3) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip() and not l.lstrip().startswith(("warnings.warn", "return "))]
    lines = [l for l in lines if "Warning:" not in l] or lines
    return " | ".join(lines[-n:]) or "(no output)"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def line(res: Result) -> str:
    figs = "  ".join(f"{k} {v}" for k, v in res.figures.items())
    mem = f"rss {_gib(res.peak_rss_bytes):>9}" + (f"  cuda {_gib(res.peak_cuda_bytes):>9}" if res.peak_cuda_bytes is not None else "")
    return f"{res.name:<16} {'ok' if res.ok else 'FAIL':<4} {res.wall_s:8.1f} s  {mem}  " + (figs if res.ok else res.error)


def prepare_work(work: Path) -> None:
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            refuse(f"--work {work}: exists, is not empty and was not made by this script")
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    (work / MARKER).write_text("made by scripts/gpu_check.py; the next run clears this directory\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: passed to every command that takes --device (default: cpu)")
    ap.add_argument("--work", required=True, type=Path, help="work directory (cleared first when an earlier run of this script made it)")
    ap.add_argument("--size", choices=tuple(SIZES), default="small", help="small: tiny fixture; real-dims: K2's tensor shapes (default: small)")
    ap.add_argument("--source", type=Path, default=None, help="use this K2-format checkpoint instead of building a fixture")
    ap.add_argument("--steps", default=None, help="comma-separated steps to run (each with the steps it needs)")
    ap.add_argument("--json", action="store_true", help="print the whole table as JSON on stdout (the lines go to stderr)")
    args = ap.parse_args(argv)
    # The checkout this script lies in, not an installed k2mini: a bare clone runs as it is.
    sys.path.insert(0, str(REPO))
    # Everything is local; a GPU machine may have no network, where a Hub look-up would only hang.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    faulthandler.enable()  # a hard crash (CUDA, segfault) still prints where, after the 'running' line naming the step
    show = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            refuse(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    work = args.work.resolve()
    source = args.source.resolve() if args.source else work / "source"
    steps = select(build_steps(SIZES[args.size], args.device, work, source), args.steps.split(",") if args.steps else None,
                   args.source is not None)
    prepare_work(work)
    problems = preflight()
    for problem in problems:
        show(f"gpu_check: dependency {problem}")
    env = environment(args.device)
    show(f"gpu_check: device {args.device}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, size {args.size}, "
         f"work {work}; python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}")
    results: list[Result] = []
    failed = None
    t0 = time.perf_counter()
    for step in steps:
        print(f"gpu_check: running {step.name}", file=sys.stderr, flush=True)
        res = run_step(step, args.device, work / "logs")
        results.append(res)
        show(line(res))
        if not res.ok:
            failed = step.name
            show(f"gpu_check: step {step.name} failed (log: {work / 'logs' / (step.name + '.log')})")
            break
    total = time.perf_counter() - t0
    table = {"device": args.device, "size": args.size, "source": str(source), "work": str(work), "environment": env,
             "dependency_problems": problems, "ok": failed is None, "failed_step": failed, "seconds": round(total, 1),
             "steps": [asdict(r) for r in results]}
    (work / "gpu_check.json").write_text(json.dumps(table, indent=1) + "\n")
    if failed is None:
        show(f"gpu_check: {len(results)} steps passed in {total:.1f} s")
    if args.json:
        print(json.dumps(table, indent=1))
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
