"""The teacher pass in vLLM (``k2mini teacher --engine vllm``): the same corpus, blocks and
cache as the layer-streamed engine (teacher/run.py, whose ``write_cache`` this reuses), with
the unpruned model held by vLLM across GPUs and nodes in the parallel layout given (tensor,
pipeline, data and expert parallel are vLLM's own; nothing here re-implements them).

vLLM runs in a subprocess of its own interpreter (engine/process.py, engine/vllm_worker.py's
``teacher`` mode), loaded once. Blocks go in as token ids (an int32 file per block, the
next one sent before the current one's result is read, so the engine is not idle while a
shard is written) and come back one at a time as top-k ids and log-probs over a pipe, so
memory is that of one block in each process whatever the corpus size, and a block's shard
is written (atomically) as soon as it arrives: --resume recomputes only missing blocks.

What vLLM returns with ``logprobs_mode="raw_logprobs"`` is log-softmax of the full logits at
each position, so the cached log-probs and the tail mass mean what the layer-streamed
engine's do; the log-sum-exp of the logits is not returned, so the cache has none (its
manifest says ``"logsumexp": false``; heal does not need it).

Data parallel (``--data-parallel-size D``) is vLLM's offline multi-process form
(examples/features/data_parallel/data_parallel_offline.py): D engine processes on this
node, told their rank through VLLM_DP_RANK / VLLM_DP_SIZE / VLLM_DP_MASTER_*, each given a
contiguous share of every block (with expert parallel their MoE layers run in lockstep, so
every rank gets at least one sequence per block: an empty share is padded with the block's
first sequence, whose result is dropped).
"""

from __future__ import annotations

import math
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from k2mini.analysis.calibration import CalibrationSet
from k2mini.analysis.schema import SourceFingerprint
from k2mini.checkpoint.reader import Checkpoint
from k2mini.engine.process import EngineFailure, EngineProcess
from k2mini.errors import UsageError
from k2mini.model.layerwise import DEFAULT_MEMORY_BUDGET
from k2mini.teacher.cache import TeacherManifest, TokenizerIdentity, encode_block, write_block
from k2mini.teacher.run import CachePlan, RankStats, check_top_k, write_cache

ENGINE_DIR = "engine"  # in the partial directory while the engine runs: its log and the block requests
# Memory per cached entry (position x k) while a block is in flight: vLLM's flat lists (a
# Python int, float and rank per entry, k + 1 entries per position: about 100 B), our
# numpy copies and the tensors the shard is encoded from (about 30 B).
_BYTES_PER_ENTRY = 130


@dataclass
class VllmOptions:
    python: str
    top_k: int = 64
    block_sequences: int | None = None  # None: as many as fit memory_budget
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    max_model_len: int | None = None  # None: the sequence length + 1 (the prompt and the one generated step)
    gpu_memory_utilization: float | None = None
    dtype: str = "auto"
    extra: dict = field(default_factory=dict)  # other LLM(...) keyword arguments, passed through (--engine-arg)
    timeout: float = 3600.0  # seconds of silence from the engine (loading included) before it counts as hung
    flat_logprobs: bool = True  # False only to measure what vLLM's per-position dicts cost (scripts/bench_teacher.py)
    progress: bool = True


def default_block_sequences(seq_len: int, top_k: int, memory_budget: int) -> int:
    return max(1, memory_budget // (seq_len * (top_k + 1) * _BYTES_PER_ENTRY))


def engine_args(opts: VllmOptions, seq_len: int) -> dict:
    """The ``LLM(...)`` keyword arguments: the layout as given, plus what a teacher pass needs."""
    args = {"tensor_parallel_size": opts.tensor_parallel_size, "pipeline_parallel_size": opts.pipeline_parallel_size,
            "enable_expert_parallel": opts.enable_expert_parallel, "dtype": opts.dtype,
            "max_model_len": opts.max_model_len or seq_len + 1}
    if opts.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = opts.gpu_memory_utilization
    return {**args, **opts.extra}


def check_options(opts: VllmOptions, seq_len: int, vocab: int) -> None:
    check_top_k(opts.top_k, vocab)
    for flag, v in (("--tensor-parallel-size", opts.tensor_parallel_size), ("--pipeline-parallel-size", opts.pipeline_parallel_size),
                    ("--data-parallel-size", opts.data_parallel_size)):
        if v < 1:
            raise UsageError(f"{flag} {v}: must be >= 1")
    if opts.max_model_len is not None and opts.max_model_len < seq_len + 1:
        raise UsageError(f"--max-model-len {opts.max_model_len}: must be at least --seq-len + 1 = {seq_len + 1} "
                         "(each sequence plus the step whose log-probs give the last position)")
    if opts.gpu_memory_utilization is not None and not 0 < opts.gpu_memory_utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization {opts.gpu_memory_utilization}: must be in (0, 1]")
    if not opts.timeout > 0:
        raise UsageError(f"--engine-timeout {opts.timeout}: must be positive")


def _engine_error(exc: EngineFailure, python: str) -> UsageError:
    if exc.status == "not_installed":
        return UsageError(f"--engine vllm: vllm does not import in {python}: {exc.reason}")
    name = f"vllm {exc.version}" if exc.version else "vllm"
    return UsageError(f"--engine vllm: {name} failed: {exc.reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shares(s0: int, s1: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous shares of sequences [s0, s1) for ``ranks`` data-parallel ranks."""
    n = s1 - s0
    bounds = [s0 + (n * r) // ranks for r in range(ranks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class _Engines:
    """The D engine processes of one run, started and loaded; blocks sent and received in order."""

    def __init__(self, opts: VllmOptions, model: Path, seq_len: int, workdir: Path):
        self.opts, self.seq_len, self.workdir = opts, seq_len, workdir
        d = opts.data_parallel_size
        port = _free_port() if d > 1 else None
        self.procs: list[EngineProcess] = []
        config = {"model": str(model), "top_k": opts.top_k, "flat": opts.flat_logprobs,
                  "engine_args": engine_args(opts, seq_len)}
        t0 = time.perf_counter()
        try:
            for r in range(d):
                rdir = workdir / f"rank{r}"
                rdir.mkdir(parents=True)
                env = {} if d == 1 else {"VLLM_DP_RANK": str(r), "VLLM_DP_RANK_LOCAL": str(r), "VLLM_DP_SIZE": str(d),
                                         "VLLM_DP_MASTER_IP": "127.0.0.1", "VLLM_DP_MASTER_PORT": str(port)}
                self.procs.append(EngineProcess(opts.python, "teacher", [], workdir=rdir, stream=True, env=env))
            for p in self.procs:
                p.send(config)
            ready = [p.recv(opts.timeout) for p in self.procs]
        except BaseException:
            self.close()  # the ranks already started, e.g. when another one refused
            raise
        self.version = ready[0].get("version")
        self.load_seconds = time.perf_counter() - t0

    def send(self, i: int, ids: torch.Tensor) -> list[tuple[int, int]]:
        """Request block ``i`` (token ids [n, L]); returns each rank's share (row range, may be empty)."""
        shares = _shares(0, ids.shape[0], len(self.procs))
        for r, (a, b) in enumerate(shares):
            rows = ids[a:b] if b > a else ids[:1]  # an empty share: a stand-in sequence, its result dropped
            path = self.workdir / f"rank{r}" / f"ids-{i:05d}.bin"
            rows.to(torch.int32).numpy().tofile(path)
            self.procs[r].send({"block": i, "ids_file": str(path), "sequences": rows.shape[0], "seq_len": self.seq_len})
        return shares

    def recv(self, i: int, shares: list[tuple[int, int]], stats: RankStats) -> tuple[torch.Tensor, torch.Tensor]:
        k, L = self.opts.top_k, self.seq_len
        ids_parts, lp_parts = [], []
        for r, (a, b) in enumerate(shares):
            n = max(1, b - a)
            head = self.procs[r].recv(self.opts.timeout)
            if (head.get("block"), head.get("sequences"), head.get("seq_len"), head.get("top_k")) != (i, n, L, k):
                raise EngineFailure("refused", f"answered {head} to the request for block {i} ({n} x {L}, top-{k})", self.version)
            size = n * L * k * 4
            ids = np.frombuffer(self.procs[r].recv_bytes(size, self.opts.timeout), dtype=np.int32).reshape(n, L, k)
            lps = np.frombuffer(self.procs[r].recv_bytes(size, self.opts.timeout), dtype=np.float32).reshape(n, L, k)
            (self.workdir / f"rank{r}" / f"ids-{i:05d}.bin").unlink()
            if b > a:
                ids_parts.append(torch.from_numpy(ids.copy()))
                lp_parts.append(torch.from_numpy(lps.copy()))
            for key in ("generate_seconds", "convert_seconds"):
                stats.engine[key] = stats.engine.get(key, 0.0) + float(head.get(key, 0.0))
        return torch.cat(ids_parts), torch.cat(lp_parts)

    def stop(self) -> None:
        for p in self.procs:
            p.stop(timeout=60)

    def close(self) -> None:
        for p in self.procs:
            p.close()


def _check_result(i: int, ids: torch.Tensor, lps: torch.Tensor, vocab: int, version: str | None) -> None:
    """What a wrong engine answer would look like, refused before it becomes a shard."""
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise EngineFailure("refused", f"block {i}: token ids outside the vocabulary [0, {vocab})", version)
    if bool(torch.isnan(lps).any()) or float(lps.max()) > 1e-3:
        raise EngineFailure("refused", f"block {i}: log-probs that are NaN or above 0", version)


def run_teacher_vllm(ck: Checkpoint, calib: CalibrationSet, tokenizer: TokenizerIdentity, out: Path, opts: VllmOptions, *,
                     source_arg: str, overwrite: bool = False, resume: bool = False) -> tuple[TeacherManifest, list[RankStats]]:
    """Compute every missing block in vLLM into ``out``'s partial directory, then publish ``out``."""
    from accelerate import PartialState

    vocab = int(ck.config["vocab_size"])
    n_seq, seq_len = calib.input_ids.shape
    check_options(opts, seq_len, vocab)
    if not isinstance(getattr(ck.source, "root", None), Path):
        raise UsageError(f"--engine vllm: {source_arg} must be a local directory (vLLM loads it from disk)")
    per = opts.block_sequences or default_block_sequences(seq_len, opts.top_k, opts.memory_budget)
    state = PartialState(cpu=True)
    if state.num_processes > 1:
        raise UsageError("--engine vllm: launch k2mini once, not under torchrun; vLLM does its own parallelism "
                         "(--tensor-parallel-size, --pipeline-parallel-size, --data-parallel-size)")
    layout = {k: v for k, v in engine_args(opts, seq_len).items() if k != "max_model_len"}
    version: list[str | None] = [None]

    def compute(todo, partial: Path, stats: RankStats) -> None:
        workdir = partial / ENGINE_DIR
        shutil.rmtree(workdir, ignore_errors=True)
        engines = None
        bar = None
        try:
            engines = _Engines(opts, ck.source.root, seq_len, workdir)
            if engines.version != version[0]:
                raise EngineFailure("refused", f"reports version {engines.version}, {version[0]} when the run was planned",
                                    engines.version)
            stats.engine["load_seconds"] = engines.load_seconds
            if opts.progress:
                from tqdm import tqdm

                bar = tqdm(total=sum(s1 - s0 for _, s0, s1 in todo) * seq_len, unit="tok", unit_scale=True,
                           desc=f"teacher (vllm {engines.version})")
            pending = engines.send(todo[0][0], calib.input_ids[todo[0][1] : todo[0][2]])
            for j, (i, s0, s1) in enumerate(todo):
                nxt = None
                if j + 1 < len(todo):  # queue the next block before reading this one: no idle engine between blocks
                    i2, a2, b2 = todo[j + 1]
                    nxt = engines.send(i2, calib.input_ids[a2:b2])
                ids, lps = engines.recv(i, pending, stats)
                _check_result(i, ids, lps, vocab, engines.version)
                write_block(partial, i, encode_block(calib.input_ids[s0:s1], ids, lps))
                stats.blocks += 1
                stats.sequences += s1 - s0
                if bar is not None:
                    bar.update((s1 - s0) * seq_len)
                pending = nxt
            engines.stop()
        except EngineFailure as exc:
            raise _engine_error(exc, opts.python) from None
        finally:
            if bar is not None:
                bar.close()
            if engines is not None:
                engines.close()
        shutil.rmtree(workdir, ignore_errors=True)

    # The manifest records the engine's version, which only the engine can tell: ask it
    # before planning (a missing or broken vLLM is refused here, before anything is written).
    version[0] = probe_version(opts.python, opts.timeout)
    plan = CachePlan(SourceFingerprint.of(ck), tokenizer, calib, opts.top_k, per, logsumexp=False, compute={
        "engine": "vllm", "engine_version": version[0] or "unknown", "data_parallel_size": opts.data_parallel_size,
        "logprobs_mode": "raw_logprobs", **{k: v for k, v in layout.items() if isinstance(v, (str, int, float, bool))}})
    return write_cache(plan, out, compute, state=state, source_arg=source_arg, overwrite=overwrite, resume=resume)


def probe_version(python: str, timeout: float) -> str | None:
    """vllm's version in ``python`` (``import vllm`` only, no model); EngineFailure as UsageError."""
    import json
    import subprocess

    code = "import json, vllm; print(json.dumps(getattr(vllm, '__version__', None)))"
    try:
        p = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=min(timeout, 600),
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"--engine vllm: `import vllm` in {python} did not finish within {min(timeout, 600):g} s") from None
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        reason = " ".join(lines[-1].split())[:300] if lines else f"exit code {p.returncode}"
        raise UsageError(f"--engine vllm: vllm does not import in {python}: {reason}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def estimate_cache(calib: CalibrationSet, opts: VllmOptions) -> dict:
    """--dry-run for the vLLM engine: sizes only (its speed is the engine's)."""
    from k2mini.teacher.cache import bytes_per_token

    n_seq, seq_len = calib.input_ids.shape
    per = opts.block_sequences or default_block_sequences(seq_len, opts.top_k, opts.memory_budget)
    return {"engine": "vllm", "sequences": n_seq, "seq_len": seq_len, "tokens": n_seq * seq_len, "top_k": opts.top_k,
            "block_sequences": per, "blocks": math.ceil(n_seq / per), "bytes_per_token": bytes_per_token(opts.top_k, False),
            "cache_bytes": n_seq * seq_len * bytes_per_token(opts.top_k, False), "engine_args": engine_args(opts, seq_len)}
