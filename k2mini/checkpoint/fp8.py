"""FP8 e4m3 block quantization as Kimi-K2 / DeepSeek-V3 store it.

A weight [rows, cols] is split into 128x128 blocks; block (i, j) holds
``W[i*128:(i+1)*128, j*128:(j+1)*128] / scale_inv[i, j]`` as float8_e4m3fn, and
``scale_inv`` has shape [ceil(rows/128), ceil(cols/128)]. Edge blocks (576 = 4*128 + 64
rows) are partial and use their one scale. Dequantization is
``bf16(W_fp8.float() * scale_inv[i, j])`` (DeepSeek-V3's ``weight_dequant``).

Why not transformers' FineGrainedFP8 dequantize: it infers the block size as
rows // scale_rows and misreads edge-block shapes (docs/facts.md §1). Why not naive broadcasting
(``repeat_interleave`` the grid to full size): it materialises a full fp32 scale tensor and
runs at 0.1-0.3 GB/s on two cores. Here we walk one 128-row band at a time, so the fp32
intermediates stay in cache and the scale is expanded only along one band's columns.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from k2mini.checkpoint.fp8_grid import BLOCK, FP8_MAX, check_scale_grid, scale_grid_shape
from k2mini.errors import CheckpointError


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Block-dequantize an FP8 e4m3 weight with its fp32 scale grid to BF16.

    Bit-exact to ``bf16(W.float() * scale_inv[i, j])`` with round-to-nearest-even; FP8 NaN
    bytes (0x7F, 0xFF) come out as NaN. ``out``: a contiguous BF16 CPU tensor of the
    weight's shape to write into (a reused buffer), else a new one.
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"expected a float8_e4m3fn weight, got {weight.dtype}")
    check_scale_grid("weight", tuple(weight.shape), tuple(scale_inv.shape), block)
    if weight.device.type != "cpu":
        return _dequantize_torch(weight, scale_inv, block)
    rows, cols = weight.shape
    scale = scale_inv.to(torch.float32)
    # Per band of 128 rows, the scale expanded along columns: [n_row_blocks, cols], small.
    col_scale = scale.index_select(1, torch.arange(cols) // block).contiguous()
    if out is None:
        out = torch.empty((rows, cols), dtype=torch.bfloat16)
    elif out.dtype != torch.bfloat16 or tuple(out.shape) != (rows, cols) or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"dequantize: out must be a contiguous CPU bfloat16 tensor of shape {[rows, cols]}")
    if weight.numel():
        # numba's OpenMP threading layer sets the process-wide OpenMP thread count to every
        # core when it starts, which silently raised torch's too (a rank under torchrun with
        # OMP_NUM_THREADS=1 ran 2 threads after its first FP8 read): the kernel uses torch's
        # count, and torch's is put back.
        threads = torch.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _dequant_kernel(weight.contiguous().view(torch.int8).numpy(), col_scale.numpy(), block, out.view(torch.int16).numpy())
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return out


def _dequantize_torch(weight: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    """Device-agnostic path (CUDA): one band of rows at a time, fp32 product rounded once."""
    rows, cols = weight.shape
    scale = scale_inv.to(torch.float32)
    col_expand = torch.arange(cols, device=weight.device) // block
    out = torch.empty((rows, cols), dtype=torch.bfloat16, device=weight.device)
    for i in range(scale.shape[0]):
        r0, r1 = i * block, min((i + 1) * block, rows)
        out[r0:r1] = (weight[r0:r1].to(torch.float32) * scale[i].index_select(0, col_expand)).to(torch.bfloat16)
    return out


# Why a numba kernel: torch's float8 -> float32 cast runs at about 0.2-0.3 G elements/s on
# two cores and every tensor op is a pass over memory. This does the whole dequant in one
# pass per row: FP8 bits are moved into a float32 whose exponent field is the FP8 one (the
# value is then 2^-120 of the FP8 value, subnormals included), multiplied by 2^120 (exact)
# and by the block scale (the single rounding), then rounded to BF16 (nearest-even).
@numba.njit(parallel=True, cache=True, nogil=True)
def _dequant_kernel(q, col_scale, block, out):  # pragma: no cover - compiled
    rows, cols = q.shape
    for i in numba.prange(rows):
        srow = col_scale[i // block]
        bits = np.empty(cols, np.uint32)
        has_nan = False
        for j in range(cols):
            x = np.int32(q[i, j])
            has_nan |= (x & 0x7F) == 0x7F
            bits[j] = np.uint32((x << 20) & np.int32(-2014314496))  # 0x87F00000: sign + 7 bits
        f = bits.view(np.float32)
        for j in range(cols):
            f[j] = (f[j] * np.float32(2.0**120)) * srow[j]
        for j in range(cols):
            b = bits[j]
            out[i, j] = np.int16(np.uint16((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16))
        if has_nan:
            for j in range(cols):
                if (np.int32(q[i, j]) & 0x7F) == 0x7F:
                    out[i, j] = np.int16(0x7FC0)


def quantize(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize to float8_e4m3fn; returns (fp8 weight, fp32 scale_inv grid).

    Each block's scale maps its absolute maximum to the FP8 maximum (448), so every block
    uses the full FP8 range; an all-zero block gets scale 1. Works one 128-row band at a
    time so the float32 temporaries are a band, not the whole tensor.
    """
    rows, cols = weight.shape
    gr, gc = scale_grid_shape((rows, cols), block)
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=weight.device)
    scale_inv = torch.empty((gr, gc), dtype=torch.float32, device=weight.device)
    padded = torch.zeros((block, gc * block), dtype=torch.float32, device=weight.device)
    for i in range(gr):
        r0, r1 = i * block, min((i + 1) * block, rows)
        padded.zero_()
        padded[: r1 - r0, :cols] = weight[r0:r1]
        blocks = padded.view(block, gc, block)
        amax = blocks.abs().amax(dim=(0, 2))
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale_inv[i] = s
        band = (blocks / s[None, :, None]).clamp_(-FP8_MAX, FP8_MAX).view(block, gc * block)
        q[r0:r1] = band[: r1 - r0, :cols].to(torch.float8_e4m3fn)
    return q, scale_inv
