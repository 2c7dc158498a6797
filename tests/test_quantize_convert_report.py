"""convert --dtype int4 --resume: quantization_report.json still lists every tensor; those in
shards re-used from the interrupted run carry no error (it needs their data), the rest match
an uninterrupted run."""

from __future__ import annotations

import json

from click.testing import CliRunner

from k2mini.cli import cli
from k2mini.quantize.convert_hook import IntConvertTransform


def _convert(src, out, *extra):
    args = ["convert", "-s", src, "--layers", "3", "--experts", "4", "--dtype", "int4-g32",
            "--max-shard-size", "200KB", "--no-progress", "-o", out, *extra]
    return CliRunner().invoke(cli, list(map(str, args)))


def _tensors(d):
    return {t["name"]: t for t in json.loads((d / "quantization_report.json").read_text())["tensors"]}


def test_resumed_one_pass_report_lists_every_tensor(tiny_fixture, tmp_path, monkeypatch):
    r = _convert(tiny_fixture.path, tmp_path / "clean")
    assert r.exit_code == 0, r.output
    clean = _tensors(tmp_path / "clean")
    shards = {f for f in json.loads((tmp_path / "clean" / "model.safetensors.index.json").read_text())["weight_map"].values()}
    assert len(shards) >= 3

    produce = IntConvertTransform.produce
    calls = []

    def failing(self, ck, job):
        calls.append(job.output)
        if len(calls) > len(clean) * 2 // 3:
            raise RuntimeError("injected failure")
        return produce(self, ck, job)

    monkeypatch.setattr(IntConvertTransform, "produce", failing)
    r = _convert(tiny_fixture.path, tmp_path / "o")
    assert isinstance(r.exception, RuntimeError) and not (tmp_path / "o").exists()
    monkeypatch.setattr(IntConvertTransform, "produce", produce)
    r = _convert(tiny_fixture.path, tmp_path / "o", "--resume")
    assert r.exit_code == 0, r.output

    resumed = _tensors(tmp_path / "o")
    assert set(resumed) == set(clean)
    reused = {n for n, t in resumed.items() if t["rel_error"] is None and clean[n]["rel_error"] is not None}
    assert reused, "no shard was re-used"
    for n, t in resumed.items():
        if n in reused:
            assert {**t, "rel_error": None, "max_abs_error": None} == {**clean[n], "rel_error": None, "max_abs_error": None}
        else:
            assert t == clean[n], n
    for name in ("README.md", "config.json"):
        assert (tmp_path / "o" / name).read_text() == (tmp_path / "clean" / name).read_text().replace(
            str(tmp_path / "clean"), str(tmp_path / "o"))
