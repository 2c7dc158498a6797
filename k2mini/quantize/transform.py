"""The integer transform shared by ``k2mini quantize`` and ``convert --quantize``.

Whoever streams the tensors (quantize over an existing checkpoint, convert over a source it
is reducing) decides which tensors exist and what they are called; this object turns each
BF16 tensor about to be written into the tensors the integer format stores, so FP8 source
-> BF16 -> INT is one streaming pass, one tensor at a time. It plans every output tensor
from names and shapes alone (before any data is read), keeps the per-tensor report, and
rewrites the config's quantization_config.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from k2mini.checkpoint.names import Role, TensorName, parse_name
from k2mini.checkpoint.safetensors_format import PlannedTensor
from k2mini.errors import UsageError
from k2mini.quantize import GROUP_SIZES, intq
from k2mini.quantize.formats import FORMATS, INT_TAGS, OutputFormat, make_format
from k2mini.quantize.policy import check_patterns, is_linear_weight, module_of
from k2mini.quantize.report import QuantReport, TensorReport, WorstTensor

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
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise UsageError(f"--group-size {self.group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
        if self.group_size is not None and self.format != "compressed-tensors":
            raise UsageError(f"--group-size applies to --format compressed-tensors only ({self.format} has fixed blocks)")
        check_patterns(self.ignore)

    @property
    def auto_group(self) -> bool:
        """INT4 without --group-size: per tensor, the largest of 128/64/32 that divides it
        (128 is what Marlin kernels like best), else per channel, so any model quantizes.
        INT8 defaults to one scale per channel."""
        return self.bits == 4 and self.group_size is None and self.format == "compressed-tensors"


# --quantize values convert accepts.
CHOICES = {"int4": 4, "int8": 8}


@dataclass
class TensorJob:
    """One input tensor and the output tensors it becomes."""

    name: str
    parsed: TensorName
    shape: tuple[int, ...]
    in_dtype: str  # the dtype the format sees: BF16 for FP8 input
    outputs: list[PlannedTensor]
    bytes_in: int


def scales_of(fmt: OutputFormat, job: TensorJob) -> str | None:
    """What one scale covers in a compressed-tensors integer weight: "group 128" or "channel"."""
    if fmt.name != "compressed-tensors" or not fmt.quantizes(job.parsed, job.shape):
        return None
    g = fmt.group_for(job.parsed, job.shape)
    return "channel" if g is None else f"group {g}"


def _record(fmt: OutputFormat, job: TensorJob, rel: float | None, max_err: float | None) -> TensorReport:
    quantized = fmt.quantizes(job.parsed, job.shape)
    if quantized:
        stored = "nf4" if fmt.name == "bnb" and fmt.bits == 4 else f"int{fmt.bits}"
    else:
        stored = job.outputs[0].dtype.lower()
    int_bytes = sum(p.nbytes for p in job.outputs if p.dtype in INT_TAGS and p.name.endswith(("weight_packed", ".weight")))
    return TensorReport(
        name=job.name,
        shape=list(job.shape),
        stored=stored,
        linear=is_linear_weight(job.parsed, job.shape),
        params=math.prod(job.shape),
        bytes_in=job.bytes_in,
        bytes_out=sum(p.nbytes for p in job.outputs),
        int_bytes=int_bytes,
        scales=scales_of(fmt, job),
        rel_error=rel,
        max_abs_error=max_err,
    )


def build_report(src: str, out: str, opts: QuantOptions, fmt: OutputFormat, jobs: list[TensorJob], records: list[TensorReport]) -> QuantReport:
    linear = [r for r in records if r.linear]
    by_name = {j.name: j for j in jobs}
    held = [r for r in linear if fmt.held_as_int(by_name[r.name].parsed, tuple(r.shape))]
    unq = [r for r in linear if r not in held]
    errs = [r for r in records if r.rel_error is not None]
    worst = sorted(errs, key=lambda r: r.rel_error, reverse=True)[:_WORST]
    lin_out = sum(r.bytes_out for r in linear)
    lin_int = sum(r.int_bytes for r in linear)
    total_out = sum(r.bytes_out for r in records)
    lin_params = sum(r.params for r in linear)
    unq_bytes = sum(r.params * 2 for r in unq)
    schemes: dict[str, int] = {}
    # Largest groups first, per channel last.
    for r in sorted((r for r in records if r.scales), key=lambda r: -int(r.scales.split()[-1]) if r.scales != "channel" else 0):
        schemes[r.scales] = schemes.get(r.scales, 0) + 1
    return QuantReport(
        source=src,
        output=out,
        format=opts.format,
        bits=opts.bits,
        group_size="auto" if opts.auto_group else opts.group_size,
        granularity=fmt.granularity(),
        schemes=schemes,
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


def output_config(src_cfg: dict[str, Any], fmt: OutputFormat, opts: QuantOptions, jobs: list[TensorJob]) -> dict[str, Any]:
    """The source config with its quantization_config replaced, loadable without remote code."""
    cfg = copy.deepcopy(src_cfg)
    cfg.pop("auto_map", None)
    if cfg.get("model_type") == "kimi_k2":
        cfg["model_type"] = "deepseek_v3"
    groups = {module_of(j.name): fmt.group_for(j.parsed, j.shape) for j in jobs if fmt.quantizes(j.parsed, j.shape)}
    cfg["quantization_config"] = fmt.quantization_config(groups)
    cfg["torch_dtype"] = "bfloat16"
    block = cfg.get("k2mini") if isinstance(cfg.get("k2mini"), dict) else {}
    block["quantize"] = {"format": opts.format, "bits": opts.bits, "group_size": "auto" if opts.auto_group else opts.group_size,
                         "ignore": list(fmt.all_ignore)}
    cfg["k2mini"] = block
    return cfg


class IntTransform:
    """plan(name, dtype, shape) -> output tensors; apply(name, tensor) -> their data."""

    def __init__(self, opts: QuantOptions):
        opts.check()
        self.opts = opts
        self.fmt: OutputFormat = make_format(opts.format, opts.bits, opts.group_size, opts.ignore, opts.auto_group)
        self.jobs: dict[str, TensorJob] = {}
        self.records: list[TensorReport] = []

    @classmethod
    def from_choice(cls, choice: str, group_size: int | None = None) -> IntTransform:
        """``convert --quantize int4|int8`` (compressed-tensors, default ignore list)."""
        if choice not in CHOICES:
            raise UsageError(f"--quantize {choice}: choose one of {', '.join(CHOICES)}")
        return cls(QuantOptions(CHOICES[choice], group_size))

    def plan(self, name: str, dtype: str, shape: tuple[int, ...], bytes_in: int = 0) -> list[PlannedTensor]:
        """Output tensors for one tensor that would be written as ``dtype`` (BF16 or F32).
        ``bytes_in``: what it occupied in the input, for the report."""
        parsed = parse_name(name)
        shape = tuple(shape)
        fmt = self.fmt
        if fmt.quantizes(parsed, shape) and fmt.needs_divisible_group() and shape[1] % fmt.group_size:
            raise UsageError(
                f"--group-size {fmt.group_size} does not divide the input dimension {shape[1]} of {name} "
                f"{list(shape)}; pick a group size that does, or --ignore {name[: -len('.weight')]}"
            )
        if (
            self.opts.format == "compressed-tensors"
            and parsed.role is Role.EXPERT
            and is_linear_weight(parsed, shape)
            and not fmt.quantizes(parsed, shape)
        ):
            # transformers 5.23 fuses a layer's experts through compressed-tensors' dequantize
            # step, which passes on packed weights only: BF16 experts (all or some of a
            # layer) are dropped and loading fails.
            raise UsageError(
                f"--ignore {' '.join(self.opts.ignore)}: matches routed expert {name}; compressed-tensors output must "
                "quantize every routed expert (transformers cannot load BF16 experts under a compressed-tensors config)"
            )
        outputs = fmt.plan(parsed, dtype, shape)
        self.jobs[name] = TensorJob(name, parsed, shape, dtype, outputs, bytes_in)
        return outputs

    def apply(self, name: str, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        """Data for ``plan(name, ...)``'s outputs, in the same order, one by one."""
        job = self.jobs[name]
        produced = self.fmt.produce(job.parsed, job.in_dtype, tensor)
        self.records.append(_record(self.fmt, job, produced.rel_error, produced.max_abs_error))
        tensors = produced.tensors
        del produced
        if len(tensors) != len(job.outputs):
            raise AssertionError(f"{name}: planned {len(job.outputs)} outputs, produced {len(tensors)}")
        while tensors:
            yield tensors.pop(0)

    def config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return output_config(cfg, self.fmt, self.opts, list(self.jobs.values()))

    def report(self, source: str, output: str) -> QuantReport:
        """Every planned tensor in plan order. One never produced in this run (a shard reused
        by convert --resume) is reported without its error, which needs the data."""
        done = {r.name: r for r in self.records}
        records = [done.get(name) or _record(self.fmt, job, None, None) for name, job in self.jobs.items()]
        return build_report(source, output, self.opts, self.fmt, list(self.jobs.values()), records)
