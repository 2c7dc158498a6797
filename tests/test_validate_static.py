"""validate's static checks: good outputs (bf16, fp8, int8, int4) pass; deliberately broken
outputs fail with the cause and the tensor named. No model is run here (--skip run)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.validate.static import fp8_cast_signature, run_static
from validate_outputs import reduce_by_hand

EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight"
SHARED = "model.layers.2.mlp.shared_experts.down_proj.weight"


@pytest.fixture(scope="module")
def outs(tiny_fixture, aligned_fixture, tmp_path_factory):
    from k2mini.quantize.run import QuantOptions, quantize_checkpoint

    root = tmp_path_factory.mktemp("vstatic")
    made = {
        "bf16": reduce_by_hand(tiny_fixture.path, root / "bf16", layers=[0, 1, 3], experts=[0, 2, 4, 6]),
        "fp8": reduce_by_hand(aligned_fixture.path, root / "fp8", experts=[1, 3, 5, 7], dtype="fp8", partial_bf16=True),
    }
    for bits, opts in ((4, QuantOptions(4, 32)), (8, QuantOptions(8))):
        quantize_checkpoint(made["bf16"], root / f"int{bits}", opts, progress=False)
        made[f"int{bits}"] = root / f"int{bits}"
    made["root"] = root
    return made


def static(path):
    return run_static(Checkpoint.open(path))


def errors(report):
    return [f for f in report.findings if f.severity == "error"]


@pytest.mark.parametrize("key,fmt", [("bf16", "bf16"), ("fp8", "fp8"), ("int4", "compressed-tensors int4 group 32"),
                                     ("int8", "compressed-tensors int8 per channel")])
def test_good_outputs_have_no_errors(outs, key, fmt):
    r = static(outs[key])
    assert r.format == fmt
    assert errors(r) == []
    assert r.tensors_scanned == r.tensors > 0
    # every byte of every tensor was read once
    assert r.bytes_scanned == sum(t.nbytes for t in Checkpoint.open(outs[key]).tensors.values())


def _broken(tiny_fixture, outs, name, mutate, **kw):
    return static(reduce_by_hand(tiny_fixture.path, outs["root"] / name, mutate=mutate, **kw))


def test_more_experts_in_config_than_router_rows(tiny_fixture, outs):
    r = _broken(tiny_fixture, outs, "more_experts", lambda t, c: c.update(n_routed_experts=16, num_experts_per_tok=2))
    router = [f for f in errors(r) if f.check == "tensor.router_size"]
    assert {f.tensor for f in router} >= {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    assert "8 rows but config n_routed_experts=16" in router[0].message
    assert set(router[0].breaks) == {"transformers", "vLLM", "SGLang"}


def test_missing_shared_expert_tensor(tiny_fixture, outs):
    r = _broken(tiny_fixture, outs, "no_shared", lambda t, c: t.pop(SHARED))
    [f] = [f for f in errors(r) if f.check == "tensor.missing"]
    assert f.tensor == SHARED and "shared-expert tensor" in f.message


def test_leftover_fp8_quantization_config_over_bf16(tiny_fixture, outs):
    qc = tiny_fixture.config["quantization_config"]
    r = _broken(tiny_fixture, outs, "leftover_qc", lambda t, c: c.update(quantization_config=qc))
    bad = [f for f in errors(r) if f.check == "tensor.bf16_under_fp8_config"]
    assert bad and "leftover fp8 quantization_config" in bad[0].message
    # every projection is flagged (5 listed, the rest summarised with the exact count)
    n_proj = sum(1 for n in Checkpoint.open(outs["root"] / "leftover_qc").tensors
                 if n.endswith("proj.weight") or n.endswith("proj_with_mqa.weight"))
    summary = [f for f in r.findings if f.check == "tensor.bf16_under_fp8_config" and "in all" in f.message]
    assert summary and f"({n_proj} in all)" in summary[0].message


def test_fp8_cast_to_bf16_without_scales(tiny_fixture, outs):
    """The old scripts' bug: raw e4m3 codes cast to BF16, weight_scale_inv dropped."""
    ck = Checkpoint.open(tiny_fixture.path)
    cast = []

    def cast_without_scales(t, c):
        for name in list(t):
            if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
                src = name.replace("model.layers.2.", "model.layers.3.") if name.startswith("model.layers.2.") else name
                if src in ck.tensors and ck.tensors[src].dtype == "F8_E4M3" and ".experts." not in name:
                    t[name] = ck.read_raw(src).to(torch.bfloat16)
                    cast.append(name)

    r = _broken(tiny_fixture, outs, "cast", cast_without_scales, layers=[0, 1, 3], experts=[0, 2, 4, 6])
    bad = [f for f in r.findings if f.check == "values.fp8_cast_without_scales"]
    assert bad[0].severity == "error" and "without multiplying by weight_scale_inv" in bad[0].message
    assert bad[0].tensor in cast
    # exactly the cast tensors are flagged; the experts, left dequantized, are not
    assert len(cast) > 5 and f"({len(cast)} in all)" in bad[-1].message
    assert not any(".experts." in (f.tensor or "") for f in bad)


def test_fp8_cast_signature_against_independent_cases():
    g = torch.Generator().manual_seed(0)
    real = (torch.randn(256, 256, generator=g) * 0.02).to(torch.bfloat16)
    on, amax = fp8_cast_signature(real)
    assert not on and amax == float(real.float().abs().max())
    # codes of a block-quantized weight: each block scaled so its max reaches 448
    codes = (real.float() / real.float().abs().max() * 448).to(torch.float8_e4m3fn).to(torch.bfloat16)
    on, amax = fp8_cast_signature(codes)
    assert on and amax == 448.0
    # a dequantized weight (codes x a non-power-of-two scale) is off the grid again
    assert not fp8_cast_signature((codes.float() * 3.3e-4).to(torch.bfloat16))[0]


def test_nan_in_one_expert(tiny_fixture, outs):
    def nan(t, c):
        t[EXPERT][5, 7] = float("nan")

    r = _broken(tiny_fixture, outs, "nan", nan)
    [f] = [f for f in errors(r) if f.check == "values.nonfinite"]
    assert f.tensor == EXPERT and "1 NaN/Inf" in f.message


def test_nan_code_in_fp8_weight(aligned_fixture, outs):
    def nan(t, c):
        w = t["model.layers.1.self_attn.o_proj.weight"]
        w.view(torch.uint8)[3, 3] = 0xFF

    r = static(reduce_by_hand(aligned_fixture.path, outs["root"] / "fp8nan", dtype="fp8", mutate=nan))
    [f] = [f for f in errors(r) if f.check == "values.nonfinite"]
    assert f.tensor == "model.layers.1.self_attn.o_proj.weight" and "FP8 NaN code" in f.message


def test_fp8_weights_without_config(aligned_fixture, outs):
    r = static(reduce_by_hand(aligned_fixture.path, outs["root"] / "fp8noqc", dtype="fp8",
                              mutate=lambda t, c: c.pop("quantization_config")))
    checks = {f.check for f in errors(r)}
    assert {"tensor.fp8_without_config", "tensor.fp8_scale"} <= checks


@pytest.mark.parametrize("field,value,check,engine", [
    ("num_experts_per_tok", 9, "config.experts_per_tok", "vLLM"),
    ("model_type", "kimi_k2", "config.model_type", "transformers"),
    ("scoring_func", None, "config.scoring_func", "SGLang"),
    ("topk_method", "greedy", "config.topk_method", "vLLM"),
    ("num_nextn_predict_layers", 1, "config.mtp", "vLLM"),
])
def test_config_field_errors_name_the_engine(tiny_fixture, outs, field, value, check, engine):
    def set_field(t, c):
        if value is None:
            c.pop(field)
        else:
            c[field] = value

    r = _broken(tiny_fixture, outs, f"cfg_{field}", set_field, experts=list(range(8)))
    [f] = [f for f in errors(r) if f.check == check]
    assert engine in f.breaks


def test_grouped_routing_needs_two_experts_per_group(grouped_fixture, outs):
    # 4 experts kept under the source's n_group=4: one expert per group
    r = static(reduce_by_hand(grouped_fixture.path, outs["root"] / "grouped", experts=[0, 2, 4, 6]))
    [f] = [f for f in errors(r) if f.check == "config.n_group"]
    assert "1 expert per group" in f.message and "vLLM" in f.breaks


def test_tensor_of_a_dropped_layer_is_unexpected(tiny_fixture, outs):
    def extra(t, c):
        t["model.layers.3.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"].clone()

    r = _broken(tiny_fixture, outs, "extra_layer", extra, layers=[0, 1, 2])
    [f] = [f for f in errors(r) if f.check == "tensor.unexpected_layer"]
    assert f.tensor == "model.layers.3.input_layernorm.weight" and f.breaks == ["vLLM"]


def test_fp16_config_is_warned(tiny_fixture, outs):
    r = _broken(tiny_fixture, outs, "fp16", lambda t, c: c.update(torch_dtype="float16"))
    [f] = [f for f in r.findings if f.check == "config.fp16"]
    assert f.severity == "warning" and "65504" in f.message


def test_fp8_edge_blocks_not_excluded_fail_for_transformers(tiny_fixture, outs):
    """Partial 128x128 blocks left FP8 (transformers cannot load them) fail; stored BF16 and listed in
    modules_to_not_convert (as convert --dtype fp8 writes them: test_convert_fp8_load.py) they pass."""
    r = static(reduce_by_hand(tiny_fixture.path, outs["root"] / "fp8edge", dtype="fp8"))
    edge = [f for f in errors(r) if f.check == "tensor.fp8_edge_block"]
    assert edge and edge[0].breaks == ["transformers"] and "transformers cannot load" in edge[0].message
    r = static(reduce_by_hand(tiny_fixture.path, outs["root"] / "fp8edge_bf16", dtype="fp8", partial_bf16=True))
    assert errors(r) == [] and not any(f.check.startswith("tensor.fp8") for f in r.findings)


def test_packed_weight_missing_scale(outs, tmp_path):
    """An INT4 output with one weight_scale removed: named as missing."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "int4"
    shutil.copytree(outs["int4"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.experts.2.down_proj.weight_scale"
    shard = d / index["weight_map"].pop(victim)
    tensors = load_file(str(shard))
    del tensors[victim]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    [f] = [f for f in errors(static(d)) if f.check == "tensor.missing"]
    assert f.tensor == victim


def test_cli_static_only_exit_codes(outs, tiny_fixture):
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", str(outs["bf16"]), "--skip", "run", "--gpu", "none", "--json", "--quiet"])
    assert ok.exit_code == 0, ok.output
    rep = json.loads(ok.stdout)
    assert rep["passed"] and rep["checks"] == ["static", "scan"]
    bad = runner.invoke(cli, ["validate", str(outs["root"] / "nan"), "--skip", "run", "--gpu", "none", "--quiet"])
    assert bad.exit_code == 1 and EXPERT in bad.stdout and bad.stdout.strip().endswith("FAIL")
    missing = runner.invoke(cli, ["validate", str(outs["root"] / "does-not-exist"), "--skip", "run"])
    assert missing.exit_code == 2 and "does-not-exist" in missing.stderr
    gpu = runner.invoke(cli, ["validate", str(outs["bf16"]), "--gpu", "tpu9"])
    assert gpu.exit_code == 2 and "--gpu tpu9: no such profile" in gpu.stderr and "h100" in gpu.stderr


def test_scan_reads_one_tensor_at_a_time(outs, monkeypatch):
    """Memory must not grow with model size: the scan holds at most one tensor."""
    ck = Checkpoint.open(outs["bf16"])
    live, peak = [0], [0]
    orig = Checkpoint.read_raw

    def tracked(self, name):
        t = orig(self, name)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        import weakref

        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    monkeypatch.setattr(Checkpoint, "read_raw", tracked)
    run_static(ck)
    assert peak[0] == 1
