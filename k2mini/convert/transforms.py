"""What becomes of each selected source tensor: the hook between selection and the writer.

A ``TensorJob`` names one source tensor (a weight, never a scale grid), its output name and,
for routers, the rows to keep. A ``Transform`` declares the output tensors of a job before
anything is read (so the writer can lay out shards and check free disk), produces them
when the writer asks, and rewrites the config for the weights it emits::

    class MyTransform(Transform):
        name = "int4"
        def plan(self, ck, job) -> tuple[PlannedTensor, ...]: ...
        def produce(self, ck, job) -> Sequence[torch.Tensor]: ...   # same order as plan()
        def update_config(self, cfg: dict) -> dict: ...
        def key(self) -> str: ...   # options that change the bytes (resume fingerprint)

    make_transform("int4", {**TRANSFORMS, "int4": MyTransform})   # choices are passed, not registered

Built in: ``bf16`` (FP8 projections dequantized block by block, everything else as
stored) and ``fp8`` (FP8 bytes and scale grids copied untouched, quantization_config kept;
projections transformers cannot load as FP8 written BF16 and listed as not converted).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from k2mini.checkpoint import fp8
from k2mini.checkpoint.names import scale_name
from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.safetensors_format import PlannedTensor, torch_dtype
from k2mini.errors import UsageError
from k2mini.model.fp8_layout import hf_module, is_skipped, modules_to_not_convert
from k2mini.model.spec import ModelSpec
from k2mini.selection import merge as merging


@dataclass(frozen=True)
class TensorJob:
    source: str  # source tensor name (a weight or buffer, never a scale grid)
    output: str  # name in the output checkpoint
    rows: tuple[int, ...] | None = None  # keep only these rows, in this order (router weight / bias)
    # convert --merge: the output is sum w * source tensor over these (name, w), ``source`` first.
    merge: tuple[tuple[str, float], ...] | None = None


def out_shape(ck: Checkpoint, job: TensorJob) -> tuple[int, ...]:
    shape = ck.info(job.source).shape
    return shape if job.rows is None else (len(job.rows), *shape[1:])


def read_selected(ck: Checkpoint, job: TensorJob) -> torch.Tensor:
    """The job's tensor as stored, reading only the kept rows when ``rows`` is set."""
    if job.rows is None:
        return ck.read_raw(job.source)
    t = ck.info(job.source)
    row_bytes = t.nbytes // t.shape[0] if t.shape[0] else 0
    out = torch.empty((len(job.rows), *t.shape[1:]), dtype=torch_dtype(t.dtype))
    flat = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    for i, r in enumerate(job.rows):
        ck.source.read_into(t.file, t.offset + r * row_bytes, flat[i * row_bytes : (i + 1) * row_bytes])
    return out


def merged_weight(ck: Checkpoint, job: TensorJob) -> torch.Tensor:
    """A merge job's weighted sum in float32, reading (and dequantizing) one source at a time."""
    return merging.merge_tensor((ck.read(name), w) for name, w in job.merge)


def selected_bytes(ck: Checkpoint, job: TensorJob) -> int:
    """Source bytes this job needs (weight rows kept, plus the scale grid of an FP8 weight)."""
    if job.merge:
        return sum(selected_bytes(ck, TensorJob(name, job.output)) for name, _ in job.merge)
    t = ck.info(job.source)
    n = t.nbytes if job.rows is None else (t.nbytes // max(t.shape[0], 1)) * len(job.rows)
    s = ck.scale_of(job.source) if t.dtype == "F8_E4M3" else None
    return n + (s.nbytes if s is not None else 0)


class Transform:
    name = "base"

    def plan(self, ck: Checkpoint, job: TensorJob) -> tuple[PlannedTensor, ...]:
        raise NotImplementedError

    def produce(self, ck: Checkpoint, job: TensorJob) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def update_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return cfg

    def check_source(self, ck: Checkpoint) -> None:
        """Raise UsageError when this transform cannot apply to ``ck``."""

    def key(self) -> str:
        return self.name

    def output_files(self, source: str, output: str) -> dict[str, bytes]:
        """Files to write next to the weights once every tensor is produced (a report)."""
        return {}


class Bf16Transform(Transform):
    """FP8 weights dequantized to BF16 (bit-exact block formula); other tensors as stored."""

    name = "bf16"

    def plan(self, ck, job):
        t = ck.info(job.source)
        dtype = "BF16" if t.dtype == "F8_E4M3" else t.dtype
        return (PlannedTensor(job.output, dtype, out_shape(ck, job)),)

    def produce(self, ck, job):
        if job.merge:
            return (merged_weight(ck, job).to(torch_dtype(self.plan(ck, job)[0].dtype)),)
        if ck.is_fp8(job.source):
            if job.rows is not None:
                raise ValueError(f"{job.source}: row selection of an FP8 weight is not supported")
            return (ck.read(job.source),)
        return (read_selected(ck, job),)

    def update_config(self, cfg):
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "bfloat16"
        return cfg


class Fp8Transform(Transform):
    """FP8 pass-through: weight bytes and scale grids copied untouched (lossless, ~half of BF16).

    Except the projections transformers cannot load as FP8 (shapes that are not whole
    128x128 blocks, e.g. K2's kv_a_proj_with_mqa [576, 7168], and their fused partner):
    those are written dequantized to BF16 and listed in ``modules_to_not_convert``. The
    rule and why: k2mini.model.fp8_layout.
    """

    name = "fp8"

    _skip_of: tuple[Checkpoint, tuple[str, ...]] | None = None

    def _stays_bf16(self, ck: Checkpoint, job: TensorJob) -> bool:
        if not ck.is_fp8(job.source):
            return False
        # Derived once per source: building the spec takes ~0.3 ms on K2's config, and plan and
        # produce ask for every tensor (70k calls for the k2-mild preset).
        if self._skip_of is None or self._skip_of[0] is not ck:
            self._skip_of = (ck, modules_to_not_convert(ModelSpec.from_config(ck.config)))
        return is_skipped(hf_module(job.source), self._skip_of[1])

    def check_source(self, ck):
        qc = ck.config.get("quantization_config") or {}
        if qc.get("quant_method") != "fp8":
            raise UsageError(f"--dtype fp8: the source {ck.description} is not an FP8 checkpoint (no fp8 quantization_config); use --dtype bf16")

    def plan(self, ck, job):
        t = ck.info(job.source)
        if t.dtype != "F8_E4M3" or self._stays_bf16(ck, job):
            return _BF16.plan(ck, job)
        s = ck.scale_of(job.source)
        if s is None:
            raise UsageError(f"--dtype fp8: FP8 weight {job.source} has no scale grid in {ck.description}")
        return (PlannedTensor(job.output, "F8_E4M3", t.shape), PlannedTensor(scale_name(job.output), "F32", s.shape))

    def produce(self, ck, job):
        if self._stays_bf16(ck, job):
            return _BF16.produce(ck, job)
        if job.merge:
            # A merged expert has no source bytes to copy: block-quantize the float32 sum on
            # the source's 128x128 grid, so the output stays one uniform FP8 checkpoint.
            return fp8.quantize(merged_weight(ck, job))
        if ck.is_fp8(job.source):
            if job.rows is not None:
                raise ValueError(f"{job.source}: row selection of an FP8 weight is not supported")
            return ck.read_fp8(job.source)
        return (read_selected(ck, job),)

    def update_config(self, cfg):
        # The source's block-FP8 quantization_config describes these bytes exactly, plus the
        # list of modules stored BF16. Also under ignored_layers: the name vLLM's Fp8Config reads
        # (transformers reads modules_to_not_convert and ignores the alias when both are set).
        cfg["torch_dtype"] = "bfloat16"
        qc = dict(cfg["quantization_config"])
        qc.pop("modules_to_not_convert", None)
        qc.pop("ignored_layers", None)
        spec = ModelSpec.from_config({k: v for k, v in cfg.items() if k != "quantization_config"})
        skip = list(modules_to_not_convert(spec))
        if skip:
            qc["modules_to_not_convert"] = skip
            qc["ignored_layers"] = skip
        cfg["quantization_config"] = qc
        return cfg


_BF16 = Bf16Transform()

TRANSFORMS: dict[str, Callable[..., Transform]] = {"bf16": Bf16Transform, "fp8": Fp8Transform}


def make_transform(name: str, choices: Mapping[str, Callable[..., Transform]] = TRANSFORMS, **options) -> Transform:
    """The ``--dtype`` transform among ``choices`` (a layer above adds its own, as quantize's
    int4/int8: convert never imports a package above it)."""
    try:
        return choices[name](**options)
    except KeyError:
        raise UsageError(f"--dtype {name}: unknown output type (choose from {', '.join(sorted(choices))})") from None
