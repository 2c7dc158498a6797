"""validate's run checks and --reference comparison on CPU: hooks against transformers'
own hidden states, KL/top-1/perplexity against an independent computation with the
fixture's transformers model, broken outputs failing with the module named."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.validate.runcheck import held_out_ids
from k2mini.validate.validate import ValidateOptions, validate
from validate_outputs import reduce_by_hand

PRUNED = dict(layers=[0, 1, 3], experts=[0, 2, 4, 6])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vrun")


@pytest.fixture(scope="module")
def full(tiny_fixture, root):
    return reduce_by_hand(tiny_fixture.path, root / "full")


@pytest.fixture(scope="module")
def pruned(tiny_fixture, root):
    return reduce_by_hand(tiny_fixture.path, root / "pruned", **PRUNED)


SMALL = dict(samples=2, seq_len=48, max_new_tokens=4)
SMALL_ARGS = ["--samples", "2", "--seq-len", "48", "--max-new-tokens", "4", "--quiet"]


def run(path, **kw):
    kw = {**SMALL, **kw}
    kw.setdefault("gpu", None)
    kw.setdefault("skip", ("scan",))
    return validate(path, ValidateOptions(**kw))


def independent_kl(src_model, out, ids):
    """KL(source || reduced), top-1 and perplexities with transformers models only."""
    from transformers import AutoModelForCausalLM

    red = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        p = src_model(ids).logits.double().log_softmax(-1)
        q = red(ids).logits.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    tgt = ids[:, 1:].unsqueeze(-1)
    ppl = [math.exp(float(-x[:, :-1].gather(-1, tgt).mean())) for x in (p, q)]
    return float(kl.mean()), float((p.argmax(-1) == q.argmax(-1)).double().mean()), ppl


def test_keeping_everything_gives_kl_zero_and_full_agreement(tiny_fixture, full):
    res = CliRunner().invoke(cli, ["validate", str(full), "--reference", str(tiny_fixture.path), "--gpu", "h100",
                                   "--json", *SMALL_ARGS])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    ref = rep["reference"]
    assert ref["kl_mean"] < 1e-9 and ref["kl_max"] < 1e-8
    assert ref["top1_agreement"] == 1.0
    assert ref["ppl_source"] == pytest.approx(ref["ppl_reduced"], rel=1e-7)
    assert rep["passed"] and rep["memory"]["fits_latent"]
    assert rep["checks"] == ["static", "scan", "memory", "run", "reference"]


def test_pruning_gives_worse_numbers_equal_to_an_independent_computation(tiny_fixture, pruned):
    rep = run(pruned, reference=str(tiny_fixture.path))
    ref = rep.reference
    ids, _ = held_out_ids(Checkpoint.open(pruned), 2, 48)
    kl, top1, (ppl_src, ppl_red) = independent_kl(tiny_fixture.model, pruned, ids)
    assert ref.kl_mean > 1e-3 and ref.top1_agreement < 1.0
    assert ref.kl_mean == pytest.approx(kl, rel=1e-4)
    assert ref.top1_agreement == pytest.approx(top1, abs=1 / ids.numel())
    assert ref.ppl_source == pytest.approx(ppl_src, rel=1e-5) and ref.ppl_reduced == pytest.approx(ppl_red, rel=1e-5)
    assert ref.tokens == ids.numel() == 96
    # --max-kl turns the comparison into a pass/fail check
    strict = run(pruned, reference=str(tiny_fixture.path), max_kl=ref.kl_mean / 2, skip=("scan", "static"))
    assert not strict.passed and [f.check for f in strict.errors()] == ["reference.kl"]


def test_hooks_and_routers_against_transformers(full, tiny_fixture):
    rep = run(full)
    r = rep.run
    assert rep.passed and r.first_nonfinite is None and r.device == "cpu" and r.dtype == "float32"
    assert r.peak_memory_bytes is None and r.load_seconds > 0
    ids, _ = held_out_ids(Checkpoint.open(full), 2, 48)
    with torch.no_grad():
        hs = tiny_fixture.model(ids, output_hidden_states=True).hidden_states
    n = tiny_fixture.config["num_hidden_layers"]
    assert [m.module for m in r.layers] == [f"model.layers.{i}" for i in range(n)]
    for i in range(n - 1):  # the last hidden state is after the final norm
        assert r.layers[i].max_abs == pytest.approx(float(hs[i + 1].abs().max()), rel=1e-5)
    assert [x.layer for x in r.routers] == [1, 2, 3]
    for x in r.routers:
        assert x.indices_in_range and x.tokens == 96 and x.experts == 8
        assert 0 < x.max_load_share <= 1 and x.experts_hit <= 8
    assert r.generated_tokens > 0 and r.generated_text


def test_nan_in_one_expert_is_located(tiny_fixture, root):
    name = "model.layers.2.mlp.experts.3.up_proj.weight"

    def nan(t, c):
        t[name][:, 0] = float("nan")

    out = reduce_by_hand(tiny_fixture.path, root / "nan", mutate=nan)
    res = CliRunner().invoke(cli, ["validate", str(out), "--gpu", "none", "--json", *SMALL_ARGS])
    assert res.exit_code == 1
    rep = json.loads(res.stdout)
    assert rep["run"]["first_nonfinite"] == "model.layers.2.mlp.experts"
    # layer 2's router saw clean inputs and sent tokens to expert 3
    assert rep["run"]["routers"][1]["experts_hit"] == 8
    found = {(f["check"], f["tensor"]) for f in rep["static"]["findings"]}
    assert ("values.nonfinite", name) in found


def test_nan_in_a_norm_names_that_module(tiny_fixture, root):
    out = reduce_by_hand(tiny_fixture.path, root / "nan_norm",
                         mutate=lambda t, c: t["model.layers.1.post_attention_layernorm.weight"].fill_(float("inf")))
    rep = run(out, skip=("scan", "static"))
    assert rep.run.first_nonfinite == "model.layers.1.post_attention_layernorm"
    assert not rep.passed


def test_missing_shared_expert_fails_the_load(tiny_fixture, root):
    key = "model.layers.2.mlp.shared_experts.down_proj.weight"
    out = reduce_by_hand(tiny_fixture.path, root / "noshared", mutate=lambda t, c: t.pop(key))
    rep = run(out)
    assert key in rep.run.missing_keys
    assert {"tensor.missing", "run.missing_keys"} <= {f.check for f in rep.errors()}


def test_fp8_output_passes_close_to_source(aligned_fixture, root):
    """(INT4/INT8 runs are in test_validate_convert.py, on quantized convert outputs.)"""
    fp8 = reduce_by_hand(aligned_fixture.path, root / "fp8", dtype="fp8", layers=[0, 2], experts=[0, 1, 4, 5],
                         partial_bf16=True)
    rep = run(fp8, skip=(), reference=str(aligned_fixture.path))
    assert rep.passed, rep.summary()
    # transformers dequantizes FP8 to BF16 on CPU: close to the source, not equal
    assert rep.run.dtype == "bfloat16" and rep.reference.kl_mean < 0.1


def test_fp8_edge_blocks_fail_to_load_in_transformers(tiny_fixture, root):
    out = reduce_by_hand(tiny_fixture.path, root / "fp8edge", dtype="fp8")
    rep = run(out)
    [load] = [f for f in rep.errors() if f.check == "run.load"]
    assert "transformers could not load" in load.message
    assert any(f.check == "tensor.fp8_edge_block" for f in rep.static.findings)


def test_fp16_is_warned_and_cuda_absent_is_one_line(full):
    rep = run(full, dtype="float16", skip=("scan", "static"))
    assert any(f.check == "run.fp16" and f.severity == "warning" for f in rep.run.findings)
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    res = CliRunner().invoke(cli, ["validate", str(full), "--device", "cuda", "--gpu", "none", "--quiet"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "no CUDA device" in res.stderr
