"""Disk and memory running out: a free-disk preflight before anything is written, and a full
disk (ENOSPC) or MemoryError in the middle of a run ends in one line and exit code 2, with
nothing at the output path that looks finished. Failures are injected by monkeypatching the
write and read paths (no small filesystem is available to fill for real)."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from every_command import cli_commands, invocations, output_of

from k2mini import output as output_mod
from k2mini.checkpoint import safetensors_format
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.errors import UsageError
from k2mini.teacher import cache as teacher_cache

Usage = namedtuple("Usage", "total used free")


def _one_line(result, *fragments: str) -> str:
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("k2mini: error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _nothing_finished_at(out: Path) -> None:
    """The output path is absent or empty; a partial directory may remain, hidden and named so."""
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    for p in out.parent.iterdir() if out.parent.exists() else ():
        assert p.name.startswith(".") or p.name != out.name


# -- free-disk preflight ---------------------------------------------------------------


def test_preflight_refuses_when_planned_bytes_exceed_free_space(tmp_path, monkeypatch):
    out = tmp_path / "new" / "out"
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(UsageError) as e:
        output_mod.check_output(out, planned_bytes=5 * 10**9)
    msg = str(e.value)
    assert str(out) in msg and "free" in msg and "5.07 GB" in msg and "1.00 GB" in msg, msg  # 5e9 + the 64 MiB margin
    assert not out.exists() and not out.parent.exists()  # checked before anything is created
    # The same numbers with room to spare pass (64 MiB margin included).
    output_mod.check_output(out, planned_bytes=10**9 - 2 * 2**26)


def test_preflight_counts_what_a_resumed_run_already_wrote(tmp_path, monkeypatch):
    out = tmp_path / "out"
    part = output_mod.partial_dir(out)
    part.mkdir()
    (part / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    free = 2**26 + 1000  # the margin plus less than the whole plan
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: Usage(10**12, 0, free))
    with pytest.raises(UsageError):
        output_mod.check_output(out, planned_bytes=5000)
    output_mod.check_output(out, planned_bytes=5000, resume=True)  # 4096 bytes are already there


def test_convert_preflight_from_the_command_line(tiny_fixture, tmp_path, monkeypatch):
    out = tmp_path / "conv"
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: Usage(10**12, 10**12, 1000))
    r = CliRunner().invoke(cli, ["convert", "--source", str(tiny_fixture.path), "--layers", "2", "--experts", "4",
                                 "-o", str(out)])
    _one_line(r, str(out), "free")
    assert not out.exists() and not output_mod.partial_dir(out).exists() and not output_mod.lock_path(out).exists()


def test_convert_preflight_asks_for_what_the_output_really_takes(tiny_fixture, tmp_path, monkeypatch):
    """The planned bytes the command checks against free space cover the shards it then
    writes (headers included) and exceed the whole output by at most the 1 MiB allowance."""
    asked: list[int] = []
    real = output_mod.check_output

    def spy(out, **kw):
        asked.append(kw.get("planned_bytes", 0))
        return real(out, **kw)

    monkeypatch.setattr(output_mod, "check_output", spy)
    out = tmp_path / "conv"
    r = CliRunner().invoke(cli, ["convert", "--source", str(tiny_fixture.path), "--layers", "2", "--experts", "4",
                                 "--max-shard-size", "256KB", "--no-progress", "-o", str(out)])
    assert r.exit_code == 0, r.output
    shards = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    everything = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    planned = {b for b in asked if b}  # an early check before planning passes 0
    assert len(planned) == 1, asked
    need = planned.pop()
    assert shards <= need <= everything + 2**20, (shards, need, everything)


# -- running out in the middle of a run --------------------------------------------------


class Nth:
    """Fail the Nth call of a function with ``exc``; count calls either way."""

    def __init__(self, fn, n: int, exc):
        self.fn, self.n, self.exc, self.calls = fn, n, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise self.exc(args)
        return self.fn(*args, **kwargs)


def _enospc(args):
    f = getattr(args[0], "name", None) if args else None
    return OSError(errno.ENOSPC, "No space left on device", f)


# What each command needs written before it runs (its other inputs), and the commands a
# failure injected at a point cannot reach, with the reason; every other command of the CLI
# must end in one line when it fails there.
NEEDS = {"convert": ["analyze"], "validate": ["analyze", "convert"], "heal": ["analyze", "convert", "teacher"],
         "plan": ["analyze", "teacher"]}
WRITES_NO_SHARD = {
    "inspect": "writes nothing",
    "validate": "writes nothing",
    "run": "writes nothing",
    "analyze": "writes JSON and its state, not shards (test_disk_full_while_analyze_saves_its_state_is_one_line)",
    "plan": "writes a plan.json and a PNG, not shards",
}
READS_NO_TENSOR = {
    "inspect": "reads headers only",
    "fixture": "builds its tensors, reads none",
}


def _prepared(src: Path, tmp_path: Path, command: str) -> tuple[list[str], Path | None]:
    """The command's invocation with its inputs written first (no fault installed yet)."""
    cmds = invocations(src, tmp_path / "o")
    assert command in cmds, f"{command}: add it to tests/every_command.py"
    for need in NEEDS.get(command, []):
        r = CliRunner().invoke(cli, cmds[need])
        assert r.exit_code == 0, (need, r.output)
    return cmds[command], output_of(cmds[command])


@pytest.mark.parametrize("command", [c for c in cli_commands() if c not in WRITES_NO_SHARD])
def test_disk_full_while_writing_a_shard_is_one_line(tiny_fixture, tmp_path, monkeypatch, command):
    args, out = _prepared(tiny_fixture.path, tmp_path, command)
    calls = [0]

    def failing(fn):  # the second tensor or teacher block written fails, whichever writes it
        def write(*a, **k):
            calls[0] += 1
            if calls[0] == 2:
                raise _enospc(a)
            return fn(*a, **k)
        return write

    monkeypatch.setattr(safetensors_format, "_write_tensor", failing(safetensors_format._write_tensor))
    monkeypatch.setattr(teacher_cache, "write_file", failing(teacher_cache.write_file))
    r = CliRunner().invoke(cli, args)
    assert calls[0] >= 2, "the failure was not reached"
    line = _one_line(r, "No space left on device", "free some space")
    assert ".safetensors" in line or ".tmp" in line  # names the file being written (teacher: its temporary name)
    _nothing_finished_at(out)


@pytest.mark.parametrize("command", [c for c in cli_commands() if c not in READS_NO_TENSOR])
def test_memory_error_while_reading_tensors_is_one_line(tiny_fixture, tmp_path, monkeypatch, command):
    args, out = _prepared(tiny_fixture.path, tmp_path, command)
    hook = Nth(Checkpoint.read_raw, 3, lambda a: MemoryError())
    monkeypatch.setattr(Checkpoint, "read_raw", lambda self, *a, **k: hook(self, *a, **k))
    r = CliRunner().invoke(cli, args)
    assert hook.calls >= 3, "the failure was not reached"
    _one_line(r, "out of memory")
    if out is None:
        return
    if out.suffix == ".json":
        assert not out.exists()
    else:
        _nothing_finished_at(out)


def test_the_exemptions_name_commands_that_exist():
    assert set(WRITES_NO_SHARD) | set(READS_NO_TENSOR) <= set(cli_commands())


def test_disk_full_while_analyze_saves_its_state_is_one_line(tiny_fixture, tmp_path, monkeypatch):
    out = tmp_path / "a.json"
    hook = Nth(torch.save, 2, lambda a: OSError(errno.ENOSPC, "No space left on device", str(a[1])))
    monkeypatch.setattr(torch, "save", hook)
    r = CliRunner().invoke(cli, ["analyze", "--source", str(tiny_fixture.path), "-o", str(out),
                                 "--samples", "2", "--seq-len", "16", "--no-plots", "--quiet"])
    assert hook.calls == 2
    _one_line(r, "No space left on device", "state")
    assert not out.exists()


def test_debug_keeps_the_traceback_for_machine_errors(tiny_fixture, tmp_path, monkeypatch):
    hook = Nth(safetensors_format._write_tensor, 1, _enospc)
    monkeypatch.setattr(safetensors_format, "_write_tensor", hook)
    r = CliRunner().invoke(cli, ["--debug", "quantize", str(tiny_fixture.path), "--bits", "8",
                                 "-o", str(tmp_path / "q"), "--quiet"])
    assert isinstance(r.exception, OSError) and r.exception.errno == errno.ENOSPC


def test_permission_denied_output_is_one_line(tiny_fixture, tmp_path, monkeypatch):
    """Another OSError from the machine (here: mkdir refused) gets the same one-line treatment."""
    real_mkdir = Path.mkdir

    def refuse(self, *a, **k):
        if "locked" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "locked" / "q"
    r = CliRunner().invoke(cli, ["quantize", str(tiny_fixture.path), "--bits", "8", "-o", str(out), "--quiet"])
    _one_line(r, "Permission denied", "locked")
    assert not shutil.os.path.exists(out)
