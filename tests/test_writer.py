"""Sharded writer and output directory: layout, round trip through safetensors, resume,
determinism, locking and preflight refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from k2mini.checkpoint.safetensors_format import PlannedTensor
from k2mini.checkpoint.writer import INDEX_FILE, JOURNAL_FILE, WriteUnit, write_sharded
from k2mini.errors import UsageError
from k2mini.output import OutputDir, check_output, lock_path, partial_dir


def _units(n=6, rows=16, calls=None):
    out = []
    for i in range(n):
        def produce(i=i):
            if calls is not None:
                calls.append(i)
            g = torch.Generator().manual_seed(i)
            return [torch.randn(rows, 8, generator=g).to(torch.bfloat16), torch.full((2,), float(i))]
        out.append(WriteUnit((PlannedTensor(f"t{i}.weight", "BF16", (rows, 8)), PlannedTensor(f"t{i}.s", "F32", (2,))), produce))
    return out


def _expected(n=6, rows=16):
    d = {}
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        d[f"t{i}.weight"] = torch.randn(rows, 8, generator=g).to(torch.bfloat16)
        d[f"t{i}.s"] = torch.full((2,), float(i))
    return d


def test_shards_by_bytes_roundtrip_and_index(tmp_path):
    # Each unit is 16*8*2 + 8 = 264 bytes; a 600-byte limit holds two units per shard.
    res = write_sharded(tmp_path, _units(), max_shard_bytes=600)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    idx = json.loads((tmp_path / INDEX_FILE).read_text())
    assert idx["metadata"]["total_size"] == 6 * 264
    loaded = {}
    for f in names:
        part = load_file(tmp_path / f)  # the reference safetensors library reads our shards
        assert all(idx["weight_map"][k] == f for k in part)
        loaded.update(part)
    exp = _expected()
    assert loaded.keys() == exp.keys()
    for k in exp:
        assert torch.equal(loaded[k], exp[k])
    assert res.total_size == 6 * 264 and res.reused_shards == []


def test_resume_reuses_checked_shards_and_is_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_sharded(a, _units(), max_shard_bytes=600, key="k")

    # Interrupted run: the producer of unit 4 (third shard) dies.
    def boom():
        raise KeyboardInterrupt
    units = _units()
    units[4] = WriteUnit(units[4].tensors, boom)
    with pytest.raises(KeyboardInterrupt):
        write_sharded(b, units, max_shard_bytes=600, key="k")
    assert not (b / INDEX_FILE).exists()
    calls: list[int] = []
    res = write_sharded(b, _units(calls=calls), max_shard_bytes=600, key="k", resume=True)
    assert res.reused_shards == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
    assert calls == [4, 5]  # producers of reused shards were not called
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_resume_rejects_damaged_shard_and_other_key(tmp_path):
    write_sharded(tmp_path, _units(), max_shard_bytes=600, key="k")
    shard = tmp_path / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    calls: list[int] = []
    write_sharded(tmp_path, _units(calls=calls), max_shard_bytes=600, key="k", resume=True)
    assert calls == [2, 3]  # only the damaged shard was rewritten
    calls.clear()
    write_sharded(tmp_path, _units(calls=calls), max_shard_bytes=600, key="other", resume=True)
    assert calls == list(range(6))


def test_output_dir_commit_lock_and_refusals(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="inside the source"):
        check_output(src / "out", source=src)
    with pytest.raises(UsageError, match="inside the source"):
        check_output(src, source=src)
    out = tmp_path / "out"
    with OutputDir(out, source=src) as od:
        (od.partial / "x").write_text("1")
        assert not out.exists()
        with pytest.raises(UsageError, match="another k2mini run"):
            OutputDir(out, source=src).__enter__()
        od.commit()
    assert (out / "x").read_text() == "1"
    assert not partial_dir(out).exists() and not lock_path(out).exists()
    with pytest.raises(UsageError, match="not empty.*--overwrite"):
        check_output(out)
    with pytest.raises(UsageError, match="not enough free disk"):
        check_output(tmp_path / "o2", planned_bytes=1 << 62)
    assert not (tmp_path / "o2").exists()
    with OutputDir(out, overwrite=True) as od:
        (od.partial / "y").write_text("2")
        od.commit()
    assert sorted(os.listdir(out)) == ["y"]


def test_interrupted_output_leaves_only_partial(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputDir(out) as od:
            write_sharded(od.partial, _units(), max_shard_bytes=600)
            raise RuntimeError("killed")
    assert not out.exists()
    assert (partial_dir(out) / JOURNAL_FILE).exists()
    with OutputDir(out, resume=True) as od:
        assert od.resumed
        res = write_sharded(od.partial, _units(), max_shard_bytes=600, resume=True)
        od.commit()
    assert len(res.reused_shards) == 3
    assert not (out / JOURNAL_FILE).exists()
