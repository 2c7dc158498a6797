"""INT4's default group size, chosen per tensor, on a model whose dims are not multiples of
128: hidden 192 (64), moe_intermediate 96 (32), o_proj input 4 x 32 = 128, and q_lora_rank
80, which 32 does not divide (per channel). Checked with the independent unpacking code and
float64 formula of test_quantize, and by loading the result in transformers."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_quantize import expected_q, read_all, reference_weights, unpack

from k2mini.cli import cli
from k2mini.testing import build_fixture


def expected_group(name: str, shape: tuple[int, int]) -> int | None:
    """The rule, restated: the largest of 128/64/32 dividing the input dimension; routed
    experts need one group dividing both of their dimensions (vLLM fuses gate/up with down)."""
    dims = shape if ".mlp.experts." in name else shape[1:]
    return next((g for g in (128, 64, 32) if all(d % g == 0 for d in dims)), None)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("auto") / "src", "tiny", keep_model=True, q_lora_rank=80)


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto-q") / "int4"
    r = CliRunner().invoke(cli, ["quantize", str(src.path), "--bits", "4", "-o", str(out), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.output)


def projections(ref: dict[str, np.ndarray]) -> list[str]:
    return [n for n in ref if "_proj" in n and n.endswith(".weight")]


def test_each_tensor_gets_the_largest_group_that_divides(src, quantized):
    out, summary = quantized
    stored = read_all(out)
    ref = reference_weights(src.model)
    seen = set()
    for name in projections(ref):
        w, base = ref[name], name[: -len(".weight")]
        g = expected_group(name, w.shape)
        seen.add(g)
        s = stored[f"{base}.weight_scale"].double().numpy()
        assert s.shape == (w.shape[0], 1 if g is None else w.shape[1] // g), name
        q_exp, s_exp = expected_q(w, 4, g or w.shape[1])
        np.testing.assert_array_equal(s, s_exp, err_msg=name)
        q = unpack(stored[f"{base}.weight_packed"], 4, w.shape[1])
        assert (q != q_exp).sum() <= 1e-5 * q.size, name  # float32 ties only, as in test_quantize
    assert seen == {128, 64, 32, None}  # the fixture exercises every case
    report = json.loads((out / "quantization_report.json").read_text())
    by_name = {t["name"]: t for t in report["tensors"]}
    for name in projections(ref):
        g = expected_group(name, ref[name].shape)
        assert by_name[name]["scales"] == ("channel" if g is None else f"group {g}"), name
    assert summary["group_size"] == "auto"
    counts = {}
    for name in projections(ref):
        g = expected_group(name, ref[name].shape)
        key = "channel" if g is None else f"group {g}"
        counts[key] = counts.get(key, 0) + 1
    assert summary["schemes"] == counts
    assert list(summary["schemes"]) == ["group 128", "group 64", "group 32", "channel"]


def test_config_groups_say_which_tensor_got_which(src, quantized):
    out, _ = quantized
    ref = reference_weights(src.model)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["k2mini"]["quantize"]["group_size"] == "auto"
    groups = list(qc["config_groups"].values())
    for name in projections(ref):
        module = name[: -len(".weight")]
        hits = [g for g in groups if any(re.match(t[3:], module) for t in g["targets"])]
        assert len(hits) == 1, (module, hits)
        w = hits[0]["weights"]
        g = expected_group(name, ref[name].shape)
        assert (w["strategy"], w["group_size"]) == (("channel", None) if g is None else ("group", g)), module
        assert (w["num_bits"], w["type"], w["symmetric"]) == (4, "int", True)
    # transformers takes the routed experts' scheme from the first group naming experts.
    assert any(".mlp.experts." in t.replace("\\", "") for t in groups[0]["targets"])
    for module in ("lm_head", "model.layers.1.mlp.gate"):
        assert not any(re.match(t[3:], module) for g in groups for t in g["targets"])


def test_integer_share_of_projection_bytes(quantized):
    out, summary = quantized
    stored = read_all(out)
    packed = sum(v.numel() * 4 for k, v in stored.items() if k.endswith("weight_packed"))
    lin = sum(v.numel() * v.element_size() for k, v in stored.items() if "_proj" in k)
    assert summary["int_byte_share_linear"] == pytest.approx(packed / lin)
    assert summary["int_param_share_linear"] == 1.0  # every projection is stored as integers, none left BF16
    assert summary["unquantized_linear"] == []
    # 0.905 here: most weights (the experts) are in groups of 32, whose BF16 scale adds 2 bytes to
    # every 16 bytes of packed values (16/18 = 0.889); groups of 128 would give 64/66 = 0.970.
    assert 16 / 18 < summary["int_byte_share_linear"] < 64 / 66


def test_transformers_loads_it_and_logits_match_dequantized_by_hand(src, quantized):
    from transformers import AutoModelForCausalLM

    out, _ = quantized
    stored = read_all(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    def deq(base: str) -> torch.Tensor:
        cols = int(stored[f"{base}.weight_shape"][1])
        q = unpack(stored[f"{base}.weight_packed"], 4, cols)
        s = stored[f"{base}.weight_scale"].double().numpy()
        return torch.from_numpy(q * np.repeat(s, cols // s.shape[1], axis=1))

    # transformers holds the fused routed experts it dequantizes in BF16 (the scales' dtype),
    # whatever dtype was asked for; the Linear modules in float32.
    def bf16(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).double()

    by_hand = copy.deepcopy(src.model).float()
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            if name.endswith("mlp.experts.gate_up_proj"):
                prefix = name[: -len("gate_up_proj")]
                for e in range(p.shape[0]):
                    p[e].copy_(bf16(torch.cat([deq(f"{prefix}{e}.gate_proj"), deq(f"{prefix}{e}.up_proj")])))
            elif name.endswith("mlp.experts.down_proj"):
                prefix = name[: -len("down_proj")]
                for e in range(p.shape[0]):
                    p[e].copy_(bf16(deq(f"{prefix}{e}.down_proj")))
            elif "_proj" in name:
                p.copy_(deq(name[: -len(".weight")]))
    x = torch.arange(3, 67).unsqueeze(0)
    with torch.no_grad():
        as_loaded, want = model(x).logits, by_hand(x).logits
        # ... and runs them in BF16 too: upcast them (values unchanged) to compare in float32.
        for p in model.parameters():
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
        got = model(x).logits
    assert torch.isfinite(as_loaded).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(as_loaded, want, rtol=0, atol=1e-2)
    # Not the unquantized model: INT4 moved the logits.
    assert (src.model(x).logits - want).abs().max() > 1e-3


def test_explicit_group_size_that_does_not_divide_stays_an_error(src, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(src.path), "--bits", "4", "--group-size", "64", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "--group-size 64 does not divide the input dimension" in r.output
    assert not (tmp_path / "x").exists()


def test_convert_dtype_int4_gets_the_same_default(src, quantized, tmp_path):
    """One pass from the FP8 source, everything kept: the same scales and config groups as
    quantize over the source."""
    out = tmp_path / "one"
    r = CliRunner().invoke(cli, ["convert", "-s", str(src.path), "--layers", "4", "--experts", "8", "--dtype", "int4",
                                 "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    one, two = read_all(out), read_all(quantized[0])
    assert {k for k in one if k.endswith("weight_scale")} == {k for k in two if k.endswith("weight_scale")}
    for k in one:
        if k.endswith(("weight_scale", "weight_packed")):
            assert torch.equal(one[k], two[k]), k
    cfg = {d: json.loads((d / "config.json").read_text()) for d in (out, quantized[0])}
    assert cfg[out]["quantization_config"]["config_groups"] == cfg[quantized[0]]["quantization_config"]["config_groups"]
    assert cfg[out]["k2mini"]["quantize"]["group_size"] == "auto"


def test_memory_plan_predicts_the_bytes_from_the_config(quantized):
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.validate.memory import weights_from_config, weights_from_headers

    ck = Checkpoint.open(quantized[0])
    assert weights_from_config(ck.config, "int4") == weights_from_headers(ck)
