"""k2mini plan: the memory model against validate's plan of what convert writes, the
measured score against the KL of the written (and quantized) cut, the streamed KL against
heal's loss, the plan's dtype applied by convert, and budgets nothing fits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.heal.loss import kl_sum
from k2mini.heal.recipe import split
from k2mini.planner.space import Cut, MemoryModel
from k2mini.selection.plan import Plan
from k2mini.teacher.cache import TeacherCache
from k2mini.validate.gpus import load_profile
from k2mini.validate.memory import memory_plan

K2_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _safetensors_bytes(out: Path) -> int:
    """Bytes of tensor data in OUT's shards, from the safetensors headers themselves."""
    total = 0
    for f in out.glob("*.safetensors"):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


@pytest.fixture(scope="module")
def tiny(tiny_fixture, tmp_path_factory):
    """(source, teacher cache of the source, work dir)."""
    d = tmp_path_factory.mktemp("plan")
    teacher = d / "teacher"
    res = invoke("teacher", "-s", str(tiny_fixture.path), "-o", str(teacher), "--samples", "12", "--seq-len", "16",
                 "--top-k", "16", "--quiet")
    assert res.exit_code == 0, res.output
    return tiny_fixture.path, teacher, d


# -- memory ------------------------------------------------------------------------------


def test_memory_model_equals_validate_memory_plan_on_random_k2_cuts():
    cfg = json.loads(K2_CONFIG.read_text())
    dtypes = ("bf16", "fp8", "int8", "int4", "int4-g32")
    model = MemoryModel(cfg, dtypes, profile=load_profile("h100"), context=32768, batch=4)
    rng = random.Random(0)
    for _ in range(6):
        cut = Cut(rng.randint(2, 61), rng.randint(8, 384), rng.choice(dtypes))
        exact = model.exact_plan(cut.dtype, 1, cut.layers - 1, cut.experts)
        assert model.weights(cut) == exact.weights_bytes, cut
        assert model.needed(cut) == exact.needed_latent_bytes, cut


@pytest.mark.parametrize("dtype", ["bf16", "int4"])
def test_written_plan_fits_and_validate_agrees_with_the_memory_model(tiny, tmp_path, dtype):
    src, _, _ = tiny
    # A GPU profile sized in MiB for a model of a few MB: 10 MiB, 1 reserved.
    gpu = tmp_path / "toy.json"
    gpu.write_text(json.dumps({"name": "toy", "description": "test", "kind": "cuda", "memory_mib": 10,
                               "reserved_mib": 1, "fp8_native": True, "bf16": True}))
    res = invoke("plan", "-s", str(src), "--gpu", str(gpu), "--context", "64", "--dtypes", dtype, "-o", str(tmp_path / "p.json"),
                 "--json", "--quiet")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    pick = report["candidates"][report["pick"]]
    assert pick["dtype"] == dtype and pick["needed_bytes"] <= report["capacity_bytes"]
    out = tmp_path / "out"
    assert invoke("convert", "-s", str(src), "--plan", str(tmp_path / "p.json"), "-o", str(out), "--no-progress").exit_code == 0
    ck = Checkpoint.open(str(out))
    assert (ck.config["num_hidden_layers"], ck.config["n_routed_experts"]) == (pick["layers"], pick["experts"])
    written = memory_plan(ck.config, load_profile(str(gpu)), context=64, batch=1, ck=ck)
    assert written.weights_bytes == pick["weights_bytes"] == _safetensors_bytes(out)
    assert written.needed_latent_bytes == pick["needed_bytes"]
    assert written.fits_latent
    # One more expert per layer would not have fit: the pick is the largest of its layers and dtype.
    model = MemoryModel(Checkpoint.open(str(src)).config, (dtype,), profile=load_profile(str(gpu)), context=64, batch=1)
    if pick["experts"] < Checkpoint.open(str(src)).config["n_routed_experts"]:
        assert model.needed(Cut(pick["layers"], pick["experts"] + 1, dtype)) > report["capacity_bytes"]


def test_budget_nothing_fits_is_one_line_naming_the_smallest_cut_and_its_size(tiny, tmp_path):
    src, _, _ = tiny
    res = CliRunner().invoke(cli, ["plan", "-s", str(src), "--budget", "10KB", "--dtypes", "bf16,int4"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "nothing fits" in lines[0], res.output
    # The smallest cut: the dense layer and one MoE layer, top-k experts, INT4; its size is
    # what convert writes for it.
    cfg = Checkpoint.open(str(src)).config
    out = tmp_path / "smallest"
    r = invoke("convert-fast", "-s", str(src), "--layers", "2", "--experts", str(cfg["num_experts_per_tok"]), "--dtype", "int4",
               "-o", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    from k2mini.sizes import format_size

    assert f"2L x {cfg['num_experts_per_tok']}E int4" in lines[0]
    assert format_size(_safetensors_bytes(out)) in lines[0]


# -- measured score ----------------------------------------------------------------------


def test_streamed_scores_equal_heal_kl_and_cross_entropy():
    from k2mini.planner.measure import streamed_scores

    g = torch.Generator().manual_seed(0)
    N, H, V, k = 10, 12, 50, 6
    normed, head = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    teacher = (torch.randn(N, V, generator=g) * 2).log_softmax(-1)
    ids = teacher.topk(k, -1).indices
    targets = torch.randint(0, V, (N,), generator=g)

    class Head:  # the runner's lm_head in row blocks of 16 (a block boundary inside the top-k)
        dtype = torch.float32

        def to_compute(self, t):
            return t

        def head_blocks(self):
            for r0 in range(0, V, 16):
                yield r0, head[r0 : r0 + 16]

    kl, nll = streamed_scores(Head(), normed, ids, teacher.gather(-1, ids), targets)
    logits = normed @ head.T
    assert float(kl.sum()) == pytest.approx(float(kl_sum(logits, ids, teacher.gather(-1, ids))), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(nll.float(), ce, rtol=1e-5, atol=1e-5)


def _kl_of_written(out: Path, cache: TeacherCache, held: list[int], dtype: str) -> float:
    """KL(teacher || OUT) per position, OUT loaded by transformers (compressed-tensors
    decompressed by the library, in float32), heal's loss on the cache's held-out sequences."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    b = cache.read(held)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids).logits
    k = b.topk_ids.shape[-1]
    return float(kl_sum(logits.reshape(-1, logits.shape[-1]), b.topk_ids.reshape(-1, k), b.topk_logprobs.reshape(-1, k))) / b.input_ids.numel()


# int4: transformers decompresses the fused routed experts to BF16 at load (the runner keeps
# the exact float32 products), which moves this KL by 7e-4 of itself.
@pytest.mark.parametrize("dtype,budget,rel", [("bf16", "3MB", 1e-4), ("int4", "1.7MB", 2e-3)])
def test_measured_score_equals_kl_of_the_cut_written_by_convert(tiny, tmp_path, dtype, budget, rel):
    src, teacher, _ = tiny
    # Budgets below the whole model (4.9 MB bf16, 1.9 MB int4): the pick is a real cut.
    res = invoke("plan", "-s", str(src), "--budget", budget, "--dtypes", dtype, "--teacher", str(teacher), "--measure", "2",
                 "--eval-fraction", "0.25", "-o", str(tmp_path / "p.json"), "--json", "--quiet")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    pick = report["candidates"][report["pick"]]
    assert report["scored_by"] == "teacher" and pick["kl"] is not None
    measured = [c for c in report["candidates"] if c["kl"] is not None]
    assert len(measured) == 2 and pick["kl"] == min(c["kl"] for c in measured)
    plan = Plan.load(tmp_path / "p.json")
    assert plan.dtype == dtype and len(plan.layers) == pick["layers"] and plan.config.n_routed_experts == pick["experts"]
    out = tmp_path / "out"
    assert invoke("convert", "-s", str(src), "--plan", str(tmp_path / "p.json"), "-o", str(out), "--no-progress").exit_code == 0
    cache = TeacherCache(teacher)
    _, held = split(cache.sequences, 0.25, 0)
    assert report["eval_positions"] == len(held) * cache.seq_len
    ref = _kl_of_written(out, cache, held, dtype)
    assert ref > 1e-4  # a cut that changes the model
    assert pick["kl"] == pytest.approx(ref, rel=rel)


# -- plan.json and convert ---------------------------------------------------------------


def test_convert_applies_the_plan_dtype_and_dtype_flag_overrides_it(tiny, tmp_path):
    src, _, _ = tiny
    assert invoke("plan", "-s", str(src), "--budget", "3MB", "--dtypes", "int8", "-o", str(tmp_path / "p.json"), "--quiet").exit_code == 0
    assert Plan.load(tmp_path / "p.json").dtype == "int8"
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("convert", "-s", str(src), "--plan", str(tmp_path / "p.json"), "-o", str(a), "--no-progress").exit_code == 0
    assert invoke("convert", "-s", str(src), "--plan", str(tmp_path / "p.json"), "--dtype", "bf16", "-o", str(b),
                  "--no-progress").exit_code == 0
    qa = json.loads((a / "config.json").read_text()).get("quantization_config", {})
    assert qa.get("quant_method") == "compressed-tensors" and qa["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert "quantization_config" not in json.loads((b / "config.json").read_text())
    assert _safetensors_bytes(a) <= 3_000_000


def test_k2_from_its_config_recommends_a_cut_that_fits_and_refuses_a_plan_file(tmp_path):
    res = invoke("plan", "-s", str(K2_CONFIG), "--gpu", "h100", "--context", "32768", "--json", "--quiet")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    pick = r["candidates"][r["pick"]]
    exact = MemoryModel(json.loads(K2_CONFIG.read_text()), (pick["dtype"],), profile=load_profile("h100"), context=32768,
                        batch=1).exact_plan(pick["dtype"], 1, pick["layers"] - 1, pick["experts"])
    assert exact.fits_latent and exact.needed_latent_bytes == pick["needed_bytes"]
    assert r["scored_by"] == "prior"
    bad = CliRunner().invoke(cli, ["plan", "-s", str(K2_CONFIG), "--gpu", "h100", "-o", str(tmp_path / "p.json")])
    assert bad.exit_code == 2 and "config alone" in bad.output and len(bad.output.strip().splitlines()) == 1
