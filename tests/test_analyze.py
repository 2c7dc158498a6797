"""``analyze`` metrics recomputed independently from transformers' model on the same weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from k2mini.analysis.analyze import STATE_FILE, AnalyzeOptions, analyze
from k2mini.analysis.calibration import build_calibration
from k2mini.analysis.schema import Analysis
from k2mini.analysis.tokenizer import load_tokenizer
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.model.layerwise import LayerwiseRunner

SAMPLES, SEQ = 4, 24
NLL_SAMPLES = 2


@pytest.fixture(scope="module")
def run(tiny_fixture, tmp_path_factory):
    ck = Checkpoint.open(tiny_fixture.path)
    calib = build_calibration(load_tokenizer(ck), samples=SAMPLES, seq_len=SEQ, seed=1)
    opts = AnalyzeOptions(nll=True, nll_samples=NLL_SAMPLES, weight_norms=True, progress=False)
    a = analyze(ck, calib, opts, work_dir=tmp_path_factory.mktemp("work") / "w")
    path = tmp_path_factory.mktemp("out") / "analysis.json"
    a.save(path)
    return Analysis.load(path), calib.input_ids


def _capture(model, ids):
    """Per layer: input, output, the MoE input x and transformers' router (weights, idx)."""
    cap: dict = {"in": {}, "out": {}, "x": {}, "route": {}}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def keep(m, a, kw, o, i=i):
            cap["in"][i] = a[0] if a else kw["hidden_states"]
            cap["out"][i] = o

        hooks.append(layer.register_forward_hook(keep, with_kwargs=True))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: cap["x"].__setitem__(i, a[0])))
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: cap["route"].__setitem__(i, (o[1], o[2]))))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return cap


def test_expert_metrics_match_brute_force(run, tiny_fixture):
    """REAP, EAN, frequency, mean weight and max activation of one MoE layer, recomputed token
    by token from the captured layer input, transformers' router and the expert weights."""
    a, ids = run
    model = tiny_fixture.model
    layer = 2
    cap = _capture(model, ids)
    x = cap["x"][layer].reshape(-1, model.config.hidden_size).double()
    weights, idx = cap["route"][layer]
    experts = model.model.layers[layer].mlp.experts
    n_exp = model.config.n_routed_experts
    inter = model.config.moe_intermediate_size
    freq, wsum, reap, ean, peak = [0] * n_exp, [0.0] * n_exp, [0.0] * n_exp, [0.0] * n_exp, [0.0] * n_exp
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e, g = int(idx[t, k]), float(weights[t, k])
            gu = experts.gate_up_proj[e].double()
            h = torch.nn.functional.silu(gu[:inter] @ x[t]) * (gu[inter:] @ x[t])
            f = experts.down_proj[e].double() @ h
            freq[e] += 1
            wsum[e] += g
            reap[e] += g * f.norm().item()
            ean[e] += f.norm().item()
            peak[e] = max(peak[e], f.abs().max().item())
    got = a.layers[layer].experts
    assert got.frequency == freq and sum(freq) == SAMPLES * SEQ * model.config.num_experts_per_tok
    for e in range(n_exp):
        n = max(freq[e], 1)
        assert got.mean_weight[e] == pytest.approx(wsum[e] / n, rel=1e-5, abs=1e-9)
        assert got.reap[e] == pytest.approx(reap[e] / n, rel=1e-4, abs=1e-9)
        assert got.ean[e] == pytest.approx(ean[e], rel=1e-4)
        assert got.max_activation[e] == pytest.approx(peak[e], rel=1e-4, abs=1e-9)
    # Weight-only proxies straight from the weights.
    gate = model.model.layers[layer].mlp.gate
    assert got.router_norm == pytest.approx(gate.weight.double().norm(dim=-1).tolist(), rel=1e-5)
    assert got.correction_bias == pytest.approx(gate.e_score_correction_bias.tolist(), rel=1e-6)
    wn = [math.sqrt(experts.gate_up_proj[e].double().pow(2).sum().item() + experts.down_proj[e].double().pow(2).sum().item())
          for e in range(n_exp)]
    assert got.weight_norm == pytest.approx(wn, rel=1e-5)


def test_layer_metrics_match_transformers_states(run, tiny_fixture):
    a, ids = run
    cap = _capture(tiny_fixture.model, ids)
    n = tiny_fixture.config["num_hidden_layers"]
    bounds = [cap["in"][0]] + [cap["out"][i] for i in range(n)]
    for i in range(n):
        cos = torch.nn.functional.cosine_similarity(bounds[i].double(), bounds[i + 1].double(), dim=-1)
        assert a.layers[i].block_influence == pytest.approx(1 - cos.mean().item(), rel=1e-4)
        assert a.layers[i].hidden_norm == pytest.approx(bounds[i + 1].double().norm(dim=-1).mean().item(), rel=1e-5)
        assert a.layers[i].kind == ("dense" if i < tiny_fixture.config["first_k_dense_replace"] else "moe")
    assert sorted(a.angular_distance, key=int) == [str(k) for k in range(1, n)]
    for k in range(1, n):
        assert len(a.angular_distance[str(k)]) == n - k + 1
        for l in range(n - k + 1):
            cos = torch.nn.functional.cosine_similarity(bounds[l][:, -1].double(), bounds[l + k][:, -1].double(), dim=-1)
            assert a.angular_distance[str(k)][l] == pytest.approx((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item(), rel=1e-4, abs=1e-6)


def test_skip_layer_nll_matches_transformers(run, tiny_fixture):
    """NLL increase when layer l is skipped = transformers' loss with that layer made identity."""
    a, ids = run
    model = tiny_fixture.model
    sub = ids[:NLL_SAMPLES]

    def nll(skip=None):
        hooks = []
        if skip is not None:
            hooks.append(model.model.layers[skip].register_forward_hook(
                lambda m, args, kw, o: args[0] if args else kw["hidden_states"], with_kwargs=True))
        try:
            with torch.no_grad():
                return model(sub, labels=sub, use_cache=False).loss.item()
        finally:
            for h in hooks:
                h.remove()

    base = nll()
    assert a.baseline_nll == pytest.approx(base, rel=1e-5)
    for st in a.layers:
        assert st.nll_increase == pytest.approx(nll(st.layer) - base, abs=1e-4)
    assert any(abs(st.nll_increase) > 1e-3 for st in a.layers)


def test_resume_continues_after_the_last_finished_layer(tiny_fixture, tmp_path, monkeypatch):
    ck = Checkpoint.open(tiny_fixture.path)
    calib = build_calibration(load_tokenizer(ck), samples=2, seq_len=16, seed=5)
    opts = AnalyzeOptions(nll=True, nll_samples=1, progress=False)
    clean = analyze(ck, calib, opts, work_dir=tmp_path / "clean")

    work = tmp_path / "w"
    done: list[int] = []
    orig = LayerwiseRunner.run_layer

    def crash_at_2(self, layer, *args, **kw):
        if layer == 2:
            raise KeyboardInterrupt
        done.append(layer)
        return orig(self, layer, *args, **kw)

    monkeypatch.setattr(LayerwiseRunner, "run_layer", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        analyze(ck, calib, opts, work_dir=work)
    monkeypatch.setattr(LayerwiseRunner, "run_layer", lambda self, layer, *a, **k: (done.append(layer), orig(self, layer, *a, **k))[1])
    other = build_calibration(load_tokenizer(ck), samples=2, seq_len=16, seed=6)
    with pytest.raises(Exception, match="other calibration"):
        analyze(ck, other, opts, work_dir=work, resume=True)
    resumed = analyze(ck, calib, opts, work_dir=work, resume=True)
    assert done == [0, 1, 2, 3]  # layers 0 and 1 were not run again
    assert resumed.model_dump() == clean.model_dump()
    # analyze() keeps its state: the command deletes it only after analysis.json is renamed
    # into place, so a kill in between can still resume.
    assert (work / STATE_FILE).is_file()


def test_calibration_sources_mix_and_determinism(tiny_fixture, tmp_path):
    tok = load_tokenizer(Checkpoint.open(tiny_fixture.path))
    a = build_calibration(tok, ["builtin"], samples=5, seq_len=32, seed=0)
    assert a.input_ids.shape == (5, 32)
    assert [(s.name, s.samples) for s in a.info.sources] == [("builtin:prose", 3), ("builtin:code", 2)]
    assert torch.equal(a.input_ids, build_calibration(tok, ["builtin"], samples=5, seq_len=32, seed=0).input_ids)
    assert not torch.equal(a.input_ids, build_calibration(tok, ["builtin"], samples=5, seq_len=32, seed=1).input_ids)
    text = "alpha beta gamma delta. " * 40
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": "zeta eta theta " * 30, "n": i}) for i in range(3)))
    b = build_calibration(tok, [f"mine={tmp_path / 't.txt'}", f"{tmp_path / 'd.jsonl'}:body"], samples=2, seq_len=16)
    assert [s.name for s in b.info.sources] == ["mine", f"{tmp_path / 'd.jsonl'}:body"]
    assert tok.tok.decode(b.input_ids[0].tolist()) in text
    assert "theta" in tok.tok.decode(b.input_ids[1].tolist())


def test_cli_end_to_end_and_bad_input(tiny_fixture, tmp_path):
    runner = CliRunner()
    out = tmp_path / "a" / "analysis.json"
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x * 2\n" * 20}) + "\n")
    r = runner.invoke(cli, ["analyze", "-s", str(tiny_fixture.path), "-o", str(out), "--samples", "2", "--seq-len", "16",
                            "--calib", "prose=builtin:prose", "--calib", f"code={tmp_path / 'c.jsonl'}", "-q"])
    assert r.exit_code == 0, r.output
    a = Analysis.load(out)
    assert [s.name for s in a.calibration.sources] == ["prose", "code"]
    assert a.source.num_hidden_layers == 4 and a.calibration.tokens == 32
    assert "block_infl" in r.output
    png = out.parent / "analysis.layers.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and (out.parent / "analysis.experts.png").is_file()
    r = runner.invoke(cli, ["analyze", "-s", str(tiny_fixture.path), "-o", str(tmp_path / "j.json"), "--samples", "2",
                            "--seq-len", "8", "--json", "-q", "--no-plots"])
    assert r.exit_code == 0 and json.loads(r.stdout)["calibration"]["tokens"] == 16

    bad = [
        (["--calib", str(tmp_path / "missing.txt")], "missing.txt: file not found"),
        (["--calib", f"{tmp_path / 'c.jsonl'}:nope"], "no string field 'nope'"),
        (["--calib", f"{tmp_path / 'c.jsonl'}", "--seq-len", "100000"], "need 200000"),
        (["--memory-budget", "lots"], "--memory-budget"),
    ]
    for extra, msg in bad:
        dest = tmp_path / "bad.json"
        r = runner.invoke(cli, ["analyze", "-s", str(tiny_fixture.path), "-o", str(dest), "--samples", "2", "-q", *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert msg in r.output and len(r.output.strip().splitlines()) == 1
        assert not dest.exists()


def test_tiktoken_source_without_tiktoken_is_one_clear_error(tiny_fixture, tmp_path, monkeypatch):
    """A K2-style source (tiktoken.model + tokenization_kimi.py, no tokenizer.json) without the
    tiktoken package: one clear error; the remote code file (which raises if imported) is not run."""
    import builtins
    import shutil

    from k2mini.errors import UsageError

    src = tmp_path / "k2"
    shutil.copytree(tiny_fixture.path, src)
    (src / "tokenizer.json").unlink()
    (src / "tiktoken.model").write_text("YQ== 0\nYg== 1\n")
    real_import = builtins.__import__

    def no_tiktoken(name, *a, **k):
        if name == "tiktoken":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tiktoken)
    with pytest.raises(UsageError, match="tiktoken.model needs the tiktoken package"):
        load_tokenizer(Checkpoint.open(src))


def test_analyze_then_convert_at_two_ratios_loads_in_transformers(tiny_fixture, tmp_path):
    """One analysis.json, two reduced checkpoints (3 layers x 4 experts, 2 x 2), both load in
    transformers with nothing missing or unexpected, keep what the analysis ranks highest, and run."""
    from transformers import DeepseekV3ForCausalLM

    runner = CliRunner()
    an = tmp_path / "analysis.json"
    r = runner.invoke(cli, ["analyze", "-s", str(tiny_fixture.path), "-o", str(an), "--samples", "2", "--seq-len", "16",
                            "--nll", "--nll-samples", "1", "-q", "--no-plots"])
    assert r.exit_code == 0, r.output
    a = Analysis.load(an)
    ids = torch.tensor([[3, 17, 250, 9, 41, 7]])
    for layers, experts in ((3, 4), (2, 2)):
        out = tmp_path / f"k2-{layers}x{experts}"
        r = runner.invoke(cli, ["convert", "-s", str(tiny_fixture.path), "--analysis", str(an), "--layers", str(layers),
                                "--experts", str(experts), "-o", str(out), "--no-progress"])
        assert r.exit_code == 0, r.output
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["num_hidden_layers"] == layers and cfg["n_routed_experts"] == experts
        model, info = DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 6, tiny_fixture.config["vocab_size"]) and torch.isfinite(logits).all()
        # With an analysis the default expert strategy is output-error: every kept MoE layer
        # keeps the last experts of its elimination order (expert_map is keyed by output layer index).
        prov = cfg["k2mini"]
        assert prov["expert_strategy"] == "output-error" and prov["expert_map"]
        for out_layer, kept in prov["expert_map"].items():
            order = a.layers[prov["source_layers"][int(out_layer)]].experts.output_error_order
            assert sorted(kept) == sorted(order[-experts:])
