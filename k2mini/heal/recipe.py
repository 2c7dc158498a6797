"""The heal recipe: train a reduced checkpoint on a teacher cache (one ``Accelerator``,
``prepare``, ``backward``, reduce, rank 0 writes), then write it back as a plain checkpoint.

Data-parallel through accelerate (DDP; FSDP2 with ``fsdp=True``), launched by torchrun or
``accelerate launch``. A step takes a global batch of ``batch_size`` whole sequences; rank r
takes the r-th equal slice and the loss is its mean over the slice, so the averaged
gradients are those of the mean over the global batch: N ranks compute what one does, up to
the order of float sums.

The data order is a function of the seed and the step alone (a seeded permutation of the
training sequences per epoch), so a run resumed from a training checkpoint draws the same
batches as an uninterrupted one, and with the optimizer state restored reaches the same
weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from k2mini.heal import methods
from k2mini.heal.loss import ce_sum, kl_sum, next_token_targets
from k2mini.teacher.cache import TeacherBatch, TeacherCache

TRAIN_STATE = "train_state.pt"
LOG_FILE = "heal_log.jsonl"
# From a probe on the nano K2 (2 of 32 experts, 40 steps of 16 x 64 tokens): router 1e-2
# removed 10-14% of the KL, LoRA at 3e-3 and full at 3e-4 each 62-70% (analysis/study_heal.py
# --cuts e2 --seeds 1 --steps 40). Larger models usually want smaller rates: --lr overrides.
DEFAULT_LR = {"router": 1e-2, "lora": 3e-3, "full": 3e-4}
DEFAULT_EVAL_FRACTION = 0.1
# Without --steps/--epochs heal passes DEFAULT_EPOCHS times over the cache's training share,
# at most MAX_DEFAULT_STEPS steps (analysis/results/heal_defaults_sweep.md).
DEFAULT_EPOCHS = 2.0
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
    eval_fraction: float = 0.1
    eval_every: int | None = None  # None: about 10 evaluations per run
    save_every: int | None = None  # None: with every evaluation
    seed: int = 0
    bias_gamma: float = 1e-3  # correction-bias balancing speed (router, full)
    max_grad_norm: float = 1.0
    warmup_steps: int | None = None  # None: 10% of the steps, at most 50
    gradient_checkpointing: bool = False  # recompute each layer in backward: activations of one layer, not all
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

    def __init__(self, trained: torch.nn.Module, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.trained = trained
        self.compute_dtype = compute_dtype

    def forward(self, input_ids, topk_ids, topk_logprobs, targets):
        base = methods.base_model(self.trained)
        ctx = torch.autocast(input_ids.device.type, dtype=self.compute_dtype) if self.compute_dtype else contextlib.nullcontext()
        with ctx:
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
    resumed_from_step: int = 0
    ranks: int = 1


def _to(batch: TeacherBatch, device) -> tuple[torch.Tensor, ...]:
    return (batch.input_ids.to(device), batch.topk_ids.to(device), batch.topk_logprobs.to(device),
            next_token_targets(batch.input_ids).to(device))


def train(model: torch.nn.Module, cache: TeacherCache, opts: HealOptions, *, work: Path, accelerator,
          compute_dtype: torch.dtype | None = None, on_step: Callable[[StepLog], None] | None = None):
    """Train ``model`` (a DeepseekV3ForCausalLM) in place; returns (the trained module, HealResult).

    Rank 0 saves a training checkpoint into ``work`` every ``save_every`` steps; when one
    is there, training continues from it.
    """
    from k2mini.nano.train import LoadMeter, balance_step

    opts = opts.resolved()
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(opts.seed)  # LoRA's initial A matrices: the same on every rank
    trained = methods.prepare(model, opts.method, lora_rank=opts.lora_rank)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_idx, eval_idx = split(cache.sequences, opts.eval_fraction, opts.seed)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=0.0)
    scheduler = schedule(optimizer, opts)
    student = Student(trained, compute_dtype)
    state_path = work / TRAIN_STATE
    result = HealResult(train_sequences=len(train_idx), eval_sequences=len(eval_idx), ranks=world)
    start = 0
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=False, map_location="cpu")
        methods.load_trainable_state(trained, saved["state"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        result.log = [StepLog(**x) for x in saved["log"]]
        start = result.resumed_from_step = saved["step"]
    student, optimizer = accelerator.prepare(student, optimizer)
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
            ids, tk, lp, tgt = _to(cache.read(mine), accelerator.device)
            student.train()
            kl, ce = student(ids, tk, lp, tgt)
            n = ids.numel()
            loss = (kl + opts.ce_weight * ce) / n
            accelerator.backward(loss)
            if opts.max_grad_norm:
                accelerator.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if meter is not None:
                loads = accelerator.reduce(meter.reset().to(accelerator.device), reduction="sum").cpu()
                balance_step(gate_mods, loads, opts.bias_gamma)
            sums = accelerator.reduce(torch.stack([kl.detach(), ce.detach()]).float(), reduction="sum")
            tokens_this_run += n * world
            entry = StepLog(step=step + 1, loss=float((sums[0] + opts.ce_weight * sums[1]) / (n * world)),
                            kl=float(sums[0] / (n * world)), ce=float(sums[1] / (opts.batch_size * (seq_len - 1))),
                            lr=lr, tokens=(step + 1) * opts.batch_size * seq_len,
                            seconds=round(time.perf_counter() - t0, 3))
            last = step + 1 == opts.steps
            if eval_idx and ((step + 1) % opts.eval_every == 0 or last):
                entry.eval_kl = evaluate(student, cache, eval_idx, per_rank, accelerator)
                if meter is not None:
                    meter.reset()  # held-out routing is not training load (and a resumed run starts without it)
            result.log.append(entry)
            if on_step is not None and rank == 0:
                on_step(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{entry.kl:.4f}", **({"eval_kl": f"{entry.eval_kl:.4f}"} if entry.eval_kl is not None else {}))
            if not last and (step + 1) % opts.save_every == 0:
                _save(state_path, trained, optimizer, scheduler, step + 1, result.log, accelerator)
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
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(student).trained, result


@torch.no_grad()
def evaluate(student, cache: TeacherCache, eval_idx: list[int], per_rank: int, accelerator) -> float:
    """Mean KL(teacher || student) per position over the held-out sequences (all ranks)."""
    inner = accelerator.unwrap_model(student)
    inner.eval()
    mine = eval_idx[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64)
    for b0 in range(0, len(mine), max(1, per_rank)):
        ids, tk, lp, tgt = _to(cache.read(mine[b0 : b0 + per_rank]), accelerator.device)
        kl, _ = inner(ids, tk, lp, tgt)
        total += torch.tensor([float(kl), ids.numel()], dtype=torch.float64)
    total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
    inner.train()
    return float(total[0] / max(total[1], 1))


def _save(path: Path, trained, optimizer, scheduler, step: int, log: list[StepLog], accelerator) -> None:
    """A training checkpoint (rank 0; every rank's replica is the same), written atomically."""
    state = methods.trainable_state(accelerator.unwrap_model(trained))
    opt_state = optimizer.state_dict()
    if accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        torch.save({"step": step, "state": state, "optimizer": opt_state, "scheduler": scheduler.state_dict(), "log": [asdict(x) for x in log]}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def write_log(path: Path, log: list[StepLog]) -> None:
    path.write_text("".join(json.dumps(asdict(x)) + "\n" for x in log))
