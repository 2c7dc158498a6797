"""``k2mini quantize``: stream a BF16 or FP8 checkpoint into an integer-weight checkpoint.

One input tensor is resident at a time: read (FP8 dequantized to BF16 by the reader),
quantized in row bands, written, dropped. Every output tensor's name, dtype and shape is
planned from the headers before any data is read, so bad input (a group size that does not
divide a weight, an already-quantized source) fails before anything is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from k2mini.checkpoint.names import Role
from k2mini.checkpoint.reader import Checkpoint, TensorInfo
from k2mini.checkpoint.safetensors_format import DTYPES, PlannedTensor
from k2mini.errors import CheckpointError, UsageError
from k2mini.quantize import intq
from k2mini.quantize.formats import FORMATS, INT_TAGS, OutputFormat, make_format
from k2mini.quantize.policy import check_patterns, is_linear_weight
from k2mini.quantize.report import REPORT_FILE, QuantReport, TensorReport, WorstTensor

# quant_method values we can read: none (BF16) or K2's block FP8.
_READABLE_QUANT = (None, "fp8")
_WORST = 10


@dataclass(frozen=True)
class QuantOptions:
    bits: int
    group_size: int | None = None
    format: str = "compressed-tensors"
    ignore: tuple[str, ...] = ()

    def check(self) -> None:
        if self.bits not in intq.BITS:
            raise UsageError(f"--bits {self.bits}: only 4 and 8 are supported")
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format}: choose one of {', '.join(FORMATS)}")
        if self.group_size is not None and self.group_size not in intq.GROUP_SIZES:
            raise UsageError(f"--group-size {self.group_size}: choose one of {', '.join(map(str, intq.GROUP_SIZES))}")
        if self.group_size is not None and self.format != "compressed-tensors":
            raise UsageError(f"--group-size applies to --format compressed-tensors only ({self.format} has fixed blocks)")
        check_patterns(self.ignore)

    def resolved(self) -> QuantOptions:
        """INT4 defaults to groups of 128 (Marlin-friendly); INT8 to one scale per channel."""
        if self.bits == 4 and self.group_size is None and self.format == "compressed-tensors":
            return QuantOptions(self.bits, 128, self.format, self.ignore)
        return self


@dataclass
class TensorJob:
    """One input tensor and the output tensors it becomes."""

    info: TensorInfo
    in_dtype: str  # the dtype the format sees: BF16 for FP8 input
    outputs: list[PlannedTensor]
    bytes_in: int


def check_source(ck: Checkpoint) -> None:
    """Refuse inputs that are already integer-quantized (or in a format we cannot read)."""
    qc = ck.config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    where = f"{ck.description}/config.json"
    if method not in _READABLE_QUANT:
        raise CheckpointError(
            f"already quantized (quantization_config.quant_method {method!r}); quantize needs a BF16 or FP8 checkpoint",
            path=where,
        )
    for t in ck.tensors.values():
        if t.dtype in INT_TAGS or t.name.endswith((".weight_packed", ".SCB", ".absmax")):
            raise CheckpointError(
                f"tensor {t.name} is {t.dtype}: the input already holds quantized weights; quantize needs a BF16 or FP8 checkpoint",
                path=f"{ck.description}/{t.file}",
            )


def plan_jobs(ck: Checkpoint, fmt: OutputFormat) -> list[TensorJob]:
    jobs = []
    for name in ck.weight_names():
        t = ck.tensors[name]
        if t.parsed.role is Role.INV_FREQ:
            continue  # recomputed by every loader; convert drops them too
        in_dtype = "BF16" if t.dtype == "F8_E4M3" else t.dtype
        if fmt.quantizes(t.parsed, t.shape) and fmt.needs_divisible_group() and t.shape[1] % fmt.group_size:
            raise UsageError(
                f"--group-size {fmt.group_size} does not divide the input dimension {t.shape[1]} of {name} "
                f"{list(t.shape)}; pick a group size that does, or --ignore {name[: -len('.weight')]}"
            )
        scale = ck.scale_of(name) if t.dtype == "F8_E4M3" else None
        jobs.append(TensorJob(t, in_dtype, fmt.plan(t.parsed, in_dtype, t.shape), t.nbytes + (scale.nbytes if scale else 0)))
    return jobs


def produce(
    ck: Checkpoint, fmt: OutputFormat, jobs: list[TensorJob], records: list[TensorReport], progress: bool = True
) -> Iterator[torch.Tensor]:
    """Yield output tensors in plan order; one input tensor resident at a time."""
    from tqdm import tqdm

    with tqdm(total=sum(j.bytes_in for j in jobs), unit="B", unit_scale=True, desc="quantize", disable=not progress, file=sys.stderr) as bar:
        for job in jobs:
            t = job.info
            produced = fmt.produce(t.parsed, job.in_dtype, ck.read(t.name))
            records.append(_record(fmt, job, produced.rel_error, produced.max_abs_error))
            tensors = produced.tensors
            del produced
            if len(tensors) != len(job.outputs):
                raise AssertionError(f"{t.name}: planned {len(job.outputs)} outputs, produced {len(tensors)}")
            while tensors:
                yield tensors.pop(0)
            bar.update(job.bytes_in)


def _record(fmt: OutputFormat, job: TensorJob, rel: float | None, max_err: float | None) -> TensorReport:
    t = job.info
    quantized = fmt.quantizes(t.parsed, t.shape)
    if quantized:
        stored = "nf4" if fmt.name == "bnb" and fmt.bits == 4 else f"int{fmt.bits}"
    else:
        stored = job.outputs[0].dtype.lower()
    int_bytes = sum(p.nbytes for p in job.outputs if p.dtype in INT_TAGS and p.name.endswith(("weight_packed", ".weight")))
    return TensorReport(
        name=t.name,
        shape=list(t.shape),
        stored=stored,
        linear=is_linear_weight(t.parsed, t.shape),
        params=t.numel,
        bytes_in=job.bytes_in,
        bytes_out=sum(p.nbytes for p in job.outputs),
        int_bytes=int_bytes,
        rel_error=rel,
        max_abs_error=max_err,
    )


def build_report(src: str, out: str, opts: QuantOptions, fmt: OutputFormat, jobs: list[TensorJob], records: list[TensorReport]) -> QuantReport:
    linear = [r for r in records if r.linear]
    by_name = {j.info.name: j for j in jobs}
    held = [r for r in linear if fmt.held_as_int(by_name[r.name].info.parsed, tuple(r.shape))]
    unq = [r for r in linear if r not in held]
    errs = [r for r in records if r.rel_error is not None]
    worst = sorted(errs, key=lambda r: r.rel_error, reverse=True)[:_WORST]
    lin_out = sum(r.bytes_out for r in linear)
    lin_int = sum(r.int_bytes for r in linear)
    total_out = sum(r.bytes_out for r in records)
    lin_params = sum(r.params for r in linear)
    unq_bytes = sum(r.params * 2 for r in unq)
    return QuantReport(
        source=src,
        output=out,
        format=opts.format,
        bits=opts.bits,
        group_size=opts.group_size,
        granularity=fmt.granularity(),
        ignore=list(fmt.all_ignore),
        tensors=records,
        bytes_in=sum(r.bytes_in for r in records),
        bytes_bf16=sum(r.params * (4 if r.stored == "f32" else 2) for r in records),
        bytes_out=total_out,
        linear_bytes_out=lin_out,
        linear_int_bytes=lin_int,
        int_byte_share_linear=lin_int / lin_out if lin_out else 0.0,
        int_param_share_linear=sum(r.params for r in held) / lin_params if lin_params else 0.0,
        int_byte_share_all=sum(r.int_bytes for r in records) / total_out if total_out else 0.0,
        unquantized_linear_bytes=unq_bytes,
        unquantized_linear=[r.name for r in unq],
        worst=[WorstTensor(name=r.name, rel_error=r.rel_error) for r in worst],
        mean_rel_error=sum(r.rel_error for r in errs) / len(errs) if errs else None,
        warning=fmt.warning(unq_bytes),
    )


def output_config(src_cfg: dict[str, Any], fmt: OutputFormat, opts: QuantOptions) -> dict[str, Any]:
    """The source config with its quantization_config replaced, loadable without remote code."""
    cfg = copy.deepcopy(src_cfg)
    cfg.pop("auto_map", None)
    if cfg.get("model_type") == "kimi_k2":
        cfg["model_type"] = "deepseek_v3"
    cfg["quantization_config"] = fmt.quantization_config()
    cfg["torch_dtype"] = "bfloat16"
    block = cfg.get("k2mini") if isinstance(cfg.get("k2mini"), dict) else {}
    block["quantize"] = {"format": opts.format, "bits": opts.bits, "group_size": opts.group_size, "ignore": list(fmt.all_ignore)}
    cfg["k2mini"] = block
    return cfg


AUX_SKIP_SUFFIXES = (".safetensors", ".py", ".pyc")


def aux_files(ck: Checkpoint) -> list[str]:
    """Files that travel with the weights (tokenizer, generation config, model card); never
    remote code, weights, index or config."""
    skip = {"config.json", "model.safetensors.index.json", REPORT_FILE}
    return [f for f in ck.source.list_files() if "/" not in f and f not in skip and not f.endswith(AUX_SKIP_SUFFIXES)]


def quantize_checkpoint(src: str | Path, out: str | Path, opts: QuantOptions, *, progress: bool = True) -> QuantReport:
    """Quantize ``src`` (BF16 output or K2 FP8 source) into a new directory ``out``."""
    opts.check()
    opts = opts.resolved()
    ck = Checkpoint.open(src)
    check_source(ck)
    fmt = make_format(opts.format, opts.bits, opts.group_size, opts.ignore)
    jobs = plan_jobs(ck, fmt)
    records: list[TensorReport] = []
    plan = [p for j in jobs for p in j.outputs]
    data = produce(ck, fmt, jobs, records, progress)
    cfg = output_config(ck.config, fmt, opts)
    write_checkpoint(ck, Path(out), plan, data, cfg, aux_files(ck))
    report = build_report(str(src), str(out), opts, fmt, jobs, records)
    (Path(out) / REPORT_FILE).write_text(report.model_dump_json(indent=1) + "\n")
    return report


# Temporary: replaced by k2mini.checkpoint.writer once the convert engineer lands it.
MAX_SHARD_BYTES = 5 * 2**30


def write_checkpoint(
    ck: Checkpoint, out: Path, plan: list[PlannedTensor], data: Iterator[torch.Tensor], cfg: dict[str, Any], aux: list[str]
) -> None:
    from k2mini.checkpoint.reader import INDEX_FILE
    from k2mini.checkpoint.safetensors_format import write_shard

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"-o {out}: exists and is not an empty directory")
    tmp = out.parent / f".{out.name}.k2mini-partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_shard(tmp / fname, shard, data)
        weight_map.update({p.name: fname for p in shard})
    for f in aux:
        (tmp / f).write_bytes(ck.source.read_bytes(f))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": sum(p.nbytes for p in plan)}, "weight_map": weight_map}, indent=2) + "\n"
    )
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
