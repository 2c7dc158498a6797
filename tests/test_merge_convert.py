"""convert --merge: each pruned expert folded into its most router-similar kept expert,
checked against references computed here from the source (Checkpoint.read, the raw
safetensors headers) and against plain convert's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from k2mini.analysis.schema import Analysis, CalibrationInfo, CalibrationSource, ExpertStats, LayerStats, SourceFingerprint
from k2mini.checkpoint import fp8
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from convert_cli import convert, load

N_EXPERTS, KEEP = 8, 4
PROJS = ("gate_proj", "up_proj", "down_proj")


def write_analysis(src: Path, path: Path) -> Analysis:
    """An analysis with chosen frequencies (one expert per layer never routed)."""
    ck = Checkpoint.open(src)
    rng = np.random.default_rng(7)
    layers = []
    for l in range(ck.config["num_hidden_layers"]):
        moe = l >= ck.config["first_k_dense_replace"]
        freq = [int(v) for v in rng.integers(0, 500, N_EXPERTS)] if moe else None
        if moe:
            freq[l % N_EXPERTS] = 0
        ex = ExpertStats(frequency=freq, mean_weight=[0.5] * N_EXPERTS, reap=rng.random(N_EXPERTS).tolist(),
                         ean=[1.0] * N_EXPERTS, max_activation=[1.0] * N_EXPERTS) if moe else None
        layers.append(LayerStats(layer=l, kind="moe" if moe else "dense", block_influence=0.5, hidden_norm=1.0, experts=ex))
    a = Analysis(tool_version="test", source=SourceFingerprint.of(ck), layers=layers,
                 calibration=CalibrationInfo(sources=[CalibrationSource(name="builtin:prose", samples=1)], samples=1, seq_len=8, seed=0, tokens=8))
    a.save(path)
    return a


@pytest.fixture(scope="module")
def setup(tiny_fixture, tmp_path_factory):
    """Plain and merged outputs of the tiny fixture from the same analysis."""
    d = tmp_path_factory.mktemp("merge")
    a = write_analysis(tiny_fixture.path, d / "a.json")
    args = ["--analysis", d / "a.json", "--expert-strategy", "reap", "--experts", KEEP, "--max-shard-size", "1MB"]
    plain = convert("convert", tiny_fixture.path, d / "plain", *args)
    merged = convert("convert", tiny_fixture.path, d / "merged", *args, "--merge")
    return d, a, args, plain, merged


def tensors(out: Path) -> dict[str, torch.Tensor]:
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as so:
            got.update({k: so.get_tensor(k) for k in so.keys()})
    return got


def expected_groups(ck: Checkpoint, a: Analysis, layer: int, kept: list[int]) -> dict[int, list[tuple[int, float]]]:
    """Router-row cosine argmax over the kept experts; weights (f + 1) / sum(f + 1)."""
    w = ck.read(f"model.layers.{layer}.mlp.gate.weight").double().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    sim = w @ w.T
    groups = {k: [k] for k in kept}
    for e in range(N_EXPERTS):
        if e not in kept:
            groups[kept[int(np.argmax(sim[e, kept]))]].append(e)
    freq = a.layers[layer].experts.frequency
    return {k: [(m, (freq[m] + 1) / sum(freq[x] + 1 for x in g)) for m in g] for k, g in groups.items()}


def test_merged_experts_are_frequency_weighted_sums(tiny_fixture, setup):
    d, a, _, _, _ = setup
    ck = Checkpoint.open(tiny_fixture.path)
    plan = json.loads((d / "merged" / "plan.json").read_text())
    assert plan["merge_similarity"] == "router"
    out = tensors(d / "merged")
    n_merged = 0
    for new_l, sel in enumerate(plan["experts"], start=ck.config["first_k_dense_replace"]):
        layer, kept = sel["source_layer"], sel["kept"]
        want = expected_groups(ck, a, layer, kept)
        assert [[(m, pytest.approx(w, rel=1e-12)) for m, w in want[k]] for k in kept] == [[tuple(p) for p in g] for g in sel["merge"]]
        for i, k in enumerate(kept):
            for proj in PROJS:
                ref = sum(ck.read(f"model.layers.{layer}.mlp.experts.{m}.{proj}.weight").double() * w for m, w in want[k])
                got = out[f"model.layers.{new_l}.mlp.experts.{i}.{proj}.weight"]
                assert got.dtype == torch.bfloat16
                # float32 accumulation (error ~1e-7 of the terms) then one rounding to BF16.
                torch.testing.assert_close(got.double(), ref, rtol=2**-8, atol=1e-6 * float(ref.abs().max()))
                if 1 - want[k][0][1] > 0.05:  # folded experts weigh enough to tell the sum from the kept expert
                    n_merged += 1
                    own = ck.read(f"model.layers.{layer}.mlp.experts.{k}.{proj}.weight").double()
                    assert (got.double() - ref).norm() < 0.1 * (own - ref).norm()
    assert n_merged >= 3 * 3


def test_unmerged_tensors_byte_equal_plain_convert(setup):
    d, _, _, plain, merged = setup
    plan = json.loads((d / "merged" / "plan.json").read_text())
    plain_plan = json.loads((d / "plain" / "plan.json").read_text())
    assert [e["kept"] for e in plan["experts"]] == [e["kept"] for e in plain_plan["experts"]]
    assert plain_plan["merge_similarity"] is None and all(e["merge"] is None for e in plain_plan["experts"])
    merged_names = set()
    for new_l, sel in enumerate(plan["experts"], start=1):
        for i, g in enumerate(sel["merge"]):
            if len(g) > 1:
                merged_names |= {f"model.layers.{new_l}.mlp.experts.{i}.{p}.weight" for p in PROJS}
    p, m = tensors(d / "plain"), tensors(d / "merged")
    assert p.keys() == m.keys()
    same = [n for n in p if n not in merged_names]
    assert len(same) > len(merged_names)
    for n in same:
        assert p[n].dtype == m[n].dtype and torch.equal(p[n].view(torch.uint8), m[n].view(torch.uint8)), n
    assert merged["total_size"] == plain["total_size"] and merged["params"] == plain["params"]


def test_merged_output_loads_in_transformers(setup):
    d = setup[0]
    model = load(d / "merged")
    cfg = json.loads((d / "merged" / "config.json").read_text())
    assert cfg["n_routed_experts"] == KEEP and cfg["k2mini"]["merge"] == "router"
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([[1, 7, 42, 99, 3, 250, 17, 8]])).logits
    assert torch.isfinite(logits).all()
    card = (d / "merged" / "README.md").read_text()
    assert "Merged experts (`--merge router`)" in card


def _header_bytes(src: Path) -> dict[str, int]:
    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    sizes = {}
    for name, f in idx.items():
        with safe_open(src / f, "pt") as so:
            sl = so.get_slice(name)
            sizes[name] = int(np.prod(sl.get_shape())) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[sl.get_dtype()]
    return sizes


def test_reads_each_merged_source_once(tiny_fixture, setup):
    """Needed: every tensor of the kept layers, every expert (kept or folded in) with its scale
    grid, the kept router rows; from the raw headers."""
    d, _, _, _, merged = setup
    sizes = _header_bytes(tiny_fixture.path)
    need = 0
    for name, n in sizes.items():
        if "inv_freq" in name or (name.startswith("model.layers.") and int(name.split(".")[2]) >= tiny_fixture.config["num_hidden_layers"]):
            continue
        need += n // N_EXPERTS * KEEP if ".mlp.gate.weight" in name or "e_score_correction_bias" in name else n
    assert merged["selected_source_bytes"] == need
    assert need <= merged["tensor_bytes_read"] <= 1.05 * need


def test_fp8_output_requantizes_merged_experts(aligned_fixture, tmp_path):
    """Aligned shapes, so experts stay FP8 in an fp8 output: merged ones are block-quantized
    from the merged weight, the others keep the source's bytes; transformers loads it."""
    write_analysis(aligned_fixture.path, tmp_path / "a.json")
    args = ["--analysis", tmp_path / "a.json", "--expert-strategy", "reap", "--experts", KEEP, "--merge"]
    convert("convert", aligned_fixture.path, tmp_path / "fp8", *args, "--dtype", "fp8")
    convert("convert", aligned_fixture.path, tmp_path / "bf16", *args)
    plan = json.loads((tmp_path / "fp8" / "plan.json").read_text())
    q, bf, src = tensors(tmp_path / "fp8"), tensors(tmp_path / "bf16"), tensors(aligned_fixture.path)
    seen = {1: 0, 2: 0}
    for new_l, sel in enumerate(plan["experts"], start=aligned_fixture.config["first_k_dense_replace"]):
        for i, (k, g) in enumerate(zip(sel["kept"], sel["merge"])):
            for proj in PROJS:
                name = f"model.layers.{new_l}.mlp.experts.{i}.{proj}.weight"
                w, s = q[name], q[name + "_scale_inv"]
                assert w.dtype == torch.float8_e4m3fn
                if len(g) == 1:  # copied from the source untouched
                    s_name = f"model.layers.{sel['source_layer']}.mlp.experts.{k}.{proj}.weight"
                    assert torch.equal(w.view(torch.uint8), src[s_name].view(torch.uint8))
                    assert torch.equal(s, src[s_name + "_scale_inv"])
                else:  # block FP8 of the merged weight: e4m3 keeps 3 mantissa bits
                    ref = bf[name].float()
                    err = (fp8.dequantize(w, s).float() - ref).abs().max()
                    assert 0 < err <= 2**-4 * ref.abs().max()
                seen[min(len(g), 2)] += 1
    assert seen[1] and seen[2]
    model = load(tmp_path / "fp8", None)  # None: the checkpoint's own dtypes, transformers' default
    with torch.no_grad():
        assert torch.isfinite(model.eval()(input_ids=torch.tensor([[1, 7, 42, 99]])).logits).all()


class Crash(Exception):
    pass


def test_rerun_and_resume_byte_identical(tiny_fixture, setup, tmp_path, monkeypatch):
    """A run that dies mid-way (after some shards) resumes into the same bytes as a clean run;
    the fingerprint covers the merge groups, so finished shards are re-used, not recomputed."""
    from k2mini.convert import transforms as T

    d, _, args, _, _ = setup
    args = [*map(str, args), "--merge", "--max-shard-size", "300KB"]
    again = tmp_path / "again"
    convert("convert", tiny_fixture.path, again, *args)
    want = {p.name: p.read_bytes() for p in sorted(again.iterdir())}
    assert len(list(again.glob("*.safetensors"))) >= 3
    orig, n = T.Bf16Transform.produce, [0]

    def produce(self, ck, job):
        n[0] += 1
        if n[0] == 60:
            raise Crash
        return orig(self, ck, job)

    monkeypatch.setattr(T.Bf16Transform, "produce", produce)
    c = tmp_path / "c"
    res = CliRunner().invoke(cli, ["convert", "-s", str(tiny_fixture.path), "-o", str(c), "--no-progress", *args])
    assert isinstance(res.exception, Crash)
    assert not c.exists() and list((tmp_path / ".c.k2mini-partial").glob("model-*.safetensors"))
    monkeypatch.setattr(T.Bf16Transform, "produce", orig)
    s = convert("convert", tiny_fixture.path, c, *args, "--resume")
    assert s["reused_shards"] >= 1
    assert {p.name: p.read_bytes() for p in sorted(c.iterdir())} == want
    # The setup's run (1MB shards) merged the same weights: same tensors, other layout.
    first = tensors(d / "merged")
    assert tensors(again).keys() == first.keys()
    assert all(torch.equal(t.view(torch.uint8), first[n].view(torch.uint8)) for n, t in tensors(again).items())


def _bad(args, match, out):
    res = CliRunner().invoke(cli, [*map(str, args), "-o", str(out)])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("k2mini: error:") and match in err, err
    assert not out.exists()


def test_bad_merge_input(tiny_fixture, setup, tmp_path):
    d = setup[0]
    src = tiny_fixture.path
    _bad(["convert", "-s", src, "--experts", KEEP, "--merge"], "--merge needs --analysis", tmp_path / "o1")
    _bad(["convert", "-s", src, "--plan", d / "merged" / "plan.json", "--merge"], "--merge", tmp_path / "o2")
    plan = json.loads((d / "merged" / "plan.json").read_text())
    g = plan["experts"][0]["merge"]
    g[0][0][1] += 0.5  # weights no longer sum to 1
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    _bad(["convert", "-s", src, "--plan", tmp_path / "bad.json"], "sum to", tmp_path / "o3")
    # A good plan replays: same bytes as the run that wrote it.
    convert("convert", src, tmp_path / "replay", "--plan", d / "merged" / "plan.json", "--max-shard-size", "1MB")
    assert tensors(tmp_path / "replay").keys() == tensors(d / "merged").keys()
    assert (tmp_path / "replay" / "plan.json").read_bytes() == (d / "merged" / "plan.json").read_bytes()
