"""validate --engine: the comparison against figures known by construction, and the whole
path (subprocess, request and result files, one line per outcome, exit status) against a
stand-in vLLM written here: a package named vllm whose LLM computes with transformers in
float32, or refuses, or is missing, or crashes. The real vLLM runs in scripts/serving_check.py."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from k2mini.cli import cli
from k2mini.validate.engines import compare, disagreements
from fake_vllm import make_engine_python

SMALL = ["--samples", "2", "--seq-len", "24", "--max-new-tokens", "4", "--quiet", "--gpu", "none", "--skip", "scan"]

# -- the comparison, on log-probs made up here ------------------------------------------------


def _case(offset: float = 0.0):
    g = torch.Generator().manual_seed(0)
    prompts = [[3, 9, 4, 7, 1], [5, 2, 8]]
    greedy = [[2, 6], [0, 4, 4]]
    ref, lps = [], []
    for p, gen in zip(prompts, greedy):
        r = torch.randn(len(p) + len(gen) - 1, 10, generator=g, dtype=torch.float64).log_softmax(-1)
        for k, tok in enumerate(gen):  # make each engine token the reference's argmax
            r[len(p) - 1 + k, tok] = r[len(p) - 1 + k].max() + 1.0
        r = r.log_softmax(-1)
        ref.append(r)
        lps.append([None] + [float(r[t - 1, p[t]]) + offset for t in range(1, len(p))])
    return prompts, lps, greedy, ref


def test_identical_results_agree_exactly():
    prompts, lps, greedy, ref = _case()
    f = compare(prompts, lps, greedy, ref)
    assert f == {"tokens_compared": 6, "max_abs_logprob_diff": 0.0, "mean_abs_logprob_diff": 0.0, "greedy_steps": 5,
                 "greedy_identical": 5, "greedy_worst_gap": 0.0}
    assert disagreements("vllm", f, 0.01) == []


def test_logprobs_off_by_more_than_the_tolerance_fail():
    prompts, lps, greedy, ref = _case(offset=0.02)
    f = compare(prompts, lps, greedy, ref)
    assert f["mean_abs_logprob_diff"] == pytest.approx(0.02) and f["max_abs_logprob_diff"] == pytest.approx(0.02)
    [e] = disagreements("vllm", f, 0.01)
    assert e.check == "engine.vllm.logprobs" and e.severity == "error" and "0.02" in e.message
    assert disagreements("vllm", f, 0.03) == []


def test_a_greedy_token_ranked_clearly_lower_fails_and_a_near_tie_does_not():
    prompts, lps, greedy, ref = _case(offset=0.0)
    lps[0][2] += 0.05  # the run's largest prompt log-prob difference: 0.05
    row = ref[1][len(prompts[1]) - 1 + 1]  # the second generated token of prompt 1
    best = int(row.argmax())
    other = int(row.argsort()[-2])
    for gap, fails in ((0.04, False), (0.3, True)):
        r = [t.clone() for t in ref]
        r[1][len(prompts[1])] = row
        r[1][len(prompts[1]), other] = row[best] - gap
        g = [list(x) for x in greedy]
        g[1][1] = other
        f = compare(prompts, lps, g, r)
        assert f["greedy_identical"] == 4 and f["greedy_worst_gap"] == pytest.approx(gap)
        errs = disagreements("vllm", f, 0.01)
        assert [e.check for e in errs] == (["engine.vllm.greedy"] if fails else []), gap


# -- the whole path, against a stand-in vLLM ----------------------------------------------------

FAKE_VLLM = '''
class _Lp:
    def __init__(self, v):
        self.logprob = v

class _Out:
    def __init__(self, token_ids):
        self.token_ids = token_ids

class _Req:
    def __init__(self, prompt_logprobs, token_ids):
        self.prompt_logprobs = prompt_logprobs
        self.outputs = [_Out(token_ids)]

class LLM:
    def __init__(self, model, **kw):
        fail_as_asked()
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype="float32").eval()

    def generate(self, prompts, params, use_tqdm=True):
        import torch
        outs = []
        with torch.no_grad():
            for p in prompts:
                ids = list(p["prompt_token_ids"])
                lp = self.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
                plp = [None] + [{ids[t]: _Lp(float(lp[t - 1, ids[t]]))} for t in range(1, len(ids))]
                seq = list(ids)
                for _ in range(params.max_tokens):
                    seq.append(int(self.model(torch.tensor([seq])).logits[0, -1].argmax()))
                outs.append(_Req(plp, seq[len(ids):]))
        return outs
'''


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An executable standing in for a venv's python (tests/fake_vllm.py)."""
    return make_engine_python(tmp_path_factory.mktemp("fake-engine"), FAKE_VLLM)


@pytest.fixture(scope="module")
def output(tiny_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("veng") / "out"
    r = CliRunner().invoke(cli, ["convert-fast", "-s", str(tiny_fixture.path), "--layers", "3", "--experts", "4",
                                 "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def validate(output, engine, mode, *extra):
    os.environ["FAKE_VLLM_MODE"] = mode
    try:
        return CliRunner().invoke(cli, ["validate", str(output), *SMALL, "--engine", "vllm", "--engine-python",
                                        str(engine), *extra])
    finally:
        del os.environ["FAKE_VLLM_MODE"]


def engine_line(text: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.startswith("engine vllm")]
    return line


def test_served_and_agreeing_passes_with_the_figures_in_the_json(output, engine, tmp_path):
    r = validate(output, engine, "serve", "--report", str(tmp_path / "r.json"))
    assert r.exit_code == 0, r.output
    line = engine_line(r.output)
    assert line.startswith("engine vllm 0.0-fake: served; prompt log-probs vs transformers: mean |diff| 0.0000")
    assert "greedy tokens 8/8 identical" in line
    [e] = json.loads((tmp_path / "r.json").read_text())["engines"]
    assert e["status"] == "served" and e["tokens_compared"] == 2 * 23 and e["greedy_steps"] == 8
    assert e["max_abs_logprob_diff"] < 1e-4 and e["python"] == str(engine) and e["findings"] == []


def test_refused_names_the_engines_reason_and_fails(output, engine):
    r = validate(output, engine, "refuse")
    assert r.exit_code == 1, r.output
    line = engine_line(r.output)
    assert line == ("engine vllm 0.0-fake: refused: ValueError: CPUFp8BlockScaledMMKernel requires AMX tile support "
                    "(Sapphire Rapids or newer). (raised as RuntimeError: Engine core initialization failed)")
    assert "ERROR: --engine vllm was asked for and vllm 0.0-fake cannot run this output" in r.output
    assert "Traceback" not in r.output and r.output.rstrip().endswith("FAIL")


@pytest.mark.parametrize("mode,needle", [("crash", "the engine process exited with code 9 before reporting"),
                                         ("hang", "did not finish within 3 s (--engine-timeout)")])
def test_a_crashed_or_hung_engine_is_a_refusal_in_one_line(output, engine, mode, needle):
    r = validate(output, engine, mode, "--engine-timeout", "3")
    assert r.exit_code == 1, r.output
    assert needle in engine_line(r.output) and "Traceback" not in r.output


def test_not_installed_is_a_warning_not_a_failure(output, engine):
    r = validate(output, engine, "broken")
    assert r.exit_code == 0, r.output
    assert engine_line(r.output) == (f"engine vllm: not installed (vllm does not import in {engine}: ImportError: "
                                     "operator torchvision::nms does not exist)")



def test_the_default_interpreter_is_this_one(output):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    r = CliRunner().invoke(cli, ["validate", str(output), *SMALL, "--engine", "vllm"])
    assert r.exit_code == 0, r.output
    assert engine_line(r.output).startswith(f"engine vllm: not installed (no vllm in this interpreter ({sys.executable})")


@pytest.mark.parametrize("flags,needle", [
    (["--engine", "vllm", "--engine-python", "/nonexistent/python"], "--engine-python /nonexistent/python: not an executable"),
    (["--engine-python", sys.executable], "--engine-python needs --engine"),
    (["--engine", "vllm", "--skip", "run"], "--engine compares with the run check"),
])
def test_bad_engine_flags_one_line_exit_2(output, flags, needle):
    r = CliRunner().invoke(cli, ["validate", str(output), "--gpu", "none", *flags])
    assert r.exit_code == 2 and needle in r.output and r.output.strip().count("\n") <= 1, r.output


def test_mla_presets_have_k2s_attention_head_dims(tmp_path):
    """What vLLM's CPU MLA kernel needs (docs/facts.md §8), copied from Kimi-K2's own config; the
    grouped preset loads in transformers with the logits of the model it was made from."""
    from pathlib import Path

    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.model.hf import load_checkpoint_model
    from k2mini.testing import build_fixture
    from k2mini.testing.fixtures import PRESETS, k2_config

    k2 = json.loads((Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json").read_text())
    for preset, groups in (("mla", (1, 1)), ("mla-grouped", (4, 2))):
        cfg = k2_config(PRESETS[preset])
        for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            assert cfg[key] == k2[key], (preset, key)
        assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576
        assert (cfg["n_group"], cfg["topk_group"]) == groups
        assert cfg["hidden_size"] <= 256 and cfg["hidden_size"] % 128 == 0
    fx = build_fixture(tmp_path / "mla-grouped", "mla-grouped", keep_model=True)
    x = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        got = load_checkpoint_model(Checkpoint.open(fx.path), dtype=torch.float32)(x).logits
        assert torch.equal(got, fx.model(x).logits)
