"""convert / convert-fast --dtype fp8 on fixtures with partial 128x128 blocks: the output loads
in transformers without remote code, aligned FP8 bytes are copied untouched, the projections
transformers cannot load as FP8 are stored dequantized and listed in modules_to_not_convert
(k2mini.model.fp8_layout), and validate tells such an output from one that would not load."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from k2mini.checkpoint.reader import Checkpoint
from k2mini.model.fp8_layout import hf_module, is_skipped
from k2mini.model.spec import is_projection
from k2mini.testing import build_fixture
from k2mini.validate.memory import weights_from_config
from k2mini.validate.static import run_static
from convert_cli import convert, load
from validate_outputs import reduce_by_hand

IDS = torch.tensor([[1, 7, 42, 99, 3, 250, 17, 8]])


@pytest.fixture(scope="module")
def k2like(tmp_path_factory):
    """Kimi-K2's situation in small: every projection fills its 128x128 blocks except
    kv_a_proj_with_mqa (kv_lora 128 + rope 64 = 192 rows, like K2's 512 + 64 = 576)."""
    return build_fixture(tmp_path_factory.mktemp("k2like") / "src", "aligned", keep_model=True, kv_lora_rank=128)




def output_tensors(out: Path) -> dict[str, torch.Tensor]:
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, f in idx.items():
        with safe_open(out / f, "pt") as so:
            tensors[name] = so.get_tensor(name)
    return tensors


def skip_list(out: Path) -> list[str]:
    return json.loads((out / "config.json").read_text())["quantization_config"].get("modules_to_not_convert", [])


# --- loads in transformers ------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["convert", "convert-fast"])
@pytest.mark.parametrize("fx_name", ["tiny_fixture", "grouped_fixture", "k2like"])
def test_fp8_output_loads_without_remote_code(request, tmp_path, cmd, fx_name):
    fx = request.getfixturevalue(fx_name)
    out = tmp_path / "out"
    experts = 8 if fx_name == "grouped_fixture" else 4  # 2 per group: n_group 4 survives
    s = convert(cmd, fx.path, out, "--layers", 2, "--experts", experts, "--dtype", "fp8", "--max-shard-size", "150KB")
    assert s["shards"] >= 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and "auto_map" not in cfg
    if fx_name == "grouped_fixture":
        assert cfg["n_group"] > 1
    skip = skip_list(out)
    assert cfg["quantization_config"]["ignored_layers"] == skip and skip[-1] == "lm_head"
    tensors = output_tensors(out)
    # Every projection is FP8 with its scale grid, or BF16 without one and listed: nothing else.
    for name, t in tensors.items():
        if is_projection(name):
            listed = is_skipped(hf_module(name), tuple(skip))
            assert (t.dtype == torch.bfloat16) == listed, name
            assert (name.removesuffix("weight") + "weight_scale_inv" in tensors) == (not listed), name
            if t.dtype == torch.float8_e4m3fn:
                assert t.shape[0] % 128 == 0 and t.shape[1] % 128 == 0, name
    model = load(out, torch.bfloat16)
    assert torch.isfinite(model(IDS).logits.float()).all()


def test_k2like_keeps_everything_fp8_but_the_fused_qkv_a_pair(k2like, tmp_path):
    out = tmp_path / "out"
    convert("convert-fast", k2like.path, out, "--experts", 4, "--dtype", "fp8")
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert skip_list(out) == [f"model.layers.{i}.self_attn.{p}" for i in range(layers)
                              for p in ("q_a_proj", "kv_a_proj_with_mqa")] + ["lm_head"]
    dtypes = Counter(str(t.dtype) for n, t in output_tensors(out).items() if is_projection(n))
    assert dtypes["torch.bfloat16"] == 2 * layers and dtypes["torch.float8_e4m3fn"] > 2 * layers


def test_gpu_path_keeps_listed_modules_unquantized(k2like, tmp_path):
    """With FP8 compute (dequantize=False) transformers swaps Linear for FP8Linear before loading;
    run that step on a meta-device model: exactly the listed modules (and lm_head) stay plain."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    out = tmp_path / "out"
    convert("convert-fast", k2like.path, out, "--experts", 4, "--dtype", "fp8")
    qc = FineGrainedFP8Config.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert not qc.dequantize
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    FineGrainedFP8HfQuantizer(qc, pre_quantized=True)._process_model_before_weight_loading(model)
    fp8_modules = {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    stored_fp8 = {hf_module(n) for n, t in output_tensors(out).items() if t.dtype == torch.float8_e4m3fn}
    assert fp8_modules == stored_fp8 and "lm_head" not in fp8_modules
    for m in skip_list(out):
        assert type(model.get_submodule(m)) is torch.nn.Linear, m


def test_is_skipped_is_transformers_matching():
    from transformers.quantizers.quantizers_utils import should_convert_module

    modules = ["model.layers.1.self_attn.kv_a_proj_with_mqa", "model.layers.11.self_attn.kv_a_proj_with_mqa",
               "model.layers.1.mlp.experts", "model.layers.1.mlp.gate", "model.layers.1.mlp.gate_proj", "lm_head"]
    pattern_sets = [("model.layers.1.self_attn.kv_a_proj_with_mqa",), ("model.layers.1",), ("kv_a_proj_with_mqa",),
                    (r"model.layers.\d+.mlp.experts",), ("mlp.gate",), ("lm_head", "model.layers.11")]
    for patterns in pattern_sets:
        for m in modules:
            assert is_skipped(m, patterns) == (not should_convert_module(m, list(patterns))), (m, patterns)


# --- bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("fx_name", ["tiny_fixture", "k2like"])
def test_aligned_bytes_untouched_partial_dequantized(request, tmp_path, fx_name):
    fx = request.getfixturevalue(fx_name)
    out = tmp_path / "out"
    convert("convert", fx.path, out, "--keep-layers", "0,2", "--keep-experts", "1,4,6", "--dtype", "fp8")
    ck = Checkpoint.open(fx.path)
    src_layer, src_expert = {0: 0, 1: 2}, {0: 1, 1: 4, 2: 6}
    skip = tuple(skip_list(out))
    n = Counter()
    for name, got in output_tensors(out).items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            parts[2] = str(src_layer[int(parts[2])])
            if parts[4] == "experts":
                parts[5] = str(src_expert[int(parts[5])])
        src = ".".join(parts)
        if is_projection(name) and is_skipped(hf_module(name), skip):
            assert ck.is_fp8(src) and got.dtype == torch.bfloat16
            assert torch.equal(got, ck.read(src)), name  # the DeepSeek block formula, edge blocks included
            n["dequantized"] += 1
            continue
        want = ck.read_raw(src)
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            want = want[[1, 4, 6]]
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        n[str(got.dtype)] += 1
    assert n["dequantized"] > 0
    assert (n["torch.float8_e4m3fn"] > 0) == (fx_name == "k2like")  # tiny: no projection fills its blocks


def test_dry_run_and_memory_plan_count_bf16_modules(k2like, tmp_path):
    out = tmp_path / "out"
    dry = convert("convert-fast", k2like.path, tmp_path / "dry", "--experts", 4, "--dtype", "fp8", "--dry-run")
    convert("convert-fast", k2like.path, out, "--experts", 4, "--dtype", "fp8")
    stored = Counter()
    for t in output_tensors(out).values():
        stored[str(t.dtype)] += t.numel() * t.element_size()
    tags = {"torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float8_e4m3fn": "F8_E4M3"}
    by_tag = {tags[k]: v for k, v in stored.items()}
    assert dry["bytes_by_dtype"] == by_tag
    cfg = json.loads((out / "config.json").read_text())
    assert weights_from_config(cfg, "fp8") == by_tag  # the memory plan predicts the same split from the config
    assert "except 6 modules stored BF16" in (out / "README.md").read_text()  # 3 layers x (q_a, kv_a)


# --- exactness -----------------------------------------------------------------------


@pytest.mark.parametrize("fx_name", ["tiny_fixture", "k2like"])
def test_all_kept_fp8_logits_equal_bf16_output(request, tmp_path, fx_name):
    """Without FP8 compute transformers dequantizes FP8 at load to the model dtype, bf16(fp8 *
    scale) for whole blocks: the same values the bf16 output stores. So in bfloat16 the two
    models hold identical weights and the logits are equal, bit for bit (tolerance 0)."""
    fx = request.getfixturevalue(fx_name)
    convert("convert", fx.path, tmp_path / "fp8", "--dtype", "fp8")
    convert("convert", fx.path, tmp_path / "bf16")
    with torch.no_grad():
        a = load(tmp_path / "fp8", torch.bfloat16)(IDS).logits
        b = load(tmp_path / "bf16", torch.bfloat16)(IDS).logits
    assert torch.isfinite(a.float()).all() and torch.equal(a, b)


# --- validate -------------------------------------------------------------------------


def errors(rep):
    return [f for f in rep.findings if f.severity == "error"]


@pytest.mark.parametrize("fx_name", ["tiny_fixture", "k2like"])
def test_validate_passes_convert_fp8_output(request, tmp_path, fx_name):
    fx = request.getfixturevalue(fx_name)
    out = tmp_path / "out"
    convert("convert-fast", fx.path, out, "--experts", 4, "--dtype", "fp8")
    rep = run_static(Checkpoint.open(out))
    assert rep.format == "fp8" and errors(rep) == [], errors(rep)
    assert not any(f.check.startswith("tensor.fp8") for f in rep.findings)


def test_validate_fails_partial_fp8_not_excluded(k2like, tmp_path):
    rep = run_static(Checkpoint.open(reduce_by_hand(k2like.path, tmp_path / "raw", dtype="fp8")))
    edge = [f for f in errors(rep) if f.check == "tensor.fp8_edge_block"]
    assert {f.tensor for f in edge} == {f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight" for i in range(3)}
    assert all(f.breaks == ["transformers"] and "transformers cannot load" in f.message for f in edge)


def test_validate_fails_fused_pair_of_mixed_precision(k2like, tmp_path):
    """kv_a_proj_with_mqa BF16 and listed (transformers loads it), q_a_proj left FP8: vLLM's fused GEMM refuses."""
    ck = Checkpoint.open(k2like.path)

    def only_kv_a_bf16(tensors, cfg):
        kv = [n for n in tensors if n.endswith("kv_a_proj_with_mqa.weight")]
        for n in kv:
            src = n  # reduce_by_hand keeps every layer, so names are the source's
            tensors[n] = ck.read(src)
            del tensors[n.removesuffix("weight") + "weight_scale_inv"]
        cfg["quantization_config"]["modules_to_not_convert"] = [n.removesuffix(".weight") for n in kv] + ["lm_head"]

    out = reduce_by_hand(k2like.path, tmp_path / "mixed", dtype="fp8", mutate=only_kv_a_bf16)
    rep = run_static(Checkpoint.open(out))
    assert {f.check for f in errors(rep)} == {"tensor.fp8_fused_mixed"}
    assert all(f.breaks == ["vLLM"] for f in errors(rep))
    load(out, torch.bfloat16)  # transformers itself is fine with it
