"""The teacher pass behind ``k2mini teacher``: the unpruned source, run once layer by layer
over a corpus, and what it predicts at every position cached (format: teacher/cache.py).

The corpus is cut into blocks of whole sequences. A block goes through every decoder
layer (one layer resident, only routed experts read: model/layerwise.py), then through
the final norm and the lm_head, whose vocabulary is streamed in row blocks while a running
top-k and log-sum-exp are kept per position: full logits are never held. The block is then
written as one shard. Memory is that of one block (sized from --memory-budget), whatever
the corpus size; the source is read once per block.

Data-parallel (torchrun / accelerate launch, through accelerate's ``PartialState``): rank r
computes blocks r, r + N, ... A block's arithmetic does not depend on the rank that does
it, so N ranks write the shards one process would, byte for byte. Ranks on one node read
the same layers at about the same time, so the page cache serves the source once per
sweep. Rank 0 owns the output directory (lock, manifest, final rename).

Resume: a block file exists only once complete (written to a temporary name, fsynced,
renamed), so --resume recomputes just the blocks that are missing.

``write_cache`` (blocks, resume, manifest, publishing) is shared with the other engine,
vLLM (teacher/vllm_engine.py), which computes the same blocks in one process of its own.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k2mini import __version__
from k2mini.analysis.calibration import CalibrationSet
from k2mini.analysis.schema import SourceFingerprint
from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.model.layerwise import DEFAULT_MEMORY_BUDGET, LayerwiseRunner
from k2mini.teacher.cache import (
    MANIFEST, ShardEntry, TeacherManifest, TokenizerIdentity, block_file, bytes_per_token, encode_block, sha256_file, tensors,
    write_block,
)

RUN_FILE = "teacher_run.json"  # how this run went (ranks, time, bytes read): not part of the cache's identity
OPTIONS_FILE = ".teacher_options.json"  # in the partial directory: what --resume must match
_LIVE_STORES = 5  # activation stores of a block alive at once: layer in/out, MLP input, routed sum, final norm
_HEAD_TOKENS = 2048  # positions per lm_head matmul: [2048, 16384] float32 logits = 128 MB


@dataclass
class TeacherOptions:
    top_k: int = 64
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    block_sequences: int | None = None  # None: as many as fit the budget
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    progress: bool = True


@dataclass
class RankStats:
    rank: int
    blocks: int = 0
    blocks_resumed: int = 0
    sequences: int = 0
    seconds: float = 0.0
    # /proc/self/io: includes children reaped meanwhile (vllm: the engine process, its libraries and the model)
    bytes_requested: int = 0  # bytes this process read through read() calls (page cache hits included)
    bytes_from_storage: int = 0  # bytes the kernel fetched from the disk for it
    layer_seconds: list[float] = field(default_factory=list)  # layerwise: mean per block
    engine: dict[str, float] = field(default_factory=dict)  # vllm: load, generate and convert seconds


def tokenizer_identity(ck: Checkpoint, eos_id: int | None) -> TokenizerIdentity:
    src = ck.source
    name = "tokenizer.json" if src.exists("tokenizer.json") else "tiktoken.model"
    return TokenizerIdentity(file=name, sha256=hashlib.sha256(src.read_bytes(name)).hexdigest(), eos_id=eos_id,
                             vocab_size=int(ck.config["vocab_size"]))


def default_block_sequences(seq_len: int, hidden: int, memory_budget: int) -> int:
    """Sequences per block such that a block's activations fit ``memory_budget`` in RAM."""
    return max(1, memory_budget // (_LIVE_STORES * seq_len * hidden * 4))


def check_top_k(k: int, vocab: int) -> None:
    if not 1 <= k <= vocab:
        raise UsageError(f"--top-k {k}: must be between 1 and the vocabulary size {vocab}")


def _io_counters() -> tuple[int, int]:
    """(bytes read by read() calls, bytes fetched from storage) for this process so far."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["rchar"]), int(fields["read_bytes"])
    except (OSError, KeyError, ValueError):
        return 0, 0


@torch.no_grad()
def head_topk(runner: LayerwiseRunner, normed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For final-normed states ``[N, H]``: the top-k token ids ``[N, k]`` (best first), their
    logits ``[N, k]`` and the log-sum-exp of every logit ``[N]``.

    The lm_head is read once, in row blocks (the outer loop); for each block every
    position's logits against it are computed in chunks and merged into a running top-k and
    log-sum-exp. Ties between equal logits keep the lower token id first.
    """
    n = normed.shape[0]
    vals = torch.full((n, k), float("-inf"))
    ids = torch.zeros((n, k), dtype=torch.long)
    lse = torch.full((n,), float("-inf"))
    for r0, w in runner.head_blocks():
        for t0 in range(0, n, _HEAD_TOKENS):
            t1 = min(n, t0 + _HEAD_TOKENS)
            lg = (runner.to_compute(normed[t0:t1]) @ w.T).float()
            lse[t0:t1] = torch.logaddexp(lse[t0:t1], lg.logsumexp(-1).cpu())
            bv, bi = lg.topk(min(k, lg.shape[1]), dim=-1)
            cand_v = torch.cat([vals[t0:t1], bv.cpu()], 1)
            cand_i = torch.cat([ids[t0:t1], bi.cpu() + r0], 1)
            # Stable sort on (value desc): among equal values the earlier candidate (lower id) wins.
            order = cand_v.argsort(dim=1, descending=True, stable=True)[:, :k]
            vals[t0:t1] = cand_v.gather(1, order)
            ids[t0:t1] = cand_i.gather(1, order)
    return ids, vals, lse


@torch.no_grad()
def teacher_block(runner: LayerwiseRunner, input_ids: torch.Tensor, k: int, on_layer=None) -> dict[str, torch.Tensor]:
    """The cache tensors of one block of sequences ``[n, L]``."""
    n, seq_len = input_ids.shape
    h = runner.embed(input_ids)
    for layer in range(runner.n_layers):
        t0 = time.perf_counter()
        nxt = runner.run_layer(layer, h)
        h.close()
        h = nxt
        if on_layer is not None:
            on_layer(layer, time.perf_counter() - t0)
    norm = runner.final_norm()
    normed = runner.stores.make(n, seq_len, runner.hidden, name="final")
    for s0, s1 in runner._batches(n, seq_len):
        normed.data[s0:s1] = norm(runner.to_compute(h.data[s0:s1])).float().cpu()
    h.close()
    ids, vals, lse = head_topk(runner, normed.flat(), k)
    normed.close()
    return {
        "input_ids": input_ids,
        "topk_ids": ids.view(n, seq_len, k),
        "topk_logprobs": (vals - lse[:, None]).view(n, seq_len, k),
        "logsumexp": lse.view(n, seq_len),
    }


def _blocks(n_seq: int, per: int) -> list[tuple[int, int, int]]:
    return [(i, s0, min(n_seq, s0 + per)) for i, s0 in enumerate(range(0, n_seq, per))]


@dataclass
class CachePlan:
    """What every engine shares: the corpus cut into blocks, the manifest's fields, and the
    options a --resume must match (``key``). ``compute`` goes into the manifest as is."""

    fingerprint: SourceFingerprint
    tokenizer: TokenizerIdentity
    calib: CalibrationSet
    top_k: int
    block_sequences: int
    logsumexp: bool
    compute: dict[str, str | bool | int | float]

    @property
    def blocks(self) -> list[tuple[int, int, int]]:
        return _blocks(self.calib.input_ids.shape[0], self.block_sequences)

    def key(self) -> dict:
        return {
            "source": [self.fingerprint.config_sha256, self.fingerprint.index_sha256],
            "corpus": self.calib.info.model_dump(),
            "corpus_sha256": hashlib.sha256(self.calib.input_ids.to(torch.int32).numpy().tobytes()).hexdigest(),
            "top_k": self.top_k, "block_sequences": self.block_sequences, "compute": self.compute,
        }

    def manifest(self, partial: Path) -> TeacherManifest:
        n_seq, seq_len = self.calib.input_ids.shape
        shards = [ShardEntry(file=block_file(i), first_sequence=s0, sequences=s1 - s0,
                             bytes=(partial / block_file(i)).stat().st_size, sha256=sha256_file(partial / block_file(i)))
                  for i, s0, s1 in self.blocks]
        return TeacherManifest(
            tool_version=__version__, source=self.fingerprint, tokenizer=self.tokenizer, corpus=self.calib.info,
            seq_len=seq_len, top_k=self.top_k, sequences=n_seq, tokens=n_seq * seq_len, block_sequences=self.block_sequences,
            dtypes={n: str(t).removeprefix("torch.") for n, t in tensors(self.logsumexp).items()},
            bytes_per_token=bytes_per_token(self.top_k, self.logsumexp), shards=shards, compute=self.compute,
            logsumexp=self.logsumexp,
        )


# (todo blocks, partial directory, this rank's stats) -> None: writes each block's shard
ComputeBlocks = Callable[[list[tuple[int, int, int]], Path, RankStats], None]


def write_cache(plan: CachePlan, out: Path, compute_blocks: ComputeBlocks, *, state, source_arg: str, overwrite: bool,
                resume: bool) -> tuple[TeacherManifest | None, list[RankStats]]:
    """The cache directory, whatever computes its blocks: rank 0 opens (and locks) ``out``'s
    partial directory, checks a --resume against the interrupted run's options, every rank
    computes its blocks (r, r + N, ...) that are not there yet, then rank 0 writes the
    manifest and publishes ``out``. Returns the manifest (None off rank 0) and every rank's stats."""
    from accelerate.utils import gather_object

    from k2mini.output import open_on_main_rank, partial_dir

    n_seq, seq_len = plan.calib.input_ids.shape
    blocks = plan.blocks
    planned = n_seq * seq_len * bytes_per_token(plan.top_k, plan.logsumexp) + len(blocks) * 4096
    key = plan.key()
    rank, world = state.process_index, state.num_processes

    def check_resume(od) -> None:
        opt_path = od.partial / OPTIONS_FILE
        if od.resumed and opt_path.is_file() and json.loads(opt_path.read_text()) != json.loads(json.dumps(key)):
            raise UsageError(f"--resume {out}: the interrupted run used other options (source, corpus, --top-k, block size, "
                             "engine, device, dtype or parallel layout); rerun without --resume")
        opt_path.write_text(json.dumps(key, sort_keys=True))

    partial = partial_dir(out)
    with open_on_main_rank(out, state=state, prepare=check_resume, source=source_arg, overwrite=overwrite, resume=resume,
                           planned_bytes=planned) as od:
        stats = RankStats(rank=rank)
        todo = []
        for b in blocks[rank::world]:
            if resume and (partial / block_file(b[0])).is_file():
                stats.blocks_resumed += 1
            else:
                todo.append(b)
        r0, s0_io = _io_counters()
        t_start = time.perf_counter()
        if todo:
            compute_blocks(todo, partial, stats)
        r1, s1_io = _io_counters()
        stats.seconds = time.perf_counter() - t_start
        stats.bytes_requested, stats.bytes_from_storage = r1 - r0, s1_io - s0_io
        state.wait_for_everyone()
        all_stats = gather_object([stats]) if world > 1 else [stats]
        manifest = None
        if rank == 0:
            manifest = plan.manifest(partial)
            manifest.save(partial / MANIFEST)
            (partial / RUN_FILE).write_text(json.dumps({"ranks": world, "stats": [s.__dict__ for s in all_stats]}, indent=1))
            (partial / OPTIONS_FILE).unlink()
            od.commit()
        state.wait_for_everyone()
        return manifest, all_stats


def run_teacher(ck: Checkpoint, calib: CalibrationSet, tokenizer: TokenizerIdentity, out: Path, opts: TeacherOptions, *,
                source_arg: str, overwrite: bool = False, resume: bool = False) -> tuple[TeacherManifest | None, list[RankStats]]:
    """The layer-streamed engine: this rank's blocks computed layer by layer into ``out``."""
    from accelerate import PartialState

    vocab = int(ck.config["vocab_size"])
    check_top_k(opts.top_k, vocab)
    runner = LayerwiseRunner(ck, dtype=opts.dtype, memory_budget=opts.memory_budget, device=opts.device)
    seq_len = calib.input_ids.shape[1]
    per = opts.block_sequences or default_block_sequences(seq_len, runner.hidden, opts.memory_budget)
    plan = CachePlan(SourceFingerprint.of(ck), tokenizer, calib, opts.top_k, per, logsumexp=True, compute={
        "engine": "layerwise", "engine_version": __version__, "device": runner.device.type,
        "dtype": str(opts.dtype).removeprefix("torch.")})
    state = PartialState(cpu=runner.device.type == "cpu")

    def compute(todo, partial: Path, stats: RankStats) -> None:
        _compute_blocks(runner, calib, todo, len(plan.blocks), partial, opts, stats, state.process_index)

    return write_cache(plan, out, compute, state=state, source_arg=source_arg, overwrite=overwrite, resume=resume)


def _compute_blocks(runner: LayerwiseRunner, calib: CalibrationSet, todo, n_blocks: int, partial: Path, opts: TeacherOptions,
                    stats: RankStats, rank: int) -> None:
    bar = None
    if opts.progress and rank == 0:
        from tqdm import tqdm

        tokens = sum(s1 - s0 for _, s0, s1 in todo) * calib.input_ids.shape[1]
        bar = tqdm(total=len(todo) * (runner.n_layers + 1), unit="layer", desc=f"teacher ({tokens:,} tokens on rank 0)")
    layer_seconds = [0.0] * runner.n_layers

    def on_layer(layer: int, seconds: float) -> None:
        layer_seconds[layer] += seconds
        if bar is not None:
            bar.update(1)

    for i, s0, s1 in todo:
        if bar is not None:
            bar.set_postfix(block=f"{i + 1}/{n_blocks}", seqs=f"{s0}-{s1}")
        block = teacher_block(runner, calib.input_ids[s0:s1], opts.top_k, on_layer)
        write_block(partial, i, encode_block(**block))
        if bar is not None:
            bar.update(1)
        stats.blocks += 1
        stats.sequences += s1 - s0
    if bar is not None:
        bar.close()
    stats.layer_seconds = [s / max(1, stats.blocks) for s in layer_seconds]


def estimate(ck: Checkpoint, calib: CalibrationSet, opts: TeacherOptions, probe_sequences: int = 1) -> dict:
    """What --dry-run prints: tokens, cache bytes, bytes read per layer and per sweep, and a
    time estimate from running layer 0 and the first MoE layer on ``probe_sequences``."""
    vocab = int(ck.config["vocab_size"])
    check_top_k(opts.top_k, vocab)
    runner = LayerwiseRunner(ck, dtype=opts.dtype, memory_budget=opts.memory_budget, device=opts.device)
    n_seq, seq_len = calib.input_ids.shape
    per = opts.block_sequences or default_block_sequences(seq_len, runner.hidden, opts.memory_budget)
    n_blocks = math.ceil(n_seq / per)
    layer_bytes = [sum(t.nbytes for name, t in ck.tensors.items() if name.startswith(f"model.layers.{layer}.")) for layer in range(runner.n_layers)]
    head_bytes = ck.info(runner.head_name()).nbytes
    probe = calib.input_ids[: min(probe_sequences, n_seq)]
    h = runner.embed(probe)
    probe_layers = sorted({0, runner.first_dense if runner.first_dense < runner.n_layers else 0})
    seconds = {}
    for layer in range(max(probe_layers) + 1):
        t0 = time.perf_counter()
        nxt = runner.run_layer(layer, h)
        seconds[layer] = time.perf_counter() - t0
        h.close()
        h = nxt
    h.close()
    probe_tokens = probe.numel()
    per_token = {"dense": seconds[0] / probe_tokens, "moe": seconds[max(probe_layers)] / probe_tokens}
    est = sum(per_token["moe" if runner.is_moe(layer) else "dense"] for layer in range(runner.n_layers)) * n_seq * seq_len
    return {
        "sequences": n_seq, "seq_len": seq_len, "tokens": n_seq * seq_len, "top_k": opts.top_k,
        "block_sequences": per, "blocks": n_blocks, "bytes_per_token": bytes_per_token(opts.top_k),
        "cache_bytes": n_seq * seq_len * bytes_per_token(opts.top_k),
        "bytes_read_per_layer": layer_bytes, "bytes_read_per_sweep": sum(layer_bytes) + head_bytes,
        "bytes_read_total": n_blocks * (sum(layer_bytes) + head_bytes),
        "probe_tokens": probe_tokens, "probe_seconds_per_token": per_token,
        "estimated_seconds": est, "device": runner.device.type,
    }
