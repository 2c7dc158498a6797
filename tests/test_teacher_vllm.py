"""k2mini teacher --engine vllm against a stand-in vLLM written here: a package named vllm
whose LLM computes with transformers' DeepseekV3 model in float32 (strictly loaded from the
source) and returns log-probs in vLLM's own layouts (FlatLogprobs: the prompt's token, then
ranks 1..k per position; or a dict per position), or refuses, crashes, hangs, is missing.
What is pinned: the cache has the layer-streamed engine's format (names, shapes, dtypes,
manifest fields) and values, the parallel layout reaches vLLM, a killed run resumes to the
same bytes, and every failure is one line with exit 2. The real vLLM runs in
scripts/serving_check.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from k2mini.cli import cli
from k2mini.teacher.cache import MANIFEST, TeacherCache, bytes_per_token
from fake_vllm import make_engine_python
from test_teacher import cache_files

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--samples", "5", "--seq-len", "24", "--block-sequences", "2", "--top-k", "8", "--quiet"]

FAKE_VLLM = '''
_calls = [0]


class Logprob:
    def __init__(self, logprob, rank):
        self.logprob, self.rank = logprob, rank


class FlatLogprobs:
    """vllm/logprobs.py's layout: per position the own token first, then ranks 1..k."""
    def __init__(self):
        self.start_indices, self.end_indices, self.token_ids, self.logprobs, self.ranks = [], [], [], [], []

    def append(self, ids, lps, ranks):
        self.start_indices.append(len(self.token_ids))
        self.token_ids += ids
        self.logprobs += lps
        self.ranks += ranks
        self.end_indices.append(len(self.token_ids))


class _Completion:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = token_ids, logprobs


class _Request:
    def __init__(self, prompt_logprobs, completion):
        self.prompt_logprobs, self.outputs = prompt_logprobs, [completion]


class LLM:
    def __init__(self, model, **kw):
        record = os.environ.get("FAKE_VLLM_RECORD")
        if record:
            dp = {k: v for k, v in os.environ.items() if k.startswith("VLLM_DP_")}
            with open(os.path.join(record, f"llm-{os.getpid()}.json"), "w") as f:
                json.dump({"model": model, "kwargs": kw, "dp_env": dp, "pid": os.getpid()}, f)
        fail_as_asked()
        from k2mini.checkpoint.reader import Checkpoint
        from k2mini.model.hf import load_checkpoint_model
        self.k = kw["max_logprobs"]
        self.model = load_checkpoint_model(Checkpoint.open(model))

    def generate(self, prompts, params, use_tqdm=True):
        import torch
        _calls[0] += 1
        if mode == "crash-second" and _calls[0] == 2:
            os._exit(7)
        assert params.prompt_logprobs == params.logprobs == self.k and params.max_tokens == 1
        out = []
        with torch.no_grad():
            for p in prompts:
                ids = list(p["prompt_token_ids"])
                lp = self.model(torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)
                top = lp.topk(self.k, dim=-1)
                def entries(row, own):
                    rank = int((lp[row] > lp[row, own]).sum()) + 1
                    return ([own] + top.indices[row].tolist(), [float(lp[row, own])] + top.values[row].tolist(),
                            [rank] + list(range(1, self.k + 1)))
                greedy = int(top.indices[-1, 0])
                if params.flat_logprobs:
                    plp, slp = FlatLogprobs(), FlatLogprobs()
                    plp.append([], [], [])
                    for t in range(1, len(ids)):
                        plp.append(*entries(t - 1, ids[t]))
                    slp.append(*entries(len(ids) - 1, greedy))
                else:
                    def as_dict(e):
                        return {i: Logprob(v, r) for i, v, r in zip(*e)}
                    plp = [None] + [as_dict(entries(t - 1, ids[t])) for t in range(1, len(ids))]
                    slp = [as_dict(entries(len(ids) - 1, greedy))]
                out.append(_Request(plp, _Completion([greedy], slp)))
        return out
'''


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An executable standing in for a venv's python (tests/fake_vllm.py), with this
    checkout on its path for the reference model."""
    return make_engine_python(tmp_path_factory.mktemp("fake-vllm"), FAKE_VLLM, extra_path=ROOT)


def teacher(*args: str, mode: str = "serve", record: Path | None = None):
    env = {"FAKE_VLLM_MODE": mode, **({"FAKE_VLLM_RECORD": str(record)} if record else {})}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return CliRunner().invoke(cli, ["teacher", *args])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def caches(tiny_fixture, engine, tmp_path_factory):
    """The same corpus through both engines, and the layout vLLM was given."""
    base = tmp_path_factory.mktemp("engines")
    record = base / "record"
    record.mkdir()
    out = {"layerwise": base / "lw", "vllm": base / "vllm"}
    r = teacher("-s", str(tiny_fixture.path), "-o", str(out["layerwise"]), "--engine", "layerwise", *ARGS)
    assert r.exit_code == 0, r.output
    r = teacher("-s", str(tiny_fixture.path), "-o", str(out["vllm"]), "--engine", "vllm", "--engine-python", str(engine),
                "--tensor-parallel-size", "2", "--pipeline-parallel-size", "3", "--enable-expert-parallel",
                "--max-model-len", "40", "--gpu-memory-utilization", "0.5", "--engine-arg", "enforce_eager=true",
                "--engine-arg", "distributed_executor_backend=ray", "--json", *ARGS, record=record)
    assert r.exit_code == 0, r.output
    [llm] = [json.loads(p.read_text()) for p in record.glob("llm-*.json")]
    return out, llm, json.loads(r.output)


def test_the_vllm_cache_has_the_layerwise_format_without_the_log_sum_exp(caches):
    out, _, _ = caches
    lw, vl = out["layerwise"], out["vllm"]
    assert sorted(cache_files(lw)) == sorted(cache_files(vl)) == sorted([MANIFEST, *(f"block-{i:05d}.safetensors" for i in range(3))])
    for name in sorted(cache_files(lw)):
        if name == MANIFEST:
            continue
        with safe_open(lw / name, "pt") as a, safe_open(vl / name, "pt") as b:
            assert set(a.keys()) - set(b.keys()) == {"logsumexp"} and set(b.keys()) <= set(a.keys())
            for key in b.keys():
                ta, tb = a.get_tensor(key), b.get_tensor(key)
                assert (ta.shape, ta.dtype) == (tb.shape, tb.dtype), (name, key)
            assert a.metadata() == b.metadata()
    ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (lw, vl))
    assert ma.keys() == mb.keys()
    for key in ("version", "source", "tokenizer", "corpus", "seq_len", "top_k", "sequences", "tokens", "block_sequences"):
        assert ma[key] == mb[key], key
    assert [(s["file"], s["first_sequence"], s["sequences"]) for s in ma["shards"]] == \
        [(s["file"], s["first_sequence"], s["sequences"]) for s in mb["shards"]]
    assert (ma["logsumexp"], mb["logsumexp"]) == (True, False)
    assert {k: v for k, v in ma["dtypes"].items() if k != "logsumexp"} == mb["dtypes"] and "logsumexp" not in mb["dtypes"]
    assert (ma["bytes_per_token"], mb["bytes_per_token"]) == (bytes_per_token(8), bytes_per_token(8, False)) == (56, 52)
    assert sum(s["bytes"] for s in mb["shards"]) > 120 * 52  # the payload, plus headers


def test_both_caches_hold_the_same_teacher_distribution(caches):
    """The stand-in computes transformers' float32 log-softmax; the layer-streamed engine the
    same in its own order of operations: ids equal, log-probs within float16 rounding."""
    out, _, _ = caches
    a, b = (TeacherCache(out[e]).read(range(5)) for e in ("layerwise", "vllm"))
    assert b.logsumexp is None and a.logsumexp is not None
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.topk_ids, b.topk_ids)
    bound = a.topk_logprobs.abs() * 2.0**-10 + 1e-4  # two float16 roundings plus float32 arithmetic
    assert ((a.topk_logprobs - b.topk_logprobs).abs() <= bound).all()
    # The last position (from the generated step) and the tail mass are there too.
    tail = 1 - b.topk_logprobs.double().exp().sum(-1)
    assert tail.min() > 0.01 and torch.allclose(tail, 1 - a.topk_logprobs.double().exp().sum(-1), atol=2e-3)


def test_the_layout_and_teacher_settings_reach_vllm_and_the_manifest(caches, tiny_fixture):
    out, llm, report = caches
    kw = llm["kwargs"]
    assert Path(llm["model"]) == Path(tiny_fixture.path).resolve()
    assert kw["tensor_parallel_size"] == 2 and kw["pipeline_parallel_size"] == 3 and kw["enable_expert_parallel"] is True
    assert kw["max_model_len"] == 40 and kw["gpu_memory_utilization"] == 0.5
    assert kw["enforce_eager"] is True and kw["distributed_executor_backend"] == "ray"
    assert kw["max_logprobs"] == 8 and kw["logprobs_mode"] == "raw_logprobs" and kw["skip_tokenizer_init"] is True
    assert llm["dp_env"] == {}
    c = json.loads((out["vllm"] / MANIFEST).read_text())["compute"]
    assert c["engine"] == "vllm" and c["engine_version"] == "0.0-fake" and c["tensor_parallel_size"] == 2
    assert c["pipeline_parallel_size"] == 3 and c["enable_expert_parallel"] is True and c["data_parallel_size"] == 1
    assert c["distributed_executor_backend"] == "ray" and c["logprobs_mode"] == "raw_logprobs"
    assert json.loads((out["layerwise"] / MANIFEST).read_text())["compute"]["engine"] == "layerwise"
    assert report["engine"] == "vllm" and report["per_rank"][0]["blocks"] == 3
    assert not (out["vllm"] / "engine").exists()


def test_per_position_dicts_give_the_same_bytes_as_flat_logprobs(tiny_fixture, engine, tmp_path):
    """The slower layout (one dict per position, the own token merged into the top-k) is
    read into the same cache as the flat one."""
    from k2mini.analysis.calibration import build_calibration
    from k2mini.analysis.tokenizer import load_tokenizer
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.teacher.run import tokenizer_identity
    from k2mini.teacher.vllm_engine import VllmOptions, run_teacher_vllm

    ck = Checkpoint.open(tiny_fixture.path)
    tok = load_tokenizer(ck)
    calib = build_calibration(tok, None, samples=3, seq_len=16, seed=0)
    files = {}
    os.environ["FAKE_VLLM_MODE"] = "serve"
    try:
        for flat in (True, False):
            out = tmp_path / f"flat{flat}"
            opts = VllmOptions(python=str(engine), top_k=5, block_sequences=2, flat_logprobs=flat, progress=False)
            run_teacher_vllm(ck, calib, tokenizer_identity(ck, tok.eos_id), out, opts, source_arg=str(tiny_fixture.path))
            files[flat] = cache_files(out)
    finally:
        del os.environ["FAKE_VLLM_MODE"]
    assert files[True] == files[False]


def test_data_parallel_ranks_each_get_a_share_and_write_the_one_rank_cache(tiny_fixture, engine, caches, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "dp"
    # Blocks of 2 sequences over 3 ranks: one rank's share of each block is empty (padded).
    r = teacher("-s", str(tiny_fixture.path), "-o", str(out), "--engine", "vllm", "--engine-python", str(engine),
                "--data-parallel-size", "3", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "3",
                "--enable-expert-parallel", "--max-model-len", "40", "--gpu-memory-utilization", "0.5",
                "--engine-arg", "enforce_eager=true", "--engine-arg", "distributed_executor_backend=ray", *ARGS, record=record)
    assert r.exit_code == 0, r.output
    envs = sorted((json.loads(p.read_text())["dp_env"] for p in record.glob("llm-*.json")), key=lambda e: e["VLLM_DP_RANK"])
    assert [e["VLLM_DP_RANK"] for e in envs] == ["0", "1", "2"] and {e["VLLM_DP_SIZE"] for e in envs} == {"3"}
    assert len({e["VLLM_DP_MASTER_PORT"] for e in envs}) == 1
    ref = cache_files(caches[0]["vllm"])
    got = cache_files(out)
    assert {k: v for k, v in got.items() if k != MANIFEST} == {k: v for k, v in ref.items() if k != MANIFEST}
    assert json.loads((out / MANIFEST).read_text())["compute"]["data_parallel_size"] == 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_cache_and_leaves_no_engine(tiny_fixture, engine, caches, tmp_path):
    ref = caches[0]["vllm"]
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "out"
    flags = ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "3", "--enable-expert-parallel", "--max-model-len", "40",
             "--gpu-memory-utilization", "0.5", "--engine-arg", "enforce_eager=true", "--engine-arg",
             "distributed_executor_backend=ray"]
    argv = ["teacher", "-s", str(tiny_fixture.path), "-o", str(out), "--engine", "vllm", "--engine-python", str(engine),
            *flags, *ARGS]
    env = {**os.environ, "FAKE_VLLM_MODE": "serve", "FAKE_VLLM_RECORD": str(record), "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "k2mini.testing.faults"]
    count = tmp_path / "events"
    subprocess.run([*base, f"count:{count}", *argv], check=True, capture_output=True, timeout=600, env=env)
    n_events = int(count.read_text())
    shutil.rmtree(out)
    partial = out.parent / f".{out.name}.k2mini-partial"
    for k in range(2, n_events):
        shutil.rmtree(partial, ignore_errors=True)
        for p in record.glob("*"):
            p.unlink()
        p = subprocess.run([*base, f"kill@{k}", *argv], capture_output=True, timeout=600, env=env)
        assert p.returncode == -9, p.stderr[-2000:]
        if len(list(partial.glob("block-*.safetensors"))) == 1:
            break
    else:
        pytest.fail("no kill point left exactly one finished block")
    assert not out.exists()
    # The engine noticed its parent's death (its stdin closed) and ended its own session.
    [pid] = [json.loads(p.read_text())["pid"] for p in record.glob("llm-*.json")]
    deadline = time.time() + 30
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    r = teacher(*argv[1:], "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["per_rank"][0]["blocks_resumed"] == 1
    assert cache_files(out) == cache_files(ref)


@pytest.mark.parametrize("mode, needle", [
    ("broken", "--engine vllm: vllm does not import in {engine}: ImportError: operator torchvision::nms does not exist"),
    ("refuse", "--engine vllm: vllm 0.0-fake failed: ValueError: CPUFp8BlockScaledMMKernel requires AMX tile support "
               "(Sapphire Rapids or newer). (raised as RuntimeError: Engine core initialization failed)"),
    ("crash", "--engine vllm: vllm failed: the engine process exited with code 9 before reporting"),
    ("hang", "--engine vllm: vllm failed: did not finish within 3 s (--engine-timeout)"),
    ("crash-second", "--engine vllm: vllm failed: the engine process exited with code 7 before reporting"),
])
def test_an_engine_that_is_missing_refuses_crashes_or_hangs_is_one_line_and_exit_2(tiny_fixture, engine, tmp_path, mode, needle):
    out = tmp_path / "o"
    timeout = "3" if mode != "crash-second" else "120"  # that one loads the model first
    r = teacher("-s", str(tiny_fixture.path), "-o", str(out), "--engine", "vllm", "--engine-python", str(engine),
                "--engine-timeout", timeout, *ARGS, mode=mode)
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and needle.format(engine=engine) in r.output, r.output
    assert not out.exists()
    if mode == "crash-second":  # the first block was written and stays for --resume, hidden
        assert len(list((tmp_path / ".o.k2mini-partial").glob("block-*.safetensors"))) == 1


@pytest.mark.parametrize("flags, needle", [
    (["--engine", "layerwise", "--tensor-parallel-size", "2"], "--tensor-parallel-size: only for --engine vllm"),
    (["--engine", "layerwise", "--engine-arg", "a=1"], "--engine-arg: only for --engine vllm"),
    (["--engine", "vllm", "--engine-python", "/nonexistent/python"], "--engine-python /nonexistent/python: not an executable"),
    (["--engine", "vllm", "--max-model-len", "20"], "--max-model-len 20: must be at least --seq-len + 1 = 25"),
    (["--engine", "vllm", "--engine-arg", "no-equals"], "--engine-arg 'no-equals': expected KEY=VALUE"),
    (["--engine", "vllm", "--tensor-parallel-size", "0"], "--tensor-parallel-size 0: must be >= 1"),
    (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5: must be in (0, 1]"),
    (["--engine", "vllm", "--device", "cpu"], "--device/--dtype float32: only for --engine layerwise"),
])
def test_bad_engine_flags_are_one_line_and_exit_2(tiny_fixture, engine, tmp_path, flags, needle):
    out = tmp_path / "o"
    extra = [] if "--engine-python" in flags or "layerwise" in flags else ["--engine-python", str(engine)]
    r = teacher("-s", str(tiny_fixture.path), "-o", str(out), *flags, *extra, *ARGS)
    assert r.exit_code == 2 and needle in r.output and r.output.strip().count("\n") == 0, r.output
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_auto_picks_layerwise_without_vllm_here(tiny_fixture, tmp_path):
    from k2mini.engine.process import vllm_here

    if vllm_here():
        pytest.skip("vllm is installed in this interpreter")
    out = tmp_path / "o"
    r = teacher("-s", str(tiny_fixture.path), "-o", str(out), *ARGS)
    assert r.exit_code == 0, r.output
    assert json.loads((out / MANIFEST).read_text())["compute"]["engine"] == "layerwise"


def test_heal_trains_from_a_cache_without_the_log_sum_exp(caches, tiny_fixture, tmp_path):
    reduced = tmp_path / "reduced"
    r = CliRunner().invoke(cli, ["convert-fast", "-s", str(tiny_fixture.path), "--layers", "3", "--experts", "4", "-o",
                                 str(reduced), "--no-progress"])
    assert r.exit_code == 0, r.output
    res = {}
    for e in ("layerwise", "vllm"):
        r = CliRunner().invoke(cli, ["heal", str(reduced), "--teacher", str(caches[0][e]), "-o", str(tmp_path / f"h-{e}"),
                                     "--method", "router", "--steps", "2", "--batch-size", "2", "--json", "--quiet"])
        assert r.exit_code == 0, r.output
        res[e] = json.loads(r.output)
    # Same sequences, same seed, a teacher equal within float16 rounding: the same held-out KL to 3 digits.
    for key in ("first_eval_kl", "last_eval_kl", "first_loss", "last_loss"):
        assert res["layerwise"][key] == pytest.approx(res["vllm"][key], rel=1e-2), key


def test_agreement_of_the_two_engines_caches(caches):
    """Against a cache itself: perfect. Against the stand-in's: what test_both_caches... pins
    element-wise, summed up (same ids, log-probs within float16 rounding)."""
    from k2mini.teacher.agreement import agreement

    out, _, _ = caches
    lw, vl = TeacherCache(out["layerwise"]), TeacherCache(out["vllm"])
    same = agreement(lw, lw, batch=2)
    assert same["top1_agreement"] == 1.0 and same["mean_abs_dlogp_shared"] == 0.0 and same["max_abs_dtail"] == 0.0
    assert same["shared_ids_per_position"] == 8 and same["positions"] == 120 and same["mean_tail"] > 0.01
    a = agreement(lw, vl, batch=2)
    assert a["top1_agreement"] == 1.0 and a["shared_ids_per_position"] == 8
    assert a["mean_abs_dlogp_shared"] < 2e-3 and a["max_abs_dtail"] < 2e-3
    # The same figures position by position in plain Python, against a perturbed copy.
    x, y = lw.read(range(5)), vl.read(range(5))
    y.topk_logprobs[..., 1] -= 0.01
    y.topk_ids[0, 0] = y.topk_ids[0, 0].flip(0)
    diffs, top1 = [], 0
    for s in range(5):
        for t in range(24):
            db = dict(zip(y.topk_ids[s, t].tolist(), y.topk_logprobs[s, t].tolist()))
            diffs += [abs(v - db[i]) for i, v in zip(x.topk_ids[s, t].tolist(), x.topk_logprobs[s, t].tolist()) if i in db]
            top1 += int(x.topk_ids[s, t, 0] == y.topk_ids[s, t, 0])

    class Fixed:
        sequences, seq_len, path = 5, 24, "perturbed"

        def read(self, idx):
            from k2mini.teacher.cache import TeacherBatch
            idx = list(idx)
            return TeacherBatch(y.input_ids[idx], y.topk_ids[idx], y.topk_logprobs[idx], None)

    p = agreement(lw, Fixed(), batch=2)
    assert p["top1_agreement"] == top1 / 120 == 119 / 120
    assert p["mean_abs_dlogp_shared"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-6) and p["mean_abs_dlogp_shared"] > 1e-3
