"""Memory plan: GPU profiles, KV cache sizes against transformers' own cache, weight bytes
from a config against the bytes real outputs hold, and the Kimi-K2 24x16 plan against a
parameter count done here from the published tensor shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.validate.gpus import available_profiles, load_profile
from k2mini.validate.memory import kv_cache, memory_plan, reduced_config, weights_from_config, weights_from_headers
from k2mini.validate.static import params_from_headers
from validate_outputs import reduce_by_hand

# A copy of the real Kimi-K2-Instruct config.json (../shared/reference/), kept in the repo so
# nothing here depends on a file outside it.
REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json"


@pytest.fixture(scope="module")
def k2_24x16():
    return reduced_config(json.loads(REFERENCE.read_text()), 24, 16)


def k2_params_by_hand(layers: int, experts: int) -> tuple[int, int]:
    """(parameters, router-bias entries) of Kimi-K2 cut to layers x experts, from the shapes
    in docs/facts.md §1 (hidden 7168, q_lora 1536, kv_lora 512, 64 heads of 128+64 / 128,
    intermediate 18432, moe_intermediate 2048, one shared expert, vocab 163840, layer 0 dense)."""
    h, vocab = 7168, 163840
    attn = (1536 * h + 1536 + 64 * 192 * 1536  # q_a_proj, q_a_layernorm, q_b_proj
            + 576 * h + 512 + 64 * 256 * 512  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
            + h * 64 * 128  # o_proj
            + 2 * h)  # input / post-attention layernorm
    dense = attn + 3 * 18432 * h
    moe = attn + experts * h + experts + (experts + 1) * 3 * 2048 * h
    total = 2 * vocab * h + h + dense + (layers - 1) * moe
    return total, (layers - 1) * experts


def test_every_profile_loads_and_is_named_after_its_file():
    names = available_profiles()
    assert set(names) >= {"h100", "h200", "a100-80g", "l40s", "rtx4090", "cpu"}
    for n in names:
        p = load_profile(n)
        assert p.name == n and p.memory_bytes > p.reserved_bytes
    assert load_profile("h100").memory_bytes == 81559 << 20
    assert load_profile("a100-80g").fp8_native is False


@pytest.mark.parametrize("body,why", [
    ({"name": "x", "description": "", "kind": "cuda", "memory_mib": 100, "reserved_mib": 1, "fp8_native": True,
      "bf16": True, "tflops": 3}, "tflops"),
    ({"name": "x", "description": "", "kind": "cuda", "memory_mib": -5, "reserved_mib": 1, "fp8_native": True,
      "bf16": True}, "memory_mib"),
    ({"name": "x", "description": "", "kind": "cuda", "reserved_mib": 1, "fp8_native": True, "bf16": True}, "memory_mib"),
])
def test_invalid_profiles_are_refused_naming_the_file(tmp_path, body, why):
    f = tmp_path / "x.json"
    f.write_text(json.dumps(body))
    with pytest.raises(UsageError, match=why) as exc:
        load_profile("x", tmp_path)
    assert str(f) in str(exc.value)


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(UsageError, match="no such profile.*h100"):
        load_profile("v100")


def test_kv_cache_sizes_for_k2(k2_24x16):
    kv = kv_cache(k2_24x16, context=8192, batch=2)
    assert kv.latent_bytes_per_token == 24 * (512 + 64) * 2
    assert kv.expanded_bytes_per_token == 24 * 64 * ((128 + 64) + 128) * 2
    assert kv.latent_bytes == kv.latent_bytes_per_token * 8192 * 2


def test_latent_kv_equals_what_transformers_caches(tiny_fixture):
    """transformers 5's DeepseekV3 caches the MLA latent: its cache bytes after T tokens
    must equal the plan's latent cache (float32 here, 4 bytes per value)."""
    model = tiny_fixture.model
    batch, t = 2, 11
    with torch.no_grad():
        out = model(torch.arange(batch * t).reshape(batch, t) % 100 + 3, use_cache=True)
    cache = out.past_key_values
    cached = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    assert cached == kv_cache(tiny_fixture.config, context=t, batch=batch, dtype_bytes=4).latent_bytes


def test_k2_24x16_parameter_count_and_bytes(k2_24x16):
    params, bias = k2_params_by_hand(24, 16)
    plans = {d: memory_plan(k2_24x16, load_profile("h100"), context=4096, batch=1, dtype=d) for d in ("bf16", "fp8", "int4")}
    assert plans["bf16"].params == params == 22_394_854_768
    assert plans["bf16"].weights_bytes == 2 * (params - bias) + 4 * bias
    # fp8: every projection 1 byte + one F32 scale per 128x128 block; the rest as bf16
    assert plans["fp8"].weights_by_dtype["F8_E4M3"] < plans["bf16"].weights_bytes / 2
    for d, p in plans.items():
        assert p.needed_latent_bytes == p.weights_bytes + p.kv.latent_bytes + p.activation_bytes + p.reserved_bytes
        assert p.fits_latent == (p.needed_latent_bytes <= p.memory_bytes)
    assert plans["bf16"].fits_latent and plans["int4"].weights_bytes < plans["fp8"].weights_bytes
    small = memory_plan(k2_24x16, load_profile("rtx4090"), context=4096, batch=1, dtype="bf16")
    assert not small.fits_latent


def test_script_prints_the_plan(k2_24x16):
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_plan_k2", Path(__file__).resolve().parents[1] / "scripts" / "memory_plan_k2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = CliRunner().invoke(mod.main, ["--json"])
    assert res.exit_code == 0, res.output
    plans = json.loads(res.stdout)
    assert set(plans) == {"bf16", "fp8", "int4"}
    assert plans["bf16"]["params"] == k2_params_by_hand(24, 16)[0]
    text = CliRunner().invoke(mod.main, []).stdout
    assert "22,394,854,768 parameters" in text and "FITS" in text


@pytest.fixture(scope="module")
def outputs(tiny_fixture, aligned_fixture, tmp_path_factory):
    from k2mini.quantize.run import QuantOptions, quantize_checkpoint

    root = tmp_path_factory.mktemp("vmem")
    bf16 = reduce_by_hand(tiny_fixture.path, root / "bf16", layers=[0, 2, 3], experts=[1, 2, 5, 6])
    fp8 = reduce_by_hand(aligned_fixture.path, root / "fp8", experts=[0, 1, 2, 3], dtype="fp8", partial_bf16=True)
    quantize_checkpoint(bf16, root / "int4", QuantOptions(4, 32), progress=False)
    return {"bf16": bf16, "fp8": fp8, "int4": root / "int4"}


@pytest.mark.parametrize("key,dtype,group", [("bf16", "bf16", None), ("fp8", "fp8", None), ("int4", "int4", 32)])
def test_bytes_from_config_equal_bytes_in_real_outputs(outputs, key, dtype, group):
    """The config-only estimate (used before anything is written) against the headers of
    outputs written by hand (bf16, fp8) and by k2mini quantize (int4)."""
    ck = Checkpoint.open(outputs[key])
    assert weights_from_config(ck.config, dtype, group) == weights_from_headers(ck)


def test_params_from_headers_count_packed_weights_by_logical_shape(outputs):
    from k2mini.model.spec import ModelSpec

    bf16 = Checkpoint.open(outputs["bf16"])
    expected = ModelSpec.from_config(bf16.config).param_count()
    assert params_from_headers(bf16) == expected == params_from_headers(Checkpoint.open(outputs["int4"]))


def test_transformers_holds_compressed_tensors_as_bf16(outputs):
    ck = Checkpoint.open(outputs["int4"])
    p = memory_plan(ck.config, load_profile("h100"), context=128, batch=1, ck=ck)
    bias = sum(t.nbytes for n, t in ck.tensors.items() if t.dtype == "F32")
    assert p.weights_source == "headers"
    assert p.transformers_weights_bytes == 2 * (p.params - bias // 4) + bias > p.weights_bytes
