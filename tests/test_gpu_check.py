"""scripts/gpu_check.py on CPU: steps run through the CLI, their figures come from the
commands' own outputs, and the first failing step stops the run and is named."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)  # the script must find its own checkout without it
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def _tensor_bytes(shard: Path) -> int:
    """Sum of the tensors' byte spans, read from the safetensors header (its own format, not our reader)."""
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")


def _flag(command: str, name: str) -> str:
    argv = shlex.split(command)
    return argv[argv.index(name) + 1]


def test_cpu_small_steps_run_with_their_dependencies_and_report_the_commands_figures(tmp_path):
    work = tmp_path / "work"
    r = _run("--device", "cpu", "--size", "small", "--work", str(work), "--steps", "convert-fp8", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads(r.stdout)
    assert table == json.loads((work / "gpu_check.json").read_text())
    assert table["ok"] and table["failed_step"] is None and table["dependency_problems"] == []
    # --steps convert-fp8 pulls in what it needs, in pipeline order, and nothing else.
    assert [s["name"] for s in table["steps"]] == ["fixture", "analyze", "convert-fp8"]
    steps = {s["name"]: s for s in table["steps"]}
    assert all(s["ok"] and s["wall_s"] > 0 and s["peak_rss_bytes"] > 0 and s["peak_cuda_bytes"] is None for s in steps.values())

    config = json.loads((work / "source" / "config.json").read_text())
    assert steps["fixture"]["figures"]["layers"] == config["num_hidden_layers"]
    an = steps["analyze"]
    tokens = int(_flag(an["command"], "--samples")) * int(_flag(an["command"], "--seq-len"))
    assert an["figures"]["tokens"] == tokens
    assert an["figures"]["tok_per_s"] == pytest.approx(tokens / an["wall_s"], rel=0.02)
    assert an["figures"]["moe_layers"] == config["num_hidden_layers"] - config["first_k_dense_replace"]
    fp8 = steps["convert-fp8"]
    assert fp8["figures"]["dtype"] == "fp8"
    assert fp8["figures"]["bytes_written"] == sum(_tensor_bytes(p) for p in (work / "fp8").glob("*.safetensors"))
    # Each step's stderr is kept; the human table went to stderr with --json.
    assert "--dtype fp8" in (work / "logs" / "convert-fp8.log").read_text()
    assert "convert-fp8      ok" in r.stderr


def test_a_failing_step_stops_the_run_with_exit_1_naming_the_step_and_the_commands_error(tmp_path, tiny_fixture):
    source = tmp_path / "broken"
    shutil.copytree(tiny_fixture.path, source)
    shard = sorted(source.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(1000)
    work = tmp_path / "work"
    r = _run("--device", "cpu", "--work", str(work), "--source", str(source), "--steps", "convert-fp8", "--json")
    assert r.returncode == 1
    table = json.loads(r.stdout)
    assert not table["ok"] and table["failed_step"] == "analyze"
    # analyze is the first step with --source; convert-fp8 after it never ran.
    assert [s["name"] for s in table["steps"]] == ["analyze"]
    err = table["steps"][0]["error"]
    assert err.startswith("exit 2:") and shard.name in err and "truncated" in err
    assert "step analyze failed" in r.stderr
    assert not (work / "fp8").exists()


def test_bad_input_is_refused_with_exit_2_before_anything_runs(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not the script's")
    r = _run("--work", str(foreign))
    assert r.returncode == 2 and "was not made by this script" in r.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
    r = _run("--work", str(tmp_path / "w"), "--steps", "analyze,nope")
    assert r.returncode == 2 and "--steps nope: not a step" in r.stderr
    assert not (tmp_path / "w").exists()


def test_preflight_names_missing_and_out_of_range_dependencies(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    real = metadata.version

    def version(name):
        if name == "pydantic":
            raise metadata.PackageNotFoundError(name)
        return "1.33.0" if name == "huggingface_hub" else real(name)

    monkeypatch.setattr(metadata, "version", version)
    problems = gpu_check.preflight()
    assert any(p.startswith("missing: pydantic") for p in problems)
    assert "outside the range: huggingface_hub 1.33.0 (pyproject: huggingface_hub>=2.0,<3)" in problems
    assert len(problems) == 2  # everything else installed here is inside pyproject's ranges


def test_a_dependency_the_machine_lacks_fails_the_first_step_named_not_the_script(tmp_path):
    # As on a GPU machine without pydantic: the import error belongs to the step that needed it.
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "pydantic.py").write_text("raise ModuleNotFoundError(\"No module named 'pydantic'\", name='pydantic')\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    r = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "w"), "--steps", "fixture", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    table = json.loads(r.stdout)
    assert table["failed_step"] == "fixture"
    assert table["steps"][0]["error"].startswith("exit 1:") and "No module named 'pydantic'" in table["steps"][0]["error"]
