"""convert / convert-fast must-shows: outputs load in transformers without remote code,
keep exactly the source's computation, read only what they write, survive a kill, are
reproducible byte for byte, and refuse bad input with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.model.hf import hf_config
from k2mini.testing import build_fixture
from convert_cli import convert, load, run_cli


@pytest.fixture(scope="module")
def aligned_grouped(tmp_path_factory):
    """n_group 4 / topk_group 2 with 16 experts and every dim a multiple of 128 (FP8 loads in transformers)."""
    return build_fixture(tmp_path_factory.mktemp("ag") / "src", "aligned", keep_model=True,
                         n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2)




IDS = torch.tensor([[1, 7, 42, 99, 3, 250, 17, 8]])


def files_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --- loads in transformers ------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["convert", "convert-fast"])
@pytest.mark.parametrize("fx_name", ["tiny_fixture", "grouped_fixture"])
def test_bf16_output_loads_without_remote_code(request, tmp_path, cmd, fx_name):
    fx = request.getfixturevalue(fx_name)
    out = tmp_path / "out"
    s = convert(cmd, fx.path, out, "--layers", 2, "--experts", 4, "--max-shard-size", "200KB")
    assert s["shards"] >= 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and "auto_map" not in cfg and "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 2 and cfg["n_routed_experts"] == 4 and cfg["num_nextn_predict_layers"] == 0
    assert cfg["n_routed_experts"] % cfg["n_group"] == 0
    assert not list(out.glob("*.py"))  # the remote-code files stay behind
    assert (out / "tokenizer.json").read_bytes() == (fx.path / "tokenizer.json").read_bytes()
    model = load(out)
    assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("fx_name", ["aligned_fixture", "aligned_grouped"])
def test_fp8_output_loads_and_keeps_bytes(request, tmp_path, fx_name):
    fx = request.getfixturevalue(fx_name)
    out = tmp_path / "out"
    experts = 8 if fx_name == "aligned_grouped" else 2
    s = convert("convert-fast", fx.path, out, "--experts", experts, "--dtype", "fp8")
    cfg = json.loads((out / "config.json").read_text())
    qc = dict(cfg["quantization_config"])
    # kv_b_proj is [256, 64] here (kv_lora_rank 64): not whole 128x128 blocks, so stored BF16 (test_convert_fp8_load.py)
    assert qc.pop("modules_to_not_convert") == qc.pop("ignored_layers") == [
        f"model.layers.{i}.self_attn.kv_b_proj" for i in range(cfg["num_hidden_layers"])] + ["lm_head"]
    assert qc == fx.config["quantization_config"]
    if fx_name == "aligned_grouped":
        assert s["group_policy"] == "per-group" and (cfg["n_group"], cfg["topk_group"]) == (4, 2)
    model = load(out, dtype=torch.bfloat16)  # transformers dequantizes FP8 on CPU
    assert torch.isfinite(model(IDS).logits.float()).all()


# --- exactness ------------------------------------------------------------------------


def test_all_kept_logits_equal_source(tiny_fixture, tmp_path):
    out = tmp_path / "out"
    convert("convert", tiny_fixture.path, out)
    model = load(out)
    # The fixture's model holds exactly the dequantized source weights (float32).
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, tiny_fixture.model.float()(IDS).logits)


def reference_moe(ck: Checkpoint, layer: int, kept: list[int], cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """docs/facts.md §2 with the kept experts only, from the source weights (independent of transformers)."""
    p = f"model.layers.{layer}.mlp"
    W = lambda n: ck.read(n).float()  # noqa: E731
    gate = W(f"{p}.gate.weight")[kept]
    bias = W(f"{p}.gate.e_score_correction_bias")[kept]
    scores = torch.sigmoid(x @ gate.T)
    choice = scores + bias
    G, TG = cfg["n_group"], cfg["topk_group"]
    if G > 1:
        grp = choice.view(len(x), G, -1).topk(2, dim=-1).values.sum(-1)
        keep_g = torch.zeros_like(grp, dtype=torch.bool).scatter_(1, grp.topk(TG, dim=-1).indices, True)
        choice = choice.masked_fill(~keep_g.repeat_interleave(len(kept) // G, dim=1), float("-inf"))
    idx = choice.topk(cfg["num_experts_per_tok"], dim=-1).indices
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * cfg["routed_scaling_factor"]

    def mlp(prefix):
        g, u, d = (W(f"{prefix}.{n}_proj.weight") for n in ("gate", "up", "down"))
        return lambda h: (torch.nn.functional.silu(h @ g.T) * (h @ u.T)) @ d.T

    experts = [mlp(f"{p}.experts.{e}") for e in kept]
    y = mlp(f"{p}.shared_experts")(x)
    for t in range(len(x)):
        for k in range(idx.shape[1]):
            y[t] += w[t, k] * experts[idx[t, k]](x[t : t + 1])[0]
    return y


@pytest.mark.parametrize("fx_name,experts", [("tiny_fixture", "0,2,5,7"), ("aligned_grouped", "0,3,4,7,9,10,12,15")])
def test_pruned_moe_matches_independent_routing(request, tmp_path, fx_name, experts):
    fx = request.getfixturevalue(fx_name)
    out = tmp_path / "out"
    s = convert("convert", fx.path, out, "--keep-experts", experts)
    kept = [int(e) for e in experts.split(",")]
    cfg = json.loads((out / "config.json").read_text())
    if fx_name == "aligned_grouped":
        assert s["group_policy"] == "per-group" and cfg["n_group"] == 4
    model = load(out)
    ck = Checkpoint.open(fx.path)
    layer = ck.config["num_hidden_layers"] - 1
    x = torch.randn(32, cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.model.layers[layer].mlp(x[None])[0]
    want = reference_moe(ck, layer, kept, cfg, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # ...and pruning really changed the layer: the source model's full MoE differs.
    with torch.no_grad():
        full = fx.model.float().model.layers[layer].mlp(x[None])[0]
    assert not torch.allclose(full, got, atol=1e-3)


# --- reads only what it writes --------------------------------------------------------


def independent_selected_bytes(src: Path, layers: list[int], kept: list[int], n_experts: int) -> int:
    """From the raw safetensors headers: kept layers' tensors, kept experts, kept router rows."""
    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    total = 0
    for name, f in idx.items():
        with safe_open(src / f, "pt") as so:
            sl = so.get_slice(name)
            n = sl.get_shape()
            nbytes = int(torch.tensor(n).prod().item() if n else 1) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[sl.get_dtype()]
        parts = name.split(".")
        if "inv_freq" in name:
            continue
        if name.startswith("model.layers."):
            if int(parts[2]) not in layers:
                continue
            if parts[4] == "experts" and int(parts[5]) not in kept:
                continue
            if parts[4] == "gate":
                nbytes = nbytes // n_experts * len(kept)
        total += nbytes
    return total


def test_reads_only_selected_bytes(tiny_fixture, tmp_path):
    layers, kept = [0, 1, 3], [2, 3, 6]
    s = convert("convert", tiny_fixture.path, tmp_path / "out", "--keep-layers", "0,1,3", "--keep-experts", "2,3,6")
    selected = independent_selected_bytes(tiny_fixture.path, layers, kept, 8)
    assert s["selected_source_bytes"] == selected
    assert s["tensor_bytes_read"] <= 1.05 * selected
    # The rest is fixed cost: config, index, shard headers, tokenizer files.
    fixed = sum((tiny_fixture.path / f).stat().st_size for f in ("config.json", "model.safetensors.index.json", "tokenizer.json",
                                                                  "tokenizer_config.json", "generation_config.json"))
    assert s["bytes_read"] - s["tensor_bytes_read"] <= 3 * fixed + 3 * 65536


# --- determinism, kill, resume ----------------------------------------------------------


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from k2mini.convert import transforms as T
    orig, n = T.Bf16Transform.produce, [0]
    def produce(self, ck, job):
        n[0] += 1
        if n[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, ck, job)
    T.Bf16Transform.produce = produce
    from k2mini.cli import cli
    cli(sys.argv[1:], prog_name="k2mini")
""")


def test_kill_resume_and_reproducible(tiny_fixture, tmp_path):
    args = ["--layers", 3, "--experts", 4, "--max-shard-size", "300KB", "--no-progress"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    convert("convert-fast", tiny_fixture.path, a, *args)
    convert("convert-fast", tiny_fixture.path, b, *args)
    assert len(list(a.glob("*.safetensors"))) >= 3
    assert files_bytes(a) == files_bytes(b)

    env = dict(os.environ, KILL_AT="40")
    proc = subprocess.run([sys.executable, "-c", _KILLER, "convert-fast", "-s", str(tiny_fixture.path), "-o", str(c),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not c.exists()  # nothing that looks like a finished checkpoint
    partial = tmp_path / ".c.k2mini-partial"
    assert partial.is_dir() and not (partial / "model.safetensors.index.json").exists()
    assert list(partial.glob("model-*.safetensors"))

    res = run_cli("convert-fast", "-s", tiny_fixture.path, "-o", c, *args, "--resume", "--json")
    assert json.loads(res.stdout)["reused_shards"] >= 1
    assert files_bytes(a) == files_bytes(c)
    assert not partial.exists()


def test_plan_replay_and_dry_run(tiny_fixture, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert("convert-fast", tiny_fixture.path, a, "--layers", 3, "--experts", 3)
    res = run_cli("convert", "-s", tiny_fixture.path, "-o", b, "--plan", a / "plan.json", "--dry-run", "--json")
    d = json.loads(res.stdout)
    assert not b.exists()
    cfg = json.loads((a / "config.json").read_text())
    with torch.device("meta"):
        from transformers import DeepseekV3ForCausalLM

        hf = DeepseekV3ForCausalLM(hf_config(cfg))
    # transformers keeps e_score_correction_bias as a buffer; we count it as a parameter.
    bias = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias"))
    assert d["params"] == sum(p.numel() for p in hf.parameters()) + bias
    shards = json.loads((a / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert sum(d["bytes_by_dtype"].values()) == shards
    convert("convert", tiny_fixture.path, b, "--plan", a / "plan.json")
    assert files_bytes(a) == files_bytes(b)


# --- bad input --------------------------------------------------------------------------


def _bad(args, match, tmp_path, out=None):
    out = out or tmp_path / "out"
    res = CliRunner().invoke(cli, [*map(str, args), "-o", str(out)])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("k2mini: error:"), err
    assert match in err, err
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((".out", "out"))] if out.parent.exists() else []
    return leftovers


@pytest.mark.parametrize("args,match", [
    (["--layers", 99], "--layers 99 is above the source's 4 layers"),
    (["--layers", 0], "--layers 0 is below 1"),
    (["--experts", 99], "--experts 99 is above"),
    (["--experts", 1], "--top-k"),
    (["--keep-layers", "0,9"], "layer 9 does not exist"),
    (["--keep-experts", "0,1,8"], "expert 8 does not exist"),
    (["--dtype", "int3"], "--dtype int3"),
    (["--max-shard-size", "big"], "--max-shard-size"),
    (["--layer-strategy", "importance"], "needs --analysis"),
    (["--preset", "nope"], "--preset nope"),
])
def test_bad_flags_one_line_nothing_written(tiny_fixture, tmp_path, args, match):
    assert _bad(["convert", "-s", tiny_fixture.path, *args], match, tmp_path) == []


def test_bad_outputs(tiny_fixture, tmp_path, monkeypatch):
    src = tiny_fixture.path
    before = sorted(os.listdir(src))
    _bad(["convert-fast", "-s", src], "inside the source", tmp_path, out=src / "sub")
    assert sorted(os.listdir(src)) == before
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    _bad(["convert-fast", "-s", src], "--overwrite", tmp_path, out=full)
    assert os.listdir(full) == ["keep.txt"]
    import shutil

    import k2mini.output as output

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    assert _bad(["convert-fast", "-s", src], "not enough free disk", tmp_path) == []


def test_fp8_from_bf16_source_and_foreign_plan(tiny_fixture, aligned_fixture, tmp_path):
    bf = tmp_path / "bf"
    convert("convert-fast", tiny_fixture.path, bf, "--experts", 4)
    assert _bad(["convert-fast", "-s", bf, "--dtype", "fp8"], "not an FP8 checkpoint", tmp_path) == []
    assert _bad(["convert", "-s", aligned_fixture.path, "--plan", bf / "plan.json"], "made for another checkpoint", tmp_path) == []
