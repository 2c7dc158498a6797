"""heal under FSDP2 on CPU with gloo: 2 sharded ranks train the weights 1 rank trains (full
and LoRA), each rank holds about half the parameter and optimizer bytes, a run killed with
SIGKILL resumes from its sharded checkpoint to the uninterrupted weights, and a checkpoint
saved on 2 ranks resumes on 1 (and the reverse)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_heal import _float32_copy, _torchrun, invoke, pair, weights  # noqa: F401 (pair: the fixture)

from k2mini.heal.state import POINTER
from k2mini.output import partial_dir

pytestmark = pytest.mark.slow
STEPS = ["--steps", "4", "--batch-size", "4", "--eval-every", "2", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def f32_pair(pair, tmp_path_factory):
    """(test_heal's reduced 3 layers x 4 experts stored as float32, its teacher cache)."""
    _, reduced, teacher = pair
    return _float32_copy(reduced, tmp_path_factory.mktemp("heal-fsdp") / "reduced-f32"), teacher


def _relative(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    return num / sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_fsdp_ranks_train_the_weights_one_rank_trains_with_half_the_bytes_each(f32_pair, tmp_path, method):
    reduced, teacher = f32_pair
    args = ["heal", str(reduced), "-t", str(teacher), "--method", method, "--json", *STEPS]
    one = invoke(*args, "-o", str(tmp_path / "r1"), "--no-fsdp")
    assert one.exit_code == 0, one.output
    p = _torchrun(2, [*args, "-o", str(tmp_path / "r2"), "--fsdp"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["parallel"] == "FSDP2" and json.loads(one.stdout)["parallel"] == "single"
    w1, w2, w0 = weights(tmp_path / "r1"), weights(tmp_path / "r2"), weights(reduced)
    assert w1.keys() == w2.keys() == w0.keys() and all(t.dtype == torch.float32 for t in w2.values())
    rel, moved = _relative(w1, w2), _relative(w1, w0)
    print(f"{method}: relative difference FSDP2 2 ranks vs 1 rank {rel:.2e} (training moved the weights by {moved:.2e})")
    assert rel < 1e-5 and moved > 1e-4
    # resident bytes, read off each rank's own tensors after the first step
    (r1,) = json.loads((tmp_path / "r1" / "heal_report.json").read_text())["resident_bytes_per_rank"]
    per_rank = json.loads((tmp_path / "r2" / "heal_report.json").read_text())["resident_bytes_per_rank"]
    assert len(per_rank) == 2
    for params, opt in per_rank:
        print(f"{method}: rank holds params {params:,} B (one rank: {r1[0]:,}), optimizer {opt:,} B (one rank: {r1[1]:,})")
        assert 0.4 < params / r1[0] < 0.6 and 0.4 < opt / r1[1] < 0.6


def _kill_when_saved(cmd: list[str], out: Path, timeout: float = 600) -> int:
    """Start ``cmd``; SIGKILL it and every process under it (torchrun starts its ranks in
    sessions of their own) once a training checkpoint is complete (the pointer exists);
    returns the step it holds."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    pointer = partial_dir(out) / POINTER
    t0 = time.monotonic()
    try:
        while not pointer.is_file():
            assert proc.poll() is None, "the run ended before it saved a training checkpoint"
            assert time.monotonic() - t0 < timeout
            time.sleep(0.02)
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in reversed(tree):  # the ranks first, so the launcher cannot restart them
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait()
    return json.loads(pointer.read_text())["step"]


def _heal_cmd(ranks: int, args: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "k2mini.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "k2mini.cli", *args]


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 2), (2, 1), (1, 2)])
def test_a_killed_run_resumes_from_its_sharded_checkpoint_on_any_ranks(f32_pair, tmp_path, saved_on, resumed_on):
    reduced, teacher = f32_pair
    steps = ["--steps", "10", "--batch-size", "4", "--eval-every", "2", "--quiet", "--device", "cpu", "--method", "full"]
    layout = {1: ["--no-fsdp"], 2: ["--fsdp"]}
    base = ["heal", str(reduced), "-t", str(teacher), *steps]
    ref = tmp_path / "ref"
    p = subprocess.run(_heal_cmd(resumed_on, [*base, *layout[resumed_on], "-o", str(ref)]), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "out"
    step = _kill_when_saved(_heal_cmd(saved_on, [*base, *layout[saved_on], "-o", str(out)]), out)
    assert not out.exists() and 2 <= step < 10
    p = subprocess.run(_heal_cmd(resumed_on, [*base, *layout[resumed_on], "-o", str(out), "--resume", "--json"]),
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["resumed_from_step"] == step
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    rel = _relative(a, b)
    print(f"saved on {saved_on}, resumed on {resumed_on} (from step {step}): relative difference to uninterrupted {rel:.2e}")
    if saved_on == resumed_on:
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same ranks and layout: bit for bit
    else:
        assert rel < 1e-5  # resharded: the same state, summed in another order by the steps before the save


def test_a_training_checkpoint_of_other_options_is_refused_and_one_of_the_same_restores(tmp_path):
    from k2mini.errors import UsageError
    from k2mini.heal import state

    def setup(seed):
        torch.manual_seed(seed)
        m = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    m, opt, sched = setup(0)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    run = {"method": "full", "lora_rank": 16, "steps": 5}
    state.save(tmp_path, m, opt, sched, 1, [{"step": 1}], run)
    m2, opt2, sched2 = setup(1)
    with pytest.raises(UsageError, match="--method full"):
        state.load(tmp_path, m2, opt2, sched2, {**run, "method": "lora"})
    meta = state.load(tmp_path, m2, opt2, sched2, run)
    assert meta["step"] == 1 and meta["log"] == [{"step": 1}] and sched2.last_epoch == 1
    assert torch.equal(m.weight, m2.weight) and torch.equal(opt.state[m.weight]["exp_avg"], opt2.state[m2.weight]["exp_avg"])
