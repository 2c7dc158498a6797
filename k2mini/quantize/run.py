"""``k2mini quantize``: stream a BF16 or FP8 checkpoint into an integer-weight checkpoint.

One input tensor is resident at a time: read (FP8 dequantized to BF16 by the reader),
quantized in row bands, written, dropped. Every output tensor's name, dtype and shape is
planned from the headers before any data is read, so bad input (a group size that does not
divide a weight, an already-quantized source) fails before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from k2mini.checkpoint.names import Role
from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.reduced import ReducedCheckpoint
from k2mini.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, WriteUnit
from k2mini.convert.card import model_card
from k2mini.errors import CheckpointError
from k2mini.model.spec import ModelSpec
from k2mini.output import OutputDir
from k2mini.quantize.formats import INT_TAGS
from k2mini.quantize.report import REPORT_FILE, QuantReport
from k2mini.quantize.transform import IntTransform, QuantOptions
from k2mini.selection.plan import PLAN_FILE, Plan

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


def reduced_model_card(ck: Checkpoint, out_cfg: dict, total_size: int) -> str | None:
    """A k2mini-reduced input's model card, rewritten for the quantized weights (the copied
    one would say BF16). None for other inputs: their README is not ours and is copied."""
    if not (isinstance(ck.config.get("k2mini"), dict) and ck.source.exists(PLAN_FILE) and ck.source.exists("README.md")):
        return None
    try:
        plan = Plan.model_validate_json(ck.source.read_bytes(PLAN_FILE))
    except ValueError as exc:
        msg = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"not a valid plan ({msg}); it is needed to rewrite the model card", path=f"{ck.description}/{PLAN_FILE}") from None
    params = ModelSpec.from_config({k: v for k, v in out_cfg.items() if k != "quantization_config"}).param_count()
    return model_card(out_cfg, plan, params=params, total_size=total_size,
                      src_layers=plan.source.num_hidden_layers, src_experts=plan.source.n_routed_experts)


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    opts: QuantOptions,
    *,
    progress: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> QuantReport:
    """Quantize ``src`` (BF16 output or K2 FP8 source) into a new directory ``out``."""
    from tqdm import tqdm

    transform = IntTransform(opts)
    ck = Checkpoint.open(src)
    check_source(ck)
    units = []
    for name in ck.weight_names():
        t = ck.tensors[name]
        if t.parsed.role is Role.INV_FREQ:
            continue  # loaders recompute it; convert drops it too
        scale = ck.scale_of(name) if t.dtype == "F8_E4M3" else None
        in_dtype = "BF16" if t.dtype == "F8_E4M3" else t.dtype
        planned = transform.plan(name, in_dtype, t.shape, t.nbytes + (scale.nbytes if scale else 0))
        units.append(WriteUnit(tuple(planned), lambda n=name: list(transform.apply(n, ck.read(n)))))
    out_cfg = transform.config(ck.config)
    card = reduced_model_card(ck, out_cfg, sum(u.nbytes for u in units))
    writer = ReducedCheckpoint(ck.source, out_cfg, files={} if card is None else {"README.md": card.encode()},
                               own_files=(REPORT_FILE,))
    reports: list[QuantReport] = []

    def report_file() -> dict[str, bytes]:  # the report covers every tensor, so it comes last
        reports.append(transform.report(str(src), str(out)))
        return {REPORT_FILE: reports[0].to_bytes()}

    with OutputDir(out, source=ck.description, overwrite=overwrite, planned_bytes=writer.planned_bytes(units, max_shard_bytes)) as od:
        with tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True, desc="quantize", disable=not progress,
                  file=sys.stderr) as bar:
            writer.write(od.partial, units, max_shard_bytes=max_shard_bytes, on_tensor=lambda p: bar.update(p.nbytes),
                         after=report_file)
        od.commit()
    return reports[0]
