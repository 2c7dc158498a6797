"""``k2mini quantize``: stream a BF16 or FP8 checkpoint into an integer-weight checkpoint.

One input tensor is resident at a time: read (FP8 dequantized to BF16 by the reader),
quantized in row bands, written, dropped. Every output tensor's name, dtype and shape is
planned from the headers before any data is read, so bad input (a group size that does not
divide a weight, an already-quantized source) fails before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from k2mini.checkpoint.names import Role
from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.safetensors_format import PlannedTensor
from k2mini.errors import CheckpointError, UsageError
from k2mini.quantize.formats import INT_TAGS
from k2mini.quantize.report import REPORT_FILE, QuantReport
from k2mini.quantize.transform import IntTransform, QuantOptions

# quant_method values we can read: none (BF16) or K2's block FP8.
_READABLE_QUANT = (None, "fp8")


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


AUX_SKIP_SUFFIXES = (".safetensors", ".py", ".pyc")


def aux_files(ck: Checkpoint) -> list[str]:
    """Files that travel with the weights (tokenizer, generation config, model card); never
    remote code, weights, index or config."""
    skip = {"config.json", "model.safetensors.index.json", REPORT_FILE}
    return [f for f in ck.source.list_files() if "/" not in f and f not in skip and not f.endswith(AUX_SKIP_SUFFIXES)]


def quantize_checkpoint(src: str | Path, out: str | Path, opts: QuantOptions, *, progress: bool = True) -> QuantReport:
    """Quantize ``src`` (BF16 output or K2 FP8 source) into a new directory ``out``."""
    transform = IntTransform(opts)
    ck = Checkpoint.open(src)
    check_source(ck)
    names = [n for n in ck.weight_names() if ck.tensors[n].parsed.role is not Role.INV_FREQ]  # loaders recompute inv_freq
    plan: list[PlannedTensor] = []
    for name in names:
        t = ck.tensors[name]
        scale = ck.scale_of(name) if t.dtype == "F8_E4M3" else None
        in_dtype = "BF16" if t.dtype == "F8_E4M3" else t.dtype
        plan += transform.plan(name, in_dtype, t.shape, t.nbytes + (scale.nbytes if scale else 0))
    write_checkpoint(ck, Path(out), plan, _stream(ck, transform, names, progress), transform.config(ck.config), aux_files(ck))
    report = transform.report(str(src), str(out))
    (Path(out) / REPORT_FILE).write_text(report.model_dump_json(indent=1) + "\n")
    return report


def _stream(ck: Checkpoint, transform: IntTransform, names: list[str], progress: bool) -> Iterator[torch.Tensor]:
    """Output tensors in plan order; one input tensor resident at a time."""
    from tqdm import tqdm

    total = sum(j.bytes_in for j in transform.jobs.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress, file=sys.stderr) as bar:
        for name in names:
            yield from transform.apply(name, ck.read(name))
            bar.update(transform.jobs[name].bytes_in)


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
