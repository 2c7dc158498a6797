"""Symmetric integer weight quantization (group-wise or channel-wise) and int32 packing.

Scales follow compressed-tensors' ``minmax`` observer for symmetric INT: ``max|w| / ((2^b - 1) / 2)``
(7.5 for INT4, 127.5 for INT8), so the largest magnitude lands on the edge of the integer
range. One deliberate difference: the float32 scale is rounded *up* to BF16 (the stored
dtype) instead of to nearest, so ``|w / scale| <= 2^(b-1) - 0.5`` always holds and every
element's error stays within half a quantization step; rounding down could push the largest
element past the clamp. Values are computed in float32 (the library divides in the weight
dtype, BF16, which adds its own rounding).

Work proceeds in bands of rows so that a huge projection (K2's dense MLP is 18432 x 7168)
never needs more than a band of float32 temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

BITS = (4, 8)
# Rows per band: 512 rows of 18432 columns is 36 MB of float32.
_BAND_ELEMENTS = 1 << 23


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def group_width(in_features: int, group_size: int | None) -> int:
    """Columns per scale: the group size, or the whole row for channel-wise scales."""
    return in_features if group_size is None else group_size


def _round_up_bf16(s: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 -> the smallest BF16 value >= it (never below, see module doc)."""
    b = s.to(torch.bfloat16)
    low = b.float() < s
    if low.any():
        # For positive BF16 numbers the next representable value is the next bit pattern.
        bits = b.view(torch.int16)
        b = torch.where(low, (bits + 1).view(torch.bfloat16), b)
    return b


def scales_for(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """BF16 scales [out, in / width] for a 2-D weight."""
    out_f, in_f = w.shape
    g = group_width(in_f, group_size)
    amax = w.float().reshape(out_f, in_f // g, g).abs().amax(-1)
    s = _round_up_bf16(amax / ((2**bits - 1) / 2))
    # An all-zero group quantizes to zeros under any scale; compressed-tensors stores eps.
    return torch.where(s == 0, torch.tensor(torch.finfo(torch.bfloat16).eps, dtype=torch.bfloat16), s)


def quantize_band(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values of ``w`` [rows, in] under scales ``s`` [rows, groups]."""
    rows, in_f = w.shape
    g = in_f // s.shape[1]
    lo, hi = qrange(bits)
    x = w.float().reshape(rows, s.shape[1], g) / s.float().unsqueeze(-1)
    return torch.clamp(torch.round(x), lo, hi).to(torch.int8).reshape(rows, in_f)


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32 weights from int values [out, in] and scales [out, groups]."""
    rows, in_f = q.shape
    g = in_f // s.shape[1]
    return (q.float().reshape(rows, s.shape[1], g) * s.float().unsqueeze(-1)).reshape(rows, in_f)


@dataclass
class Quantized:
    packed: torch.Tensor  # int32 [out, ceil(in * bits / 32)]
    scale: torch.Tensor  # bf16 [out, groups]
    # Accumulated in float64 over the bands: ||W - deq(Q(W))||^2 and ||W||^2.
    err_sq: float
    ref_sq: float
    max_abs_err: float

    @property
    def rel_error(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else 0.0


def packed_shape(shape: tuple[int, int], bits: int) -> tuple[int, int]:
    return shape[0], -(-shape[1] * bits // 32)


def quantize_packed(w: torch.Tensor, bits: int, group_size: int | None) -> Quantized:
    """Quantize a 2-D weight and pack it as compressed-tensors ``weight_packed`` (int32,
    ``32 / bits`` values per word, low bits first, each value offset by 2^(b-1))."""
    out_f, in_f = w.shape
    packed = torch.empty(packed_shape((out_f, in_f), bits), dtype=torch.int32)
    g = group_width(in_f, group_size)
    scale = torch.empty((out_f, in_f // g), dtype=torch.bfloat16)
    band = max(1, _BAND_ELEMENTS // max(1, in_f))
    err_sq = ref_sq = max_err = 0.0
    for r in range(0, out_f, band):
        wb = w[r : r + band]
        s = scales_for(wb, bits, group_size)
        q = quantize_band(wb, s, bits)
        # The library's own packer: its layout is what transformers and vLLM unpack.
        packed[r : r + band] = pack_to_int32(q, bits)
        scale[r : r + band] = s
        diff = wb.float() - dequantize(q, s)
        err_sq += float(diff.double().pow(2).sum())
        ref_sq += float(wb.double().pow(2).sum())
        max_err = max(max_err, float(diff.abs().max())) if diff.numel() else max_err
    return Quantized(packed, scale, err_sq, ref_sq, max_err)


def roundtrip(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """The weights a loader reads back from ``quantize_packed(w)``: the integers times their
    BF16 scales, in float32 (exact: a 4- or 8-bit integer times an 8-bit mantissa), which is
    what compressed-tensors decompresses to when the model is loaded in float32. ``k2mini
    plan`` scores an INT cut with these without writing it. Banded like ``quantize_packed``."""
    out = torch.empty(w.shape, dtype=torch.float32)
    band = max(1, _BAND_ELEMENTS // max(1, w.shape[1]))
    for r in range(0, w.shape[0], band):
        wb = w[r : r + band]
        s = scales_for(wb, bits, group_size)
        out[r : r + band] = dequantize(quantize_band(wb, s, bits), s)
    return out
