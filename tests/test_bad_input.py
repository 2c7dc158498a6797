"""Issue 2's bad inputs: each ends in one line naming the file (and the tensor where there is
one), exit code 2, and no traceback unless --debug."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from k2mini.checkpoint.reader import INDEX_FILE, Checkpoint
from k2mini.cli import cli
from k2mini.errors import CheckpointError


@pytest.fixture
def ckpt(tiny_fixture, tmp_path) -> Path:
    """A private copy of the tiny fixture that a test may break."""
    d = tmp_path / "src"
    shutil.copytree(tiny_fixture.path, d)
    return d


def _index(d: Path) -> dict:
    return json.loads((d / INDEX_FILE).read_text())


def _write_index(d: Path, index: dict) -> None:
    (d / INDEX_FILE).write_text(json.dumps(index))


def _shard_of(d: Path, tensor: str) -> str:
    return _index(d)["weight_map"][tensor]


def _inspect(d: Path, *extra: str):
    return CliRunner().invoke(cli, [*extra, "inspect", str(d)])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("k2mini: error: ")
    assert "Traceback" not in result.output
    return lines[0]


# Each breaker damages the copy and returns the fragments the error line must contain.
WEIGHT = "model.layers.2.mlp.experts.5.up_proj.weight"


def _missing_index(d):
    os.remove(d / INDEX_FILE)
    return [str(d), INDEX_FILE]


def _missing_shard(d):
    shard = _shard_of(d, WEIGHT)
    os.remove(d / shard)
    some_tensor = next(k for k, v in _index(d)["weight_map"].items() if v == shard)
    return [shard, "is missing", some_tensor]


def _listed_but_absent(d):
    idx = _index(d)
    shard = idx["weight_map"][WEIGHT]
    idx["weight_map"]["model.layers.1.mlp.experts.0.phantom.weight"] = shard
    _write_index(d, idx)
    return ["model.layers.1.mlp.experts.0.phantom.weight", shard, "absent"]


def _truncated(d):
    shard = _shard_of(d, WEIGHT)
    p = d / shard
    os.truncate(p, p.stat().st_size - 1000)
    # The tensor that ends last in the shard is the one cut short.
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    header = json.loads(p.read_bytes()[8 : 8 + n])
    last = max((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")[1]
    return [shard, "truncated", last]


def _overwrite_weight_shard(d, offset: int, data: bytes) -> str:
    """Overwrite bytes of the shard holding WEIGHT in place; its name."""
    shard = _shard_of(d, WEIGHT)
    with open(d / shard, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return shard


def _corrupt_header(d):
    return [_overwrite_weight_shard(d, 20, b"\xff" * 10), "not UTF-8"]


def _header_not_json(d):
    return [_overwrite_weight_shard(d, 8, b"["), "JSON"]  # over the header's opening brace


def _oversized_header(d):
    return [_overwrite_weight_shard(d, 0, struct.pack("<Q", 1 << 40)), "header length", str(1 << 40)]


def _header_longer_than_file(d):
    size = (d / _shard_of(d, WEIGHT)).stat().st_size
    return [_overwrite_weight_shard(d, 0, struct.pack("<Q", size)), "truncated"]  # plausible, but runs past the end


def _escape_dotdot(d):
    idx = _index(d)
    idx["weight_map"]["model.norm.weight"] = "../outside.safetensors"
    _write_index(d, idx)
    return [INDEX_FILE, "../outside.safetensors", "outside the checkpoint directory"]


def _escape_absolute(d):
    idx = _index(d)
    idx["weight_map"]["model.norm.weight"] = "/etc/passwd"
    _write_index(d, idx)
    return [INDEX_FILE, "/etc/passwd", "outside the checkpoint directory"]


def _escape_symlink(d):
    shard = _shard_of(d, WEIGHT)
    outside = d.parent / "elsewhere.safetensors"
    shutil.move(d / shard, outside)
    os.symlink(outside, d / shard)
    return [shard, str(outside), "outside the checkpoint directory"]


def _missing_config(d):
    os.remove(d / "config.json")
    return ["config.json is missing", str(d)]


def _config_not_json(d):
    (d / "config.json").write_text('{"hidden_size": 64,')
    return ["config.json", "not valid JSON"]


def _index_without_weight_map(d):
    _write_index(d, {"metadata": {}})
    return [INDEX_FILE, "weight_map"]


BREAKERS = {
    f.__name__.lstrip("_"): f
    for f in (
        _missing_index,
        _missing_shard,
        _listed_but_absent,
        _truncated,
        _corrupt_header,
        _header_not_json,
        _oversized_header,
        _header_longer_than_file,
        _escape_dotdot,
        _escape_absolute,
        _escape_symlink,
        _missing_config,
        _config_not_json,
        _index_without_weight_map,
    )
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_gives_one_line_naming_the_file_and_exit_2(ckpt, case):
    fragments = BREAKERS[case](ckpt)
    line = _one_line_error(_inspect(ckpt))
    for frag in fragments:
        assert frag in line, (frag, line)


@pytest.mark.parametrize("case", ["truncated", "escape_symlink"])
def test_debug_shows_the_traceback(ckpt, case):
    BREAKERS[case](ckpt)
    result = _inspect(ckpt, "--debug")
    assert isinstance(result.exception, CheckpointError)


def test_a_real_process_prints_no_traceback(ckpt):
    """CliRunner catches exceptions itself; check the installed console script end to end."""
    fragments = _truncated(ckpt)
    r = subprocess.run([sys.executable, "-m", "k2mini.cli", "inspect", str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert all(f in r.stderr for f in fragments)


# -- problems that inspect reports (a checkpoint that opens but is inconsistent) ---------


def _rewrite_tensor(d: Path, name: str, new: torch.Tensor | None) -> str:
    shard = _shard_of(d, name)
    tensors = load_file(d / shard)
    if new is None:
        del tensors[name]
        idx = _index(d)
        del idx["weight_map"][name]
        _write_index(d, idx)
    else:
        tensors[name] = new
    save_file(tensors, d / shard, metadata={"format": "pt"})
    return shard


def _problem_lines(result) -> list[str]:
    return [line.strip()[2:] for line in result.output.splitlines() if line.startswith("  - ")]


def test_fp8_weight_without_scale_is_named_with_its_shard(ckpt):
    scale = WEIGHT + "_scale_inv"
    _rewrite_tensor(ckpt, scale, None)
    shard = _shard_of(ckpt, WEIGHT)
    result = _inspect(ckpt)
    assert result.exit_code == 2
    assert any(WEIGHT in p and shard in p and "has no" in p and scale in p for p in _problem_lines(result)), result.output
    # Reading that weight is refused with one message naming the weight, its shard and the scale.
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(ckpt).read(WEIGHT)
    assert WEIGHT in str(e.value) and shard in str(e.value) and scale in str(e.value)


def test_scale_grid_not_matching_the_weight_is_named(ckpt):
    scale = WEIGHT + "_scale_inv"
    ck = Checkpoint.open(ckpt)
    good = ck.info(scale).shape
    bad = torch.ones(good[0] + 1, good[1], dtype=torch.float32)
    shard = _rewrite_tensor(ckpt, scale, bad)
    result = _inspect(ckpt)
    assert result.exit_code == 2
    lines = [p for p in _problem_lines(result) if scale in p and shard in p]
    assert lines and str(list(bad.shape)) in lines[0] and str(list(good)) in lines[0], result.output
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(ckpt).read(WEIGHT)
    assert scale in str(e.value) and WEIGHT in str(e.value) and shard in str(e.value)


def test_scale_of_the_wrong_dtype_is_named(ckpt):
    scale = WEIGHT + "_scale_inv"
    good = Checkpoint.open(ckpt).read_raw(scale)
    shard = _rewrite_tensor(ckpt, scale, good.to(torch.bfloat16))
    result = _inspect(ckpt)
    assert result.exit_code == 2
    assert any(scale in p and shard in p and "F32" in p for p in _problem_lines(result)), result.output


def test_a_newline_in_a_tensor_name_cannot_split_the_error_line(ckpt):
    idx = _index(ckpt)
    idx["weight_map"]["evil\nk2mini: error: forged"] = idx["weight_map"][WEIGHT]
    _write_index(ckpt, idx)
    line = _one_line_error(_inspect(ckpt))
    assert "absent" in line
