"""The source checkpoint is never modified: every command leaves every byte, size, mode and
mtime of every file as it was, adds no file, and refuses to write its output inside it.

The same run proves that no command executes the checkpoint's remote code. A real K2
repository ships Python (configuration_deepseek.py, modeling_deepseek.py,
tokenization_kimi.py) that transformers would run with trust_remote_code=True; here those
files leave a marker file before raising, so an import is detected even if a caller
swallowed the exception, and transformers' remote-code entry points are spied on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from every_command import BUILDS_ITS_OWN_SOURCE, cli_commands, invocations, output_of

from k2mini.cli import cli
from k2mini.testing.fixtures import REMOTE_CODE_FILES


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: sha256 of the bytes, size, mode, mtime_ns (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (digest, st.st_size, st.st_mode, st.st_mtime_ns)
    st = root.lstat()
    out["."] = (None, None, st.st_mode, st.st_mtime_ns)  # a file added and removed again shows here
    return out


@pytest.fixture
def source(tiny_fixture, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_fixture.path, src)
    return src


@pytest.fixture
def remote_code_trap(source, tmp_path, monkeypatch):
    """Arm the source's remote-code files and transformers' remote-code entry points."""
    import transformers.dynamic_module_utils as dmu

    marker = tmp_path / "remote_code_ran"
    for name in REMOTE_CODE_FILES:
        assert (source / name).exists(), name
        (source / name).write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\n"
            'raise RuntimeError("remote code must never be executed")\n'
        )
    assert "modeling_deepseek.DeepseekV3ForCausalLM" in json.loads((source / "config.json").read_text())["auto_map"].values()
    asked: list[object] = []

    def spy_resolve(trust_remote_code, *args, **kwargs):
        asked.append(trust_remote_code)
        return False

    def refuse(*args, **kwargs):
        raise AssertionError(f"remote class requested: {args}")

    monkeypatch.setattr(dmu, "resolve_trust_remote_code", spy_resolve)
    monkeypatch.setattr(dmu, "get_class_from_dynamic_module", refuse)

    def check(command: str) -> None:
        assert not marker.exists(), f"{command} executed {marker.read_text()} from the checkpoint"
        inside = [m for m, mod in list(sys.modules.items()) if str(getattr(mod, "__file__", "") or "").startswith(str(source))]
        assert not inside, f"{command} imported {inside}"
        assert not any(m in sys.modules for m in ("configuration_deepseek", "modeling_deepseek", "tokenization_kimi"))
        assert not any(asked), f"{command} asked transformers for trust_remote_code: {asked}"

    return check


def command_lines(src: Path, out: Path) -> dict[str, list[str]]:
    """Every command of the CLI (tests/every_command.py), plus variants that read differently;
    in order, so that later ones can use earlier outputs."""
    cmds = {"inspect (text)": ["inspect", str(src)]}
    cmds.update(invocations(src, out))
    cmds["convert (no analysis)"] = ["convert", "--source", str(src), "--layers", "2", "--experts", "4",
                                     "-o", str(out / "conv-plain"), "--no-progress"]
    cmds["quantize 8"] = ["quantize", str(src), "--bits", "8", "-o", str(out / "q8"), "--quiet"]
    return cmds


def test_every_cli_command_is_in_the_guarantee_tests(tmp_path):
    assert sorted(invocations(tmp_path, tmp_path)) == cli_commands()


def test_every_command_leaves_the_source_unchanged_and_never_runs_its_code(source, remote_code_trap, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(source)
    assert len(before) >= 12
    results = {}
    for name, args in command_lines(source, out).items():
        r = CliRunner().invoke(cli, args)
        results[name] = r.exit_code
        assert r.exit_code == 0 or (r.exit_code == 2 and isinstance(r.exception, SystemExit)), (name, r.output, r.exception)
        after = snapshot(source)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{name} changed the source: {changed}"
        remote_code_trap(name)
    # Every command must have really run, or the check proves nothing.
    assert all(code == 0 for code in results.values()), results
    assert set(cli_commands()) <= set(results)


# What a writer needs written before it can run (its other inputs).
NEEDS = {"convert": ["analyze"], "heal": ["analyze", "convert", "teacher"], "plan": ["analyze", "teacher"]}
WRITERS = [c for c in cli_commands() if c not in BUILDS_ITS_OWN_SOURCE and c in invocations(Path("s"), Path("o"))
           and output_of(invocations(Path("s"), Path("o"))[c]) is not None]


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("where", ["top", "nested", "via_symlink"])
def test_output_inside_the_source_is_refused(source, tmp_path, name, where):
    if where == "top":
        target = source
    elif where == "nested":
        target = source / "sub" / "deeper"
    else:
        link = tmp_path / "alias"
        os.symlink(source, link)
        target = link / "out"
    pre = tmp_path / "pre"
    cmds = invocations(source, pre)
    for need in NEEDS.get(name, []):
        assert CliRunner().invoke(cli, cmds[need]).exit_code == 0, need
    args = list(cmds[name])
    args[args.index(str(output_of(args)))] = str(target / output_of(args).name)
    before = snapshot(source)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "inside the source" in lines[0], r.stderr
    assert snapshot(source) == before
