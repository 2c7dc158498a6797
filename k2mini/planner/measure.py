"""Measure a cut without writing it: held-out KL to a teacher cache, one layer resident.

``CutCheckpoint`` presents the source as the checkpoint convert would write for a plan:
the same output tensor names and config (convert's own ``plan_jobs`` and ``fixed_config``),
each output tensor read from its source tensor (FP8 dequantized, routers row-sliced, merged
experts summed) when the runner asks for it. The layer-streamed runner then runs the cut as
it runs any checkpoint; its ``weight_hook`` rounds every projection through the integer
format the dtype writes (``quantize.intq.roundtrip``), so an INT cut is scored with the
weights a loader gets back from the written file.

The score is ``KL(teacher || cut)`` per position on the held-out sequences of the cache
(heal's ``split``, so plan scores on what heal does not train on), with heal's loss: the
teacher's top-k ids plus one tail bucket. The lm_head is streamed in row blocks, so the
pieces of that loss (log-sum-exp, the top-k log-probs, the mass outside them) are
accumulated block by block instead of from full ``[positions, vocabulary]`` logits, which
at K2's 163,840-token vocabulary would be 655 KB per position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from k2mini.checkpoint.names import parse_name, scale_name
from k2mini.checkpoint.reader import Checkpoint, TensorInfo
from k2mini.convert.config import fixed_config
from k2mini.convert.pipeline import plan_jobs
from k2mini.convert.transforms import Bf16Transform, TensorJob, merged_weight, out_shape, read_selected
from k2mini.heal.loss import collapsed_kl, next_token_targets
from k2mini.model.layerwise import LayerwiseRunner, WeightHook
from k2mini.selection.plan import Plan
from k2mini.teacher.cache import TeacherCache


class CutCheckpoint(Checkpoint):
    """The checkpoint ``convert --plan`` would write from ``ck``, read from ``ck`` on demand."""

    def __init__(self, ck: Checkpoint, plan: Plan):  # noqa: super().__init__ would open a source
        self.__dict__.update(ck.__dict__)
        self.base = ck
        self.config = fixed_config(ck.config, plan, Bf16Transform())
        self.jobs: dict[str, TensorJob] = {}
        self.tensors = {}
        for job in plan_jobs(ck, plan):
            src = ck.info(job.source)
            self.jobs[job.output] = job
            # Source file and offset: unsliced tensors are read raw (prefetched) from there.
            self.tensors[job.output] = TensorInfo(job.output, src.dtype, out_shape(ck, job), src.file, src.offset,
                                                  src.nbytes if job.rows is None else src.nbytes // src.shape[0] * len(job.rows),
                                                  parse_name(job.output))
            s = ck.scale_of(job.source) if src.dtype == "F8_E4M3" else None
            if s is not None:
                self.tensors[scale_name(job.output)] = TensorInfo(scale_name(job.output), s.dtype, s.shape, s.file, s.offset,
                                                                  s.nbytes, parse_name(scale_name(job.output)))

    def read(self, name: str) -> torch.Tensor:
        job = self.jobs.get(name)
        if job is not None and job.merge:
            return merged_weight(self.base, job).to(torch.bfloat16)
        if job is not None and job.rows is not None:
            return read_selected(self.base, job)
        return super().read(name)


def quantize_hook(dtype: str) -> WeightHook | None:
    """The runner hook that gives each weight the values a loader reads back from ``convert
    --dtype dtype``'s output; None for bf16 and fp8 (FP8 bytes are copied, so the values
    equal the source's dequantized ones)."""
    if not dtype.startswith("int"):
        return None
    from k2mini.quantize import intq
    from k2mini.quantize.convert_hook import CHOICES
    from k2mini.quantize.formats import make_format

    bits, group = CHOICES[dtype]
    fmt = make_format("compressed-tensors", bits, group, (), bits == 4 and group is None)

    def hook(name: str, w: torch.Tensor) -> torch.Tensor:
        parsed, shape = parse_name(name), tuple(w.shape)
        if not fmt.quantizes(parsed, shape):
            return w
        return intq.roundtrip(w.cpu(), bits, fmt.group_for(parsed, shape)).to(w.device)

    return hook


@dataclass
class Measured:
    kl: float  # mean KL(teacher || cut) per position, heal's top-k + tail bucket
    nll: float  # mean next-token NLL (the last position of each sequence has no target)
    positions: int
    seconds: float
    bytes_read: int  # source bytes read while scoring


@torch.no_grad()
def streamed_scores(runner: LayerwiseRunner, normed: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: heal's KL (``loss.collapsed_kl`` of the streamed terms) and the NLL of ``targets`` (-100:
    none), from lm_head row blocks. ``normed`` [N, H], ``topk_*`` [N, k], ``targets`` [N]."""
    N = normed.shape[0]
    lse = torch.full((N,), float("-inf"), dtype=torch.float64)
    lse_out = lse.clone()  # log-sum-exp over the ids outside the teacher's top-k
    s_top = torch.zeros(topk_ids.shape, dtype=torch.float64)
    tgt = torch.zeros(N, dtype=torch.float64)
    x = runner.to_compute(normed)
    for r0, w in runner.head_blocks():
        lg = (x @ w.T).double().cpu()
        r1 = r0 + w.shape[0]
        lse = torch.logaddexp(lse, lg.logsumexp(-1))
        inside = (topk_ids >= r0) & (topk_ids < r1)
        local = (topk_ids - r0).clamp(0, w.shape[0] - 1)
        s_top = torch.where(inside, lg.gather(1, local), s_top)
        hits = torch.zeros(lg.shape, dtype=torch.int32).scatter_add_(1, local, inside.int())
        lse_out = torch.logaddexp(lse_out, lg.masked_fill(hits > 0, float("-inf")).logsumexp(-1))
        hit = (targets >= r0) & (targets < r1)
        tgt = torch.where(hit, lg.gather(1, (targets - r0).clamp(0, w.shape[0] - 1)[:, None])[:, 0], tgt)
    kl = collapsed_kl(topk_logprobs.double(), s_top - lse[:, None], lse_out - lse)
    return kl, lse - tgt


@torch.no_grad()
def measure(ck: Checkpoint, plan: Plan, dtype: str, cache: TeacherCache, sequences: list[int], *, head_sequences: int = 64,
            device: str = "cpu") -> Measured:
    """Held-out KL and NLL of ``plan`` written as ``dtype``, run on the fly over ``sequences``.

    One sweep over the kept layers for all sequences (the runner spills activations to disk
    beyond its memory budget), so each kept weight is read once; then the head, scored
    ``head_sequences`` at a time."""
    t0, read0 = time.perf_counter(), ck.source.bytes_read
    cut = CutCheckpoint(ck, plan)
    runner = LayerwiseRunner(cut, weight_hook=quantize_hook(dtype), device=device)
    ids = torch.cat([cache.read(sequences[b0 : b0 + head_sequences]).input_ids for b0 in range(0, len(sequences), head_sequences)])
    h = runner.embed(ids)
    for layer in range(int(cut.config["num_hidden_layers"])):
        nxt = runner.run_layer(layer, h)
        h.close()
        h = nxt
    norm = runner.final_norm()
    kl_sum = nll_sum = 0.0
    positions = targets_n = 0
    for b0 in range(0, len(sequences), head_sequences):
        batch = cache.read(sequences[b0 : b0 + head_sequences])
        normed = norm(runner.to_compute(h.data[b0 : b0 + len(batch.input_ids)])).float().cpu()
        targets = next_token_targets(batch.input_ids)
        k = batch.topk_ids.shape[-1]
        kl, nll = streamed_scores(runner, normed.reshape(-1, normed.shape[-1]), batch.topk_ids.reshape(-1, k),
                                  batch.topk_logprobs.reshape(-1, k), targets.reshape(-1))
        has = targets.reshape(-1) >= 0
        kl_sum += float(kl.sum())
        nll_sum += float(nll[has].sum())
        positions += kl.numel()
        targets_n += int(has.sum())
    h.close()
    return Measured(kl_sum / max(positions, 1), nll_sum / max(targets_n, 1), positions, time.perf_counter() - t0,
                    ck.source.bytes_read - read0)
