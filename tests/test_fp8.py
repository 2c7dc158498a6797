"""FP8 block dequantization against the docs/facts.md §1 formula and against transformers."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from k2mini.checkpoint import fp8
from k2mini.checkpoint.reader import Checkpoint
from k2mini.model.hf import fuse_experts


def _e4m3_to_float64(raw: np.ndarray) -> np.ndarray:
    """Decode float8_e4m3fn bytes by the format's definition (bias 7, no infinities)."""
    b = raw.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    normal = sign * (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = sign * (man / 8.0) * 2.0**-6
    out = np.where(exp == 0, subnormal, normal)
    return np.where((b & 0x7F) == 0x7F, np.nan, out)


def _round_f32_to_bf16_bits(x32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even of float32 to bfloat16, on the bit patterns."""
    u = x32.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _reference_dequant(raw_u8: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """bf16(W.float() * scale_inv[i, j]) per 128x128 block, computed in float64.

    The float64 product of an FP8 value (4 significant bits) and an fp32 scale (24 bits) is
    exact, so rounding it to float32 equals the float32 multiply the formula specifies.
    """
    rows, cols = raw_u8.shape
    w = _e4m3_to_float64(raw_u8)
    s = scale.astype(np.float64)
    full = s[np.arange(rows)[:, None] // 128, np.arange(cols)[None, :] // 128]
    return _round_f32_to_bf16_bits((w * full).astype(np.float32))


@pytest.mark.parametrize("shape", [(576, 300), (200, 130), (1, 1), (128, 256), (129, 127)])
def test_dequant_equals_the_design_formula_bit_for_bit_on_edge_blocks(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    raw[(raw & 0x7F) == 0x7F] = 0x42  # NaN bytes are checked separately
    grid = fp8.scale_grid_shape(shape)
    # Scales over 40 binades, including ones above 2^8 (where a folded 2^120 would overflow).
    scale = torch.exp2(torch.empty(grid).uniform_(-30, 10, generator=gen)) * torch.empty(grid).uniform_(1, 2, generator=gen)
    got = fp8.dequantize(raw.view(torch.float8_e4m3fn), scale)
    want = _reference_dequant(raw.numpy(), scale.numpy())
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), want)


def test_dequant_turns_fp8_nan_bytes_into_nan():
    raw = torch.tensor([[0x7F, 0x01, 0xFF, 0x80, 0x7E]], dtype=torch.uint8)
    got = fp8.dequantize(raw.view(torch.float8_e4m3fn), torch.tensor([[2.0]]))
    assert got[0, 0].isnan() and got[0, 2].isnan()
    assert got[0, 1].item() == 2.0**-9 * 2 and got[0, 4].item() == 448.0 * 2


def test_quantize_maps_each_block_max_to_448_and_round_trips_within_half_a_step():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 200, generator=gen)
    q, s = fp8.quantize(w)
    assert s.shape == (3, 2) and q.dtype == torch.float8_e4m3fn
    blocks_max = q.float().abs().amax()
    assert blocks_max.item() == 448.0
    back = fp8.dequantize(q, s).float()
    # e4m3 has 3 mantissa bits: relative spacing 2^-3, so half a step is 2^-4 of |w|
    # (plus BF16 rounding of the result and the subnormal floor of each block).
    full = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((back - w).abs() <= w.abs() * (2**-4 + 2**-8) + full * 2**-9).all()


def test_reader_dequant_matches_the_formula_for_a_scale_stored_in_another_shard(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    name = next(n for n in ck.weight_names() if ck.scale_of(n) is not None and ck.scale_of(n).file != ck.info(n).file)
    w_info, s_info = ck.info(name), ck.scale_of(name)
    # Read the raw bytes with the safetensors library, independently of our reader.
    with safe_open(tiny_fixture.path / w_info.file, "pt") as f:
        raw = f.get_tensor(name).view(torch.uint8).numpy()
    with safe_open(tiny_fixture.path / s_info.file, "pt") as f:
        scale = f.get_tensor(s_info.name).numpy()
    assert raw.shape[0] % 128 != 0, "the cross-shard weight should also be an edge-block shape"
    want = _reference_dequant(raw, scale)
    assert np.array_equal(ck.read(name).view(torch.int16).numpy().view(np.uint16), want)


def test_reader_equals_transformers_finegrained_fp8_dequantize_on_aligned_shapes(aligned_fixture, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    # transformers cannot read the K2 source as is (model_type kimi_k2 + remote code), so
    # point a deepseek_v3 config at the very same shard files.
    src = aligned_fixture.path
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            os.symlink(f, tmp_path / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    del cfg["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    theirs = model.state_dict()
    ck = Checkpoint.open(src)
    ours = fuse_experts({n: ck.read(n) for n in ck.weight_names() if not n.endswith("inv_freq")})
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    shutil.rmtree(tmp_path)


def test_dequantize_leaves_torchs_thread_count_as_it_was():
    """numba's OpenMP layer raises the process's OpenMP thread count when it starts; a rank
    pinned to one thread must stay on one."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        w = torch.randn(256, 256).to(torch.float8_e4m3fn)
        fp8.dequantize(w, torch.ones(2, 2))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
