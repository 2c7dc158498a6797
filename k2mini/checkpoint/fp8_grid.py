"""Geometry of Kimi-K2 / DeepSeek-V3 block-FP8 weights: 128x128 blocks, one fp32 scale each,
partial blocks at the edges. No numeric code, so reading headers (inspect) needs no torch."""

from __future__ import annotations

from k2mini.errors import CheckpointError

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_grid_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // block), -(-cols // block))


def check_scale_grid(name: str, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block: int = BLOCK) -> None:
    if len(weight_shape) != 2:
        raise CheckpointError(f"FP8 weight {name} has shape {list(weight_shape)}; only 2-D block-scaled weights are supported")
    expected = scale_grid_shape(weight_shape, block)
    if tuple(scale_shape) != expected:
        raise CheckpointError(
            f"scale grid of {name} is {list(scale_shape)} but a {list(weight_shape)} weight with {block}x{block} blocks needs {list(expected)}"
        )
