"""The quantization report (quantization_report.json next to the weights)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

REPORT_FILE = "quantization_report.json"


class TensorReport(BaseModel):
    name: str
    shape: list[int]
    stored: str  # int4, int8, nf4, bf16, f32
    linear: bool  # a projection weight (attention, dense MLP, expert, shared expert)
    params: int
    bytes_in: int  # as stored in the input, FP8 scale grids included
    bytes_out: int  # every output tensor it became (packed values, scales, shape)
    int_bytes: int  # of bytes_out, those holding integer weight values
    scales: str | None = None  # compressed-tensors integer weights: "group 128" ... or "channel"
    rel_error: float | None = None  # ||W - dequant(Q(W))||_F / ||W||_F, W the BF16 weight
    max_abs_error: float | None = None


class WorstTensor(BaseModel):
    name: str
    rel_error: float


class QuantReport(BaseModel):
    source: str
    output: str
    format: str
    bits: int
    group_size: int | Literal["auto"] | None  # None: one scale per output channel; auto: chosen per tensor
    granularity: str  # what one scale covers, in words
    schemes: dict[str, int] = {}  # compressed-tensors: "group 128" / ... / "channel" -> integer weights with it
    ignore: list[str]
    tensors: list[TensorReport]
    bytes_in: int
    bytes_bf16: int  # the same tensors all in BF16 (F32 kept F32): the unquantized baseline
    bytes_out: int
    linear_bytes_out: int
    linear_int_bytes: int
    # Share of the linear weights' output bytes that are integer values (scales excluded).
    int_byte_share_linear: float
    # Share of linear-weight parameters held as integers: on disk, or for quanto after
    # transformers quantizes at load time.
    int_param_share_linear: float
    int_byte_share_all: float
    unquantized_linear_bytes: int  # linear weights left BF16 (ignored, or not supported by the format)
    unquantized_linear: list[str]
    worst: list[WorstTensor]
    mean_rel_error: float | None
    warning: str | None = None

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()

    def summary(self) -> str:
        mib = 2**20
        scales = f" -> {', '.join(f'{k}: {n}' for k, n in self.schemes.items())} tensors" if self.group_size == "auto" else ""
        lines = [
            f"{self.format} INT{self.bits} ({self.granularity}{scales}): "
            f"{self.bytes_bf16 / mib:.1f} MiB as BF16 -> {self.bytes_out / mib:.1f} MiB "
            f"(input {self.bytes_in / mib:.1f} MiB)",
            f"integer share: {100 * self.int_byte_share_linear:.2f}% of linear-weight bytes, "
            f"{100 * self.int_param_share_linear:.2f}% of linear-weight parameters, "
            f"{100 * self.int_byte_share_all:.2f}% of all bytes",
        ]
        if self.mean_rel_error is not None:
            lines.append(
                f"relative error ||W-Q(W)||/||W||: mean {self.mean_rel_error:.4f}, worst "
                + ", ".join(f"{w.name} {w.rel_error:.4f}" for w in self.worst[:3])
            )
        return "\n".join(lines)
