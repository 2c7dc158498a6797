"""k2mini heal: the loss against an independent KL, the methods' reach, the merged output
against the adapter model, N ranks against one, resume against an uninterrupted run, and
bad input as one line with exit 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from convert_cli import load
from safetensors.torch import load_file

from k2mini.checkpoint import safetensors_format
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.heal import methods
from k2mini.heal.loss import kl_sum
from k2mini.model.hf import load_checkpoint_model

STEPS = ["--steps", "6", "--batch-size", "4", "--eval-every", "3", "--quiet"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def weights(out: Path) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("model-*.safetensors")):
        t.update(load_file(f))
    return t


@pytest.fixture(scope="module")
def pair(tiny_fixture, tmp_path_factory):
    """(source, reduced 3 layers x 4 experts bf16, teacher cache of the source)."""
    d = tmp_path_factory.mktemp("heal")
    src = tiny_fixture.path
    reduced, teacher = d / "reduced", d / "teacher"
    assert invoke("convert-fast", "-s", str(src), "--layers", "3", "--experts", "4", "-o", str(reduced)).exit_code == 0
    res = invoke("teacher", "-s", str(src), "-o", str(teacher), "--samples", "12", "--seq-len", "16", "--top-k", "16",
                 "--block-sequences", "5", "--quiet")
    assert res.exit_code == 0, res.output
    return src, reduced, teacher


# -- the loss ---------------------------------------------------------------------------


def _logits(n=6, v=40, seed=0, scale=3.0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_loss_is_the_full_kl_when_k_covers_the_vocabulary():
    t, s = _logits(seed=1), _logits(seed=2)
    tp, sp = t.log_softmax(-1), s.log_softmax(-1)
    full = (tp.exp() * (tp - sp)).sum()  # KL(teacher || student) over every id
    ids = tp.argsort(-1, descending=True)
    got = kl_sum(s.float(), ids, tp.gather(-1, ids).float())
    assert abs(got.item() - full.item()) < 1e-4 * full.item()
    assert full.item() > 1.0  # distributions that differ


def test_loss_with_a_tail_bucket_is_the_kl_of_the_collapsed_distributions():
    t, s = _logits(seed=3), _logits(seed=4)
    tp, sp = t.log_softmax(-1), s.log_softmax(-1)
    k = 5
    ids = tp.topk(k, -1).indices
    p = torch.cat([tp.gather(-1, ids).exp(), 1 - tp.gather(-1, ids).exp().sum(-1, keepdim=True)], -1)
    q = torch.cat([sp.gather(-1, ids).exp(), 1 - sp.gather(-1, ids).exp().sum(-1, keepdim=True)], -1)
    collapsed = (p * (p.log() - q.log())).sum()
    got = kl_sum(s.float(), ids, tp.gather(-1, ids).float())
    assert abs(got.item() - collapsed.item()) < 1e-4 * collapsed.item()
    full = (tp.exp() * (tp - sp)).sum()
    assert got.item() <= full.item()  # collapsing outcomes never raises a divergence


def test_loss_is_zero_when_the_student_is_the_teacher():
    t = _logits(seed=5)
    ids = t.topk(7, -1).indices
    got = kl_sum(t.float(), ids, t.log_softmax(-1).gather(-1, ids).float())
    assert abs(got.item()) < 1e-5


def test_its_gradient_moves_the_student_towards_the_teacher():
    t = _logits(seed=6)
    tp = t.log_softmax(-1)
    ids = tp.topk(8, -1).indices
    s = _logits(seed=7).float().requires_grad_(True)

    def full_kl(x):
        return (tp.exp() * (tp - x.double().log_softmax(-1))).sum().item()

    before = full_kl(s)
    for _ in range(20):
        loss = kl_sum(s, ids, tp.gather(-1, ids).float())
        (g,) = torch.autograd.grad(loss, s)
        s = (s - 0.5 * g).detach().requires_grad_(True)
    assert full_kl(s) < 0.5 * before  # measured against the full distributions, not the loss itself


# -- the methods and the output ------------------------------------------------------------


def test_router_method_changes_the_routers_and_nothing_else(pair, tmp_path):
    _, reduced, teacher = pair
    out = tmp_path / "healed"
    res = invoke("heal", str(reduced), "-t", str(teacher), "-o", str(out), "--method", "router", *STEPS)
    assert res.exit_code == 0, res.output
    before, after = weights(reduced), weights(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    routers = {n for n in before if n.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))}
    assert routers and changed == routers
    assert all(after[n].dtype == before[n].dtype for n in before)


def test_healed_output_is_a_complete_checkpoint_with_provenance(pair, tmp_path):
    src, reduced, teacher = pair
    out = tmp_path / "healed"
    res = invoke("heal", str(reduced), "-t", str(teacher), "-o", str(out), "--json", *STEPS)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    cfg = json.loads((out / "config.json").read_text())
    block = cfg["k2mini"]["heal"]
    manifest_sha = __import__("hashlib").sha256((teacher / "manifest.json").read_bytes()).hexdigest()
    assert block["teacher_manifest_sha256"] == manifest_sha and block["method"] == "lora" and block["steps"] == 6
    assert block["tokens_seen"] == 6 * 4 * 16 and summary["tokens_per_second"] > 0
    assert block["last_loss"] < block["first_loss"]
    log = [json.loads(x) for x in (out / "heal_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, 7)) and [x["step"] for x in log if x["eval_kl"] is not None] == [3, 6]
    assert (out / "heal_loss.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "Healing (k2mini heal)" in card and manifest_sha in card
    assert not list(out.glob("train_state*"))
    load(out)  # strictly, no remote code
    assert invoke("validate", str(out), "--gpu", "h100", "--skip", "run").exit_code == 0
    assert invoke("quantize", str(out), "--bits", "8", "-o", str(tmp_path / "q8"), "--quiet").exit_code == 0


def test_merged_lora_equals_the_adapter_model(pair):
    """The weights heal writes (gathered a layer at a time, LoRA merged) rebuilt into a plain
    model compute what the adapter model computes."""
    from k2mini.heal.gather import LayerGather, in_group_order
    from k2mini.heal.output import weight_names
    from k2mini.heal.recipe import Student
    from k2mini.model.hf import build_model

    _, reduced, _ = pair
    torch.manual_seed(0)
    ck = Checkpoint.open(reduced)
    model = load_checkpoint_model(ck)
    trained = methods.prepare(model, "lora", lora_rank=4)
    with torch.no_grad():  # LoRA's B starts at zero: give every adapter a real update
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    gather = LayerGather(Student(trained), trained, keep=True)
    names = in_group_order(weight_names(ck))
    tensors = {n: gather.get(n) for n in names}
    with torch.no_grad():
        adapter = methods.base_model(trained)(ids, use_cache=False).logits
        merged = build_model(ck.config, tensors)(ids, use_cache=False).logits
        plain = load_checkpoint_model(Checkpoint.open(reduced))(ids, use_cache=False).logits
    assert (adapter - merged).abs().max() < 1e-4
    assert (adapter - plain).abs().max() > 1e-2  # the adapters do change the model
    experts = [n for n in names if ".mlp.experts." in n]
    original = weights(reduced)
    assert experts and all(not torch.equal(tensors[n].to(original[n].dtype), original[n]) for n in experts)  # routed experts got LoRA too
    largest_layer = max(sum(t.numel() * 4 for n, t in tensors.items() if n.startswith(f"model.layers.{i}.")) for i in range(3))
    assert gather.peak_bytes <= max(largest_layer, sum(t.numel() * 4 for n, t in tensors.items() if ".layers." not in n))


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "k2mini.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _float32_copy(reduced: Path, out: Path) -> Path:
    """REDUCED with every BF16 tensor stored as float32: heal writes the reduced model's own
    dtypes, so N ranks can be compared before any BF16 rounding (a rounding boundary turns
    a 1e-7 difference into one BF16 step, 4e-3, of that element)."""
    from safetensors.torch import save_file

    shutil.copytree(reduced, out)
    for f in out.glob("model-*.safetensors"):
        save_file({k: v.float() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_two_ranks_train_the_weights_one_rank_trains(pair, tmp_path):
    _, reduced_bf16, teacher = pair
    reduced = _float32_copy(reduced_bf16, tmp_path / "reduced-f32")
    got = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        p = _torchrun(n, ["heal", str(reduced), "-t", str(teacher), "-o", str(out), "--device", "cpu", "--json", *STEPS])
        assert p.returncode == 0, p.stderr[-3000:]
        assert json.loads(p.stdout)["ranks"] == n
        got[n] = weights(out)
    assert all(t.dtype == torch.float32 for t in got[1].values())
    num = sum(float((got[1][k].double() - got[2][k].double()).norm() ** 2) for k in got[1]) ** 0.5
    den = sum(float(got[1][k].double().norm() ** 2) for k in got[1]) ** 0.5
    moved = sum(float((got[1][k].double() - weights(reduced)[k].double()).norm() ** 2) for k in got[1]) ** 0.5
    print(f"relative difference 2 ranks vs 1: {num / den:.2e} (training moved the weights by {moved / den:.2e})")
    assert num / den < 1e-5 and moved / den > 1e-4


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_weights(pair, tmp_path):
    _, reduced, teacher = pair
    args = ["heal", str(reduced), "-t", str(teacher), "--method", "full", "--steps", "6", "--batch-size", "4",
            "--eval-every", "2", "--quiet"]
    ref = tmp_path / "ref"
    assert invoke(*args, "-o", str(ref)).exit_code == 0
    out = tmp_path / "out"
    partial = out.parent / f".{out.name}.k2mini-partial"
    base = [sys.executable, "-m", "k2mini.testing.faults"]
    count = tmp_path / "events"
    subprocess.run([*base, f"count:{count}", *args, "-o", str(out)], check=True, capture_output=True, timeout=600)
    shutil.rmtree(out)
    for k in range(int(count.read_text()) - 1, 0, -1):  # from the end: the last save (step 4) stays until the output is written
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.run([*base, f"kill@{k}", *args, "-o", str(out)], capture_output=True, timeout=600)
        assert p.returncode == -9
        state = partial / "train_state.json"
        if state.is_file() and json.loads(state.read_text())["step"] == 4:
            break
    else:
        pytest.fail("no kill point left a training checkpoint at step 4")
    res = invoke(*args, "-o", str(out), "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["resumed_from_step"] == 4
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bad input ------------------------------------------------------------------------------


def _one_line(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), res.output
    return lines[0]


@pytest.mark.parametrize("extra, needles", [
    (["--steps", "0"], ["--steps 0"]),
    (["--lr", "-1"], ["--lr -1"]),
    (["--method", "full", "--lora-rank", "8"], ["--lora-rank", "--method full"]),
    (["--eval-fraction", "1"], ["--eval-fraction"]),
    (["--cpu-offload"], ["--cpu-offload", "--fsdp"]),
    (["--cpu-offload", "--fsdp"], ["--cpu-offload", "GPUs"]),
])
def test_bad_flags_are_one_line(pair, tmp_path, extra, needles):
    _, reduced, teacher = pair
    out = tmp_path / "o"
    _one_line(CliRunner().invoke(cli, ["heal", str(reduced), "-t", str(teacher), "-o", str(out), *extra]), *needles)
    assert not out.exists()


def test_a_cache_of_another_source_is_refused(pair, aligned_fixture, tmp_path):
    _, reduced, _ = pair
    other = tmp_path / "other.teacher"
    assert invoke("teacher", "-s", str(aligned_fixture.path), "-o", str(other), "--samples", "2", "--seq-len", "8",
                  "--top-k", "4", "--quiet").exit_code == 0
    out = tmp_path / "o"
    _one_line(CliRunner().invoke(cli, ["heal", str(reduced), "-t", str(other), "-o", str(out)]), "made from", "same source")
    assert not out.exists()


def test_a_corrupt_cache_shard_is_refused_before_training(pair, tmp_path):
    _, reduced, teacher = pair
    bad = tmp_path / "bad.teacher"
    shutil.copytree(teacher, bad)
    shard = bad / "block-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    out = tmp_path / "o"
    _one_line(CliRunner().invoke(cli, ["heal", str(reduced), "-t", str(bad), "-o", str(out)]), "block-00001", "corrupt or truncated")
    assert not out.exists() and not any(tmp_path.glob(".o.*"))


def test_outputs_inside_the_inputs_and_existing_outputs_are_refused(pair, tmp_path):
    src, reduced, teacher = pair
    for inside in (reduced / "healed", teacher / "healed", Path(src) / "healed"):
        _one_line(CliRunner().invoke(cli, ["heal", str(reduced), "-t", str(teacher), "-o", str(inside)]), "inside")
        assert not inside.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    _one_line(CliRunner().invoke(cli, ["heal", str(reduced), "-t", str(teacher), "-o", str(existing)]), "--overwrite")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_an_fp8_reduced_model_is_refused_with_what_to_do(pair, tmp_path):
    src, _, teacher = pair
    fp8 = tmp_path / "fp8"
    assert invoke("convert-fast", "-s", str(src), "--layers", "3", "--experts", "4", "--dtype", "fp8", "-o", str(fp8)).exit_code == 0
    _one_line(CliRunner().invoke(cli, ["heal", str(fp8), "-t", str(teacher), "-o", str(tmp_path / "o")]), "fp8", "--dtype bf16")


def test_disk_full_while_writing_the_healed_model_is_one_line(pair, tmp_path, monkeypatch):
    _, reduced, teacher = pair
    real = safetensors_format._write_tensor
    calls = []

    def fail(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", getattr(a[0], "name", None))
        return real(*a, **k)

    monkeypatch.setattr(safetensors_format, "_write_tensor", fail)
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["heal", str(reduced), "-t", str(teacher), "-o", str(out), *STEPS])
    _one_line(res, "No space left on device", "free some space")
    assert len(calls) == 3 and not out.exists()


def test_dry_run_plans_memory_for_kimi_k2_at_24x16(tmp_path):
    from k2mini.heal import memory
    from k2mini.model.spec import ModelSpec

    ref = Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json"  # the repo's copy
    cfg = {**json.loads(ref.read_text()), "num_hidden_layers": 24, "n_routed_experts": 16}
    cfg.pop("quantization_config")
    p1 = memory.plan(cfg, gpus=1, gpu_bytes=80 * 2**30, seq_len=4096, batch_per_gpu=1, lora_rank=16)
    p8 = memory.plan(cfg, gpus=8, gpu_bytes=80 * 2**30, seq_len=4096, batch_per_gpu=1, lora_rank=16)
    params = ModelSpec.from_config(cfg).param_count()
    assert p1["params"] == params and 21e9 < params < 24e9  # docs/facts.md §7: 22.4B
    full1, full8 = p1["methods"]["full"]["layouts"], p8["methods"]["full"]["layouts"]
    # full: FP32 weights, FP32 grads, two FP32 AdamW moments: 16 B per parameter on one replica
    assert full1["DDP"]["params"] + full1["DDP"]["grads"] + full1["DDP"]["optimizer"] == params * 16
    assert full8["FSDP2"]["optimizer"] == params * 8 // 8 and not full1["DDP"]["fits"] and full8["FSDP2"]["fits"]
    # sharded weights plus the gathered root (embeddings, head) and two layers in BF16
    assert full8["FSDP2"]["params"] == params * 4 // 8 + 2 * (p8["root_params"] + 2 * p8["largest_layer_params"])
    assert full8["FSDP2+offload"]["host"] == params * 16 // 8 and full8["FSDP2+offload"]["optimizer"] == 0
    assert p8["methods"]["full"]["default"] == "FSDP2" and p8["methods"]["lora"]["default"] == "DDP"
    assert p1["methods"]["router"]["trainable_params"] == 23 * 16 * 7168
    assert p1["methods"]["lora"]["trainable_params"] < params // 50
    cfg61 = {**cfg, "num_hidden_layers": 61, "n_routed_experts": 32}
    p61 = memory.plan(cfg61, gpus=8, gpu_bytes=80 * 2**30, seq_len=4096, batch_per_gpu=1, lora_rank=16)
    assert p61["methods"]["lora"]["default"] == "FSDP2"  # a BF16 replica of 96B parameters does not fit 80 GB
    (tmp_path / "k2").mkdir()
    (tmp_path / "k2" / "config.json").write_text(json.dumps(cfg61))
    res = invoke("heal", str(tmp_path / "k2"), "--dry-run", "--gpus", "8", "--gpu", "h100")
    assert res.exit_code == 0 and "FSDP2+offload" in res.output and "default layout FSDP2" in res.output
