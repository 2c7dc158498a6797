"""output-error end to end: ``analyze`` writes a greedy elimination order per MoE layer that
equals one recomputed independently with transformers' DeepseekV3 router and experts;
``convert --analysis`` selects by it by default and falls back to REAP, saying so, for an
analysis file that predates it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from k2mini.analysis.analyze import AnalyzeOptions, analyze, output_error_sample
from k2mini.analysis.calibration import build_calibration
from k2mini.analysis.schema import Analysis
from k2mini.analysis.tokenizer import load_tokenizer
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.model.routing import Routing
from k2mini.analysis.output_error import expert_outputs, full_output
from k2mini.selection.plan import Plan

SAMPLES, SEQ, SEED = 3, 16, 3
CAP = 20  # below SAMPLES * SEQ: exercises the token sample


@pytest.fixture(scope="module")
def analysed(tiny_fixture, tmp_path_factory):
    """(path, Analysis) from the CLI with every calibration token, an in-process Analysis on a
    CAP-token sample, and the calibration ids both used."""
    d = tmp_path_factory.mktemp("oe")
    an = d / "analysis.json"
    r = CliRunner().invoke(cli, ["analyze", "-s", str(tiny_fixture.path), "-o", str(an), "--samples", str(SAMPLES),
                                 "--seq-len", str(SEQ), "--seed", str(SEED), "-q", "--no-plots"])
    assert r.exit_code == 0, r.output
    ck = Checkpoint.open(tiny_fixture.path)
    calib = build_calibration(load_tokenizer(ck), samples=SAMPLES, seq_len=SEQ, seed=SEED)
    capped = analyze(ck, calib, AnalyzeOptions(progress=False, output_error_tokens=CAP), work_dir=d / "work")
    return an, Analysis.load(an), capped, calib.input_ids


@torch.no_grad()
def _moe_inputs(model, ids) -> dict[int, torch.Tensor]:
    x = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: x.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return x


@torch.no_grad()
def _greedy_transformers(mlp, x: torch.Tensor) -> list[int]:
    """Greedy backward elimination, every candidate evaluated by transformers' own router
    (a removed expert gets a -1e9 correction bias, so it is never among the top-k) and its
    fused experts module, on every token; ties to the lower id."""
    gate = mlp.gate
    E, k = gate.weight.shape[0], gate.top_k
    bias0 = gate.e_score_correction_bias.clone()

    def routed(removed: set[int]) -> torch.Tensor:
        gate.e_score_correction_bias.copy_(bias0)
        gate.e_score_correction_bias[sorted(removed)] = -1e9
        _, w, idx = gate(x)
        return mlp.experts(x, idx, w).double()

    try:
        full = routed(set())
        removed: set[int] = set()
        order = []
        while E - len(removed) > k:
            alive = [e for e in range(E) if e not in removed]
            err = {c: float((routed(removed | {c}) - full).square().sum()) for c in alive}
            best = min(alive, key=lambda c: (err[c], c))
            removed.add(best)
            order.append(best)
    finally:
        gate.e_score_correction_bias.copy_(bias0)
    return order + sorted(set(range(E)) - removed)


@pytest.fixture(scope="module")
def float_model(tiny_fixture):
    return copy.deepcopy(tiny_fixture.model).float().eval()


def test_analyze_writes_an_order_per_moe_layer(analysed, tiny_fixture):
    _, a, capped, _ = analysed
    E = tiny_fixture.config["n_routed_experts"]
    assert a.output_error_tokens == SAMPLES * SEQ and capped.output_error_tokens == CAP
    assert a.has_output_error()
    for st in a.layers:
        if st.kind == "moe":
            assert sorted(st.experts.output_error_order) == list(range(E))
        else:
            assert st.experts is None
    assert len([s for s in a.layers if s.kind == "moe"]) == tiny_fixture.config["num_hidden_layers"] - 1


def test_order_equals_greedy_with_transformers_router(analysed, float_model):
    _, a, capped, ids = analysed
    xs = _moe_inputs(float_model, ids)
    sample = output_error_sample(SAMPLES * SEQ, CAP, SEED)
    assert len(sample) == CAP and len(set(sample.tolist())) == CAP
    for layer, x in xs.items():
        mlp = float_model.model.layers[layer].mlp
        assert a.layers[layer].experts.output_error_order == _greedy_transformers(mlp, x), f"layer {layer}"
        assert capped.layers[layer].experts.output_error_order == _greedy_transformers(mlp, x[sample]), f"layer {layer} (sample)"


@torch.no_grad()
def test_grouped_reference_output_is_transformers_routing(grouped_fixture):
    """With n_group > 1 the unpruned block output the greedy compares against routes like
    transformers' group-limited router."""
    model = copy.deepcopy(grouped_fixture.model).float()
    mlp = next(l.mlp for l in model.model.layers if hasattr(l.mlp, "gate"))
    g = mlp.gate
    assert g.num_group > 1
    x = torch.randn(50, g.weight.shape[1], generator=torch.Generator().manual_seed(0))
    r = Routing(g.weight, g.e_score_correction_bias, g.top_k, g.norm_topk_prob, g.routed_scaling_factor, g.num_group, g.topk_group)
    got = full_output(x, r, expert_outputs(x, mlp.experts.gate_up_proj, mlp.experts.down_proj))
    torch.testing.assert_close(got, mlp(x[None])[0] - mlp.shared_experts(x[None])[0], rtol=1e-4, atol=1e-5)


def _convert(fx, an, out, *extra):
    return CliRunner().invoke(cli, ["convert", "-s", str(fx.path), "--analysis", str(an), "--layers", "3", "--experts", "3",
                                    "-o", str(out), "--no-progress", *extra])


def test_convert_defaults_to_output_error(analysed, tiny_fixture, tmp_path):
    an, a, _, _ = analysed
    r = _convert(tiny_fixture, an, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "no output-error order" not in r.stderr
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert plan.expert_strategy == "output-error"
    assert plan.experts
    for sel in plan.experts:
        assert sel.kept == sorted(a.layers[sel.source_layer].experts.output_error_order[-3:])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["k2mini"]["expert_strategy"] == "output-error"


def test_older_analysis_falls_back_to_reap_with_one_line(analysed, tiny_fixture, tmp_path):
    an, a, _, _ = analysed
    d = json.loads(an.read_text())
    d.pop("output_error_tokens")
    for st in d["layers"]:
        if st["experts"]:
            st["experts"].pop("output_error_order")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(d))
    r = _convert(tiny_fixture, old, tmp_path / "out")
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if "output-error" in line]
    assert len(notes) == 1 and "REAP" in notes[0] and str(old) in notes[0], r.stderr
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert plan.expert_strategy == "reap"
    for sel in plan.experts:
        reap = a.layers[sel.source_layer].experts.reap
        assert sel.kept == sorted(sorted(range(len(reap)), key=lambda e: (-reap[e], e))[:3])
    # Asking for it explicitly with such a file is one clear error, nothing written.
    r = _convert(tiny_fixture, old, tmp_path / "out2", "--expert-strategy", "output-error")
    assert r.exit_code == 2 and "no output-error order" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out2" / "config.json").exists()
