"""Selectors and plans, checked against selections computed independently in the test from
analysis files the test writes and from the source's raw safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from k2mini.analysis.schema import Analysis, CalibrationInfo, CalibrationSource, ExpertStats, LayerStats, SourceFingerprint
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.convert.presets import load_preset
from k2mini.errors import UsageError
from k2mini.model.spec import ModelSpec
from k2mini.selection.build import build_plan
from k2mini.selection.context import SelectionContext, SelectOptions
from k2mini.selection.experts import pick
from k2mini.selection.layers import uniform
from k2mini.selection.plan import Plan


def make_analysis(ck: Checkpoint, seed: int = 0, angular: dict | None = None) -> Analysis:
    rng = np.random.default_rng(seed)
    spec = ModelSpec.from_config(ck.config)
    E = spec.n_routed_experts
    layers = []
    for l in range(spec.num_hidden_layers):
        ex = None
        if spec.is_moe(l):
            ex = ExpertStats(
                frequency=[int(v) for v in rng.integers(0, 1000, E)], mean_weight=rng.random(E).tolist(),
                reap=rng.random(E).tolist(), ean=rng.random(E).tolist(), max_activation=rng.random(E).tolist(),
            )
        layers.append(LayerStats(layer=l, kind="moe" if ex else "dense", block_influence=float(rng.random()),
                                 hidden_norm=1.0, nll_increase=float(rng.random()), experts=ex))
    return Analysis(
        tool_version="test", source=SourceFingerprint.of(ck),
        calibration=CalibrationInfo(sources=[CalibrationSource(name="builtin:prose", samples=1)], samples=1, seq_len=8, seed=0, tokens=8),
        layers=layers, angular_distance=angular or {},
    )


def top(values, n):
    return sorted(np.argsort(-np.asarray(values), kind="stable")[:n].tolist())


@pytest.mark.parametrize("L,n", [(61, 24), (61, 2), (4, 3), (10, 10), (7, 1)])
def test_uniform_is_rounded_linspace(L, n):
    ctx = SelectionContext(None, ModelSpec.from_config(_cfg(L)), SelectOptions())
    want = [int(math.floor(v + 0.5)) for v in np.linspace(0, L - 1, n)] if n > 1 else [0]
    assert uniform(ctx, n).layers == want


def _cfg(L):
    return {"hidden_size": 8, "intermediate_size": 8, "moe_intermediate_size": 8, "num_hidden_layers": L,
            "num_attention_heads": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "vocab_size": 8,
            "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "first_k_dense_replace": 1}


def test_importance_keeps_ends_and_top_block_influence(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    a = make_analysis(ck)
    bi = [s.block_influence for s in a.layers]
    plan = build_plan(ck, SelectOptions(layers=3, layer_strategy="importance", expert_strategy="reap"), a, "a.json")
    best_middle = max((1, 2), key=lambda l: bi[l])
    assert plan.layers == sorted([0, 3, best_middle])
    assert plan.layer_scores == bi
    for e in plan.experts:
        assert e.kept == list(range(8))  # --experts not given: all kept
    plan = build_plan(ck, SelectOptions(layers=2, layer_strategy="importance", layer_metric="nll_increase", protect_ends=False,
                                        expert_strategy="frequency", experts=3), a, "a.json")
    nll = [s.nll_increase for s in a.layers]
    assert plan.layers == top(nll, 2)
    stats = {s.layer: s.experts for s in a.layers}
    for e in plan.experts:
        assert e.kept == top(stats[e.source_layer].frequency, 3)


@pytest.mark.parametrize("metric", ["reap", "ean", "frequency"])
def test_analysis_expert_metrics(tiny_fixture, metric):
    ck = Checkpoint.open(tiny_fixture.path)
    a = make_analysis(ck, seed=3)
    plan = build_plan(ck, SelectOptions(experts=3, expert_strategy=metric), a, "a.json")
    stats = {s.layer: s.experts for s in a.layers}
    assert [e.source_layer for e in plan.experts] == [1, 2, 3]
    for e in plan.experts:
        assert e.kept == top(getattr(stats[e.source_layer], metric), 3)


def test_contiguous_drops_cheapest_block(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    # d(l, 2) for l = 0..2: block starting at 1 (layers 1, 2) is cheapest.
    a = make_analysis(ck, angular={"2": [0.5, 0.1, 0.3]})
    plan = build_plan(ck, SelectOptions(layers=2, layer_strategy="contiguous", protect_ends=False), a, "a.json")
    assert plan.layers == [0, 3]
    a = make_analysis(ck, angular={"1": [0.5, 0.4, 0.05, 0.3]})
    # Protected: layer 0 (dense) and 3 (last); among blocks {1}, {2} the cheaper is 2.
    assert build_plan(ck, SelectOptions(layers=3, layer_strategy="contiguous"), a, "a.json").layers == [0, 1, 3]


def _ranks(v):
    r = np.empty(len(v))
    r[np.lexsort((np.arange(len(v)), np.asarray(v)))] = np.arange(len(v))
    return r


def test_weights_scorer_from_raw_tensors(tiny_fixture):
    """router row norm, correction bias, and sqrt(sum n_b s_b^2) of the scale grids, ranked and averaged."""
    src = Path(tiny_fixture.path)
    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def raw(name):
        with safe_open(src / idx[name], "np") as f:
            return f.get_tensor(name)  # F32 tensors only (numpy has no bfloat16)

    def raw_pt(name):
        with safe_open(src / idx[name], "pt") as f:
            return f.get_tensor(name).float().numpy()

    ck = Checkpoint.open(src)
    plan = build_plan(ck, SelectOptions(experts=3, expert_strategy="weights"))
    for e in plan.experts:
        p = f"model.layers.{e.source_layer}.mlp"
        router = np.linalg.norm(raw_pt(f"{p}.gate.weight").astype(np.float64), axis=1)
        bias = raw(f"{p}.gate.e_score_correction_bias")
        norm = []
        for x in range(8):
            sq = 0.0
            for proj in ("gate_proj", "up_proj", "down_proj"):
                s = raw(f"{p}.experts.{x}.{proj}.weight_scale_inv").astype(np.float64)
                rows, cols = ck.info(f"{p}.experts.{x}.{proj}.weight").shape
                for i in range(s.shape[0]):
                    for j in range(s.shape[1]):
                        sq += s[i, j] ** 2 * min(128, rows - 128 * i) * min(128, cols - 128 * j)
            norm.append(math.sqrt(sq))
        score = (_ranks(router) + _ranks(bias) + _ranks(norm)) / 3
        np.testing.assert_allclose(e.scores, score)
        assert e.kept == top(score, 3)


def test_pick_per_group():
    scores = [0.1, 0.9, 0.5, 0.4, 0.8, 0.2, 0.3, 0.7]
    assert pick(scores, 4, 2) == [1, 2, 4, 7]  # best two of 0..3, best two of 4..7
    assert pick(scores, 2, 1) == [1, 4]


def test_group_policy(grouped_fixture):
    ck = Checkpoint.open(grouped_fixture.path)  # 8 experts, n_group 4, topk_group 2, top-2
    plan = build_plan(ck, SelectOptions(experts=4))
    assert plan.group_policy == "flatten" and (plan.config.n_group, plan.config.topk_group) == (1, 1)
    assert any("n_group 4 -> 1" in n for n in plan.notes)
    with pytest.raises(UsageError, match="--groups keep"):
        build_plan(ck, SelectOptions(experts=4, groups="keep"))
    plan = build_plan(ck, SelectOptions(experts=8))
    assert plan.group_policy == "per-group" and plan.config.n_group == 4
    # Explicit lists with 2 from each group keep the groups.
    plan = build_plan(ck, SelectOptions(experts=8, expert_strategy="explicit", keep_experts=list(range(8))))
    assert plan.group_policy == "per-group"


def test_plan_roundtrip_and_bad_files(tiny_fixture, tmp_path):
    ck = Checkpoint.open(tiny_fixture.path)
    plan = build_plan(ck, SelectOptions(layers=3, experts=4))
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError, match="--plan .*not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    d = json.loads((tmp_path / "p.json").read_text())
    d["experts"][0]["kept"] = [0, 1, 2, 99]
    (tmp_path / "p2.json").write_text(json.dumps(d))
    with pytest.raises(UsageError, match="expert 99 does not exist"):
        Plan.load(tmp_path / "p2.json").check(ModelSpec.from_config(ck.config))


def test_analysis_from_other_source_refused(tiny_fixture, aligned_fixture):
    a = make_analysis(Checkpoint.open(aligned_fixture.path))
    with pytest.raises(UsageError, match="computed on another checkpoint"):
        build_plan(Checkpoint.open(tiny_fixture.path), SelectOptions(expert_strategy="reap"), a, "a.json")


def test_presets_validate(tmp_path):
    p = load_preset("k2-mini")
    assert (p.layers, p.experts) == (24, 16)
    (tmp_path / "x.json").write_text(json.dumps({"layers": 2, "colour": "red"}))
    with pytest.raises(UsageError, match="not a valid preset"):
        load_preset(str(tmp_path / "x.json"))


def convert_3x4(fixture, tmp_path, a: Analysis) -> tuple[Plan, Path]:
    """`k2mini convert --analysis a --layers 3 --experts 4` with every strategy left to its default."""
    a.save(tmp_path / "analysis.json")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", "-s", str(fixture.path), "--analysis", str(tmp_path / "analysis.json"),
                                   "--layers", "3", "--experts", "4", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    return Plan.load(out / "plan.json"), out


def test_convert_with_analysis_end_to_end(tiny_fixture, tmp_path):
    a = make_analysis(Checkpoint.open(tiny_fixture.path), seed=5)
    plan, out = convert_3x4(tiny_fixture, tmp_path, a)
    assert (plan.layer_strategy, plan.expert_strategy) == ("importance", "reap")
    stats = {s.layer: s.experts for s in a.layers}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["k2mini"]["expert_map"] == {str(plan.layers.index(l)): top(stats[l].reap, 4) for l in plan.layers if l >= 1}


@pytest.mark.parametrize("with_nll", [True, False])
def test_convert_layer_default_follows_the_study(tiny_fixture, tmp_path, with_nll):
    """With --analysis and no --layer-strategy: skip-layer NLL ranks layers when analyzed, else uniform
    (block influence lost to both in the nano K2 study)."""
    ck = Checkpoint.open(tiny_fixture.path)
    a = make_analysis(ck, seed=0)
    L = ck.config["num_hidden_layers"]
    middle = max(range(1, L - 1), key=lambda l: a.layers[l].nll_increase)
    assert middle != max(range(1, L - 1), key=lambda l: a.layers[l].block_influence)  # the two rankings disagree
    if not with_nll:
        for s in a.layers:
            s.nll_increase = None
    plan, _ = convert_3x4(tiny_fixture, tmp_path, a)
    if with_nll:
        # layer 0 (dense) and the last layer are protected; the third is the highest NLL increase among the rest
        assert (plan.layer_strategy, plan.layers) == ("importance", sorted([0, middle, L - 1]))
    else:
        want = [int(math.floor(v + 0.5)) for v in np.linspace(0, L - 1, 3)]
        assert (plan.layer_strategy, plan.layers) == ("uniform", want)
