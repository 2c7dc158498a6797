"""The heal recipe: train a reduced checkpoint on a teacher cache, data-parallel over the
ranks torchrun or ``accelerate launch`` started, with the model either replicated (DDP through
accelerate) or sharded (FSDP2, heal/sharding.py).

A step takes a global batch of ``batch_size`` whole sequences; rank r takes the r-th equal
slice and the loss is its mean over the slice, so the averaged gradients (DDP's all-reduce,
FSDP2's reduce-scatter) are those of the mean over the global batch: N ranks compute what
one does, up to the order of float sums.

The data order is a function of the seed and the step alone (a seeded permutation of the
training sequences per epoch), so a run resumed from a training checkpoint (heal/state.py)
draws the same batches as an uninterrupted one, and with the optimizer state restored
reaches the same weights, on any number of ranks.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from k2mini.heal import methods, sharding, state
from k2mini.heal.loss import ce_sum, kl_sum, next_token_targets
from k2mini.teacher.cache import TeacherBatch, TeacherCache

LOG_FILE = "heal_log.jsonl"
# From a probe on the nano K2 (2 of 32 experts, 40 steps of 16 x 64 tokens): router 1e-2
# removed 10-14% of the KL, LoRA at 3e-3 and full at 3e-4 each 62-70% (analysis/study_heal.py
# --cuts e2 --seeds 1 --steps 40). Larger models usually want smaller rates: --lr overrides.
DEFAULT_LR = {"router": 1e-2, "lora": 3e-3, "full": 3e-4}
DEFAULT_EVAL_FRACTION = 0.1
# Without --steps/--epochs heal passes DEFAULT_EPOCHS times over the cache's training share
# (analysis/results/heal_defaults_sweep.md), at most MAX_DEFAULT_STEPS steps: at 64 sequences
# of 4096 tokens that is 5.2B teacher tokens, twice the 2.5B that took NVIDIA's pruned
# Nemotron-3-Nano from 32.3 to 60.4 (docs/facts.md §7), so a huge cache does not silently turn
# into weeks of training; --steps/--epochs go past it.
DEFAULT_EPOCHS = 3.0
MAX_DEFAULT_STEPS = 20_000
# Logits of more positions than this (x vocabulary x 4 bytes) are computed in chunks whose
# activations are recomputed in backward: K2's 163,840-token vocabulary makes a batch of
# 4096 positions 2.7 GB of float32 logits, before their gradient.
HEAD_CHUNK_BYTES = 256 << 20


@dataclass
class HealOptions:
    method: str = "lora"
    steps: int = 100
    lr: float | None = None  # None: DEFAULT_LR[method]
    batch_size: int = 8  # sequences per step, all ranks together
    lora_rank: int = 16
    ce_weight: float = 0.0
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    eval_every: int | None = None  # None: about 10 evaluations per run
    save_every: int | None = None  # None: with every evaluation
    seed: int = 0
    bias_gamma: float = 1e-3  # correction-bias balancing speed (router, full)
    max_grad_norm: float = 1.0
    warmup_steps: int | None = None  # None: 10% of the steps, at most 50
    gradient_checkpointing: bool = False  # recompute each layer in backward: activations of one layer, not all
    fsdp: bool | None = None  # shard with FSDP2 (heal/sharding.py) instead of replicating with DDP; None: sharding.default_fsdp
    mixed_precision: bool = False  # BF16 compute, FP32 weights/grads reduced in FP32 (GPUs)
    cpu_offload: bool = False  # FSDP2: sharded weights, grads and optimizer state in host memory (GPUs)
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def resolved(self) -> HealOptions:
        every = self.eval_every or max(1, self.steps // 10)
        return HealOptions(**{**asdict(self), "lr": self.learning_rate, "eval_every": every,
                              "save_every": self.save_every or every,
                              "warmup_steps": self.warmup_steps if self.warmup_steps is not None else min(50, self.steps // 10)})


def default_steps(train_sequences: int, batch_size: int, epochs: float = DEFAULT_EPOCHS) -> int:
    """Steps for ``epochs`` passes over ``train_sequences`` (at least one step, at most MAX_DEFAULT_STEPS)."""
    return max(1, min(MAX_DEFAULT_STEPS, round(epochs * train_sequences / batch_size)))


def split(n_sequences: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) sequence indices: a seeded, disjoint split; eval is sorted (shard-local reads)."""
    perm = torch.randperm(n_sequences, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(n_sequences - 1, math.ceil(eval_fraction * n_sequences)) if eval_fraction > 0 else 0
    return perm[n_eval:], sorted(perm[:n_eval])


def batch_indices(train: list[int], step: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of ``step``: positions step*B .. (step+1)*B of the epochs' permutations, concatenated."""
    perms: dict[int, list[int]] = {}  # one per epoch the batch touches
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, len(train))
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
            perms[epoch] = torch.randperm(len(train), generator=gen).tolist()
        out.append(train[perms[epoch][i]])
    return out


def schedule(optimizer, opts: HealOptions):
    """transformers' linear warm-up then cosine decay to 10% of the peak at the last step."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, opts.warmup_steps, opts.steps, min_lr_rate=0.1)


class Student(torch.nn.Module):
    """The reduced model and the loss in one forward, so DDP sees the whole step:
    returns the batch's (KL sum, CE sum) over its positions."""

    def __init__(self, trained: torch.nn.Module):
        super().__init__()
        self.trained = trained

    def forward(self, input_ids, topk_ids, topk_logprobs, targets):
        base = methods.base_model(self.trained)
        h = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
        h = h.reshape(-1, h.shape[-1])
        ids, lp, tgt = topk_ids.reshape(-1, topk_ids.shape[-1]), topk_logprobs.reshape(-1, topk_logprobs.shape[-1]), targets.reshape(-1)
        head = base.lm_head
        vocab = head.weight.shape[0]
        per = max(1, HEAD_CHUNK_BYTES // (vocab * 4))
        if h.shape[0] <= per:
            return _head_loss(head, h, ids, lp, tgt)
        from torch.utils.checkpoint import checkpoint

        kl = ce = h.new_zeros((), dtype=torch.float32)
        for c0 in range(0, h.shape[0], per):
            c1 = c0 + per
            k_, c_ = checkpoint(_head_loss, head, h[c0:c1], ids[c0:c1], lp[c0:c1], tgt[c0:c1], use_reentrant=False)
            kl, ce = kl + k_, ce + c_
        return kl, ce


def _head_loss(head, h, ids, lp, tgt):
    logits = head(h)
    return kl_sum(logits, ids, lp), ce_sum(logits, tgt)


@dataclass
class StepLog:
    step: int
    loss: float
    kl: float
    ce: float
    lr: float
    tokens: int
    seconds: float
    eval_kl: float | None = None


@dataclass
class HealResult:
    log: list[StepLog] = field(default_factory=list)
    tokens_seen: int = 0
    train_sequences: int = 0
    eval_sequences: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_gpu_bytes: int | None = None
    peak_host_bytes: int = 0  # this rank's peak resident set (ru_maxrss)
    resident: dict[str, int] = field(default_factory=dict)  # this rank's parameter / optimizer-state bytes after step 1
    resident_per_rank: list[list[int]] = field(default_factory=list)  # [params, optimizer] bytes of every rank
    resumed_from_step: int = 0
    ranks: int = 1
    parallel: str = "DDP"


def _to(batch: TeacherBatch, device) -> tuple[torch.Tensor, ...]:
    return (batch.input_ids.to(device), batch.topk_ids.to(device), batch.topk_logprobs.to(device),
            next_token_targets(batch.input_ids).to(device))


def place(student: Student, opts: HealOptions, accelerator):
    """Shard (FSDP2) or replicate (DDP) ``student``; returns it with its AdamW and schedule."""
    if opts.fsdp:
        sharding.shard(student, methods.base_model(student.trained).model.layers, accelerator.device,
                       mixed_precision=opts.mixed_precision, cpu_offload=opts.cpu_offload)
    else:
        student = accelerator.prepare_model(student)  # DDP over several processes; accelerate's autocast if asked
    params = [p for p in student.parameters() if p.requires_grad]  # after sharding: the DTensor shards
    optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=0.0)
    return student, optimizer, schedule(optimizer, opts)


def train_step(student, optimizer, scheduler, batch: tuple[torch.Tensor, ...], opts: HealOptions, accelerator) -> tuple[torch.Tensor, int]:
    """Forward, backward, clip, step: returns this rank's (KL, CE) sums and its positions."""
    ids, tk, lp, tgt = batch
    student.train()
    kl, ce = student(ids, tk, lp, tgt)
    n = ids.numel()
    accelerator.backward((kl + opts.ce_weight * ce) / n)
    if opts.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], opts.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([kl.detach(), ce.detach()]).float(), n


def train(model: torch.nn.Module, cache: TeacherCache, opts: HealOptions, *, work: Path, accelerator,
          on_step: Callable[[StepLog], None] | None = None) -> tuple[Student, HealResult]:
    """Train ``model`` (a DeepseekV3ForCausalLM) in place; returns (the student: ``.trained`` is
    the trained model, still sharded under FSDP2; the HealResult).

    Every ``save_every`` steps the ranks save a training checkpoint into ``work``; when one is
    there, training continues from it.
    """
    from k2mini.model.balance import LoadMeter, balance_step

    opts = opts.resolved()
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(opts.seed)  # LoRA's initial A matrices: the same on every rank
    trained = methods.prepare(model, opts.method, lora_rank=opts.lora_rank)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_idx, eval_idx = split(cache.sequences, opts.eval_fraction, opts.seed)
    student, optimizer, scheduler = place(Student(trained), opts, accelerator)
    inner = student if opts.fsdp else accelerator.unwrap_model(student)
    result = HealResult(train_sequences=len(train_idx), eval_sequences=len(eval_idx), ranks=world,
                        parallel="FSDP2" if opts.fsdp else "DDP" if world > 1 else "single")
    start = 0
    run = {k: getattr(opts, k) for k in ("method", "lora_rank", "steps", "batch_size", "lr", "ce_weight", "seed", "eval_fraction")}
    resumed = state.load(work, inner, optimizer, scheduler, run)
    if resumed is not None:
        result.log = [StepLog(**x) for x in resumed["log"]]
        start = result.resumed_from_step = resumed["step"]
    balance = opts.method in ("router", "full") and opts.bias_gamma > 0
    base = methods.base_model(trained)
    meter = LoadMeter(base) if balance else None
    gate_mods = methods.gates(base)
    per_rank = opts.batch_size // world
    seq_len = cache.seq_len
    bar = None
    if opts.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=start, unit="step", desc=f"heal {opts.method}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens_this_run = 0
    try:
        for step in range(start, opts.steps):
            lr = optimizer.param_groups[0]["lr"]
            mine = batch_indices(train_idx, step, opts.batch_size, opts.seed)[rank * per_rank : (rank + 1) * per_rank]
            sums, n = train_step(student, optimizer, scheduler, _to(cache.read(mine), accelerator.device), opts, accelerator)
            if not result.resident:
                result.resident = sharding.resident_bytes(student, optimizer)
            if meter is not None:
                loads = accelerator.reduce(meter.reset().to(accelerator.device), reduction="sum").cpu()
                balance_step(gate_mods, loads, opts.bias_gamma)
            sums = accelerator.reduce(sums, reduction="sum")
            tokens_this_run += n * world
            entry = StepLog(step=step + 1, loss=float((sums[0] + opts.ce_weight * sums[1]) / (n * world)),
                            kl=float(sums[0] / (n * world)), ce=float(sums[1] / (opts.batch_size * (seq_len - 1))),
                            lr=lr, tokens=(step + 1) * opts.batch_size * seq_len, seconds=round(time.perf_counter() - t0, 3))
            last = step + 1 == opts.steps
            if eval_idx and ((step + 1) % opts.eval_every == 0 or last):
                entry.eval_kl = evaluate(inner, cache, eval_idx, per_rank, accelerator)
                if meter is not None:
                    meter.reset()  # held-out routing is not training load (and a resumed run starts without it)
            result.log.append(entry)
            if on_step is not None and rank == 0:
                on_step(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{entry.kl:.4f}", **({"eval_kl": f"{entry.eval_kl:.4f}"} if entry.eval_kl is not None else {}))
            if not last and (step + 1) % opts.save_every == 0:
                state.save(work, inner, optimizer, scheduler, step + 1, [asdict(x) for x in result.log], run)
    finally:
        if bar is not None:
            bar.close()
        if meter is not None:
            meter.remove()
    result.seconds = time.perf_counter() - t0
    result.tokens_seen = opts.steps * opts.batch_size * seq_len
    result.tokens_per_second = tokens_this_run / max(result.seconds, 1e-9)
    if torch.cuda.is_available():
        result.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())
    result.peak_host_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if result.resident:
        mine = torch.tensor([[result.resident["params"], result.resident["optimizer"]]], dtype=torch.int64, device=accelerator.device)
        result.resident_per_rank = accelerator.gather(mine).cpu().tolist()
    accelerator.wait_for_everyone()
    return inner, result


@torch.no_grad()
def evaluate(student: Student, cache: TeacherCache, eval_idx: list[int], per_rank: int, accelerator) -> float:
    """Mean KL(teacher || student) per position over the held-out sequences (all ranks).

    The held-out set goes in global batches of ``per_rank`` x ranks, rank r taking the r-th
    slice; a rank whose slice of the last batch is empty still runs a forward (counted as
    nothing), because under FSDP2 every forward is collective.
    """
    student.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = max(1, per_rank)
    total = torch.zeros(2, dtype=torch.float64)
    for b0 in range(0, len(eval_idx), per_rank * world):
        mine = eval_idx[b0 + rank * per_rank : b0 + (rank + 1) * per_rank]
        ids, tk, lp, tgt = _to(cache.read(mine or eval_idx[:1]), accelerator.device)
        kl, _ = student(ids, tk, lp, tgt)
        if mine:
            total += torch.tensor([float(kl), ids.numel()], dtype=torch.float64)
    total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
    student.train()
    return float(total[0] / max(total[1], 1))


def write_log(path: Path, log: list[StepLog]) -> None:
    path.write_text("".join(json.dumps(asdict(x)) + "\n" for x in log))
