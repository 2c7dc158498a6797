"""The source checkpoint is never modified: every command leaves every byte, size, mode and
mtime of every file as it was, adds no file, and refuses to write its output inside it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from k2mini.cli import cli


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


def command_lines(src: Path, out: Path) -> dict[str, list[str]]:
    """Each command that reads a checkpoint, with arguments that make it read (and, where it
    writes, write) for real; in order, so that later ones can use earlier outputs."""
    have = set(cli.commands)
    cmds = {
        "inspect": ["inspect", str(src)],
        "inspect --json": ["inspect", str(src), "--json"],
    }
    if "analyze" in have:
        cmds["analyze"] = ["analyze", "--source", str(src), "-o", str(out / "analysis.json"),
                           "--samples", "2", "--seq-len", "16", "--no-plots", "--quiet", "--weight-norms"]
    if "convert" in have:
        cmds["convert"] = ["convert", "--source", str(src), "--layers", "2", "--experts", "4", "-o", str(out / "conv"),
                           "--no-progress"]
        if "analyze" in have:
            cmds["convert --analysis"] = ["convert", "--source", str(src), "--layers", "3", "--experts", "4",
                                          "--analysis", str(out / "analysis.json"), "-o", str(out / "conv-a"),
                                          "--no-progress"]
    if "convert-fast" in have:
        cmds["convert-fast fp8"] = ["convert-fast", "--source", str(src), "--layers", "2", "--experts", "4",
                                    "--dtype", "fp8", "-o", str(out / "fast")]
    if "quantize" in have:
        cmds["quantize 8"] = ["quantize", str(src), "--bits", "8", "-o", str(out / "q8"), "--quiet"]
        cmds["quantize 4"] = ["quantize", str(src), "--bits", "4", "--group-size", "32", "-o", str(out / "q4"), "--quiet"]
    if "validate" in have and "convert" in have:
        cmds["validate --reference"] = ["validate", str(out / "conv"), "--reference", str(src), "--samples", "1",
                                        "--seq-len", "8", "--max-new-tokens", "2", "--quiet", "--device", "cpu"]
    if "run" in have:
        cmds["run --offload"] = ["run", str(src), "--offload", "--budget", "1MB", "--prompt", "hello", "--max-new-tokens", "2",
                                 "--device", "cpu", "--quiet"]
    return cmds


def test_every_command_leaves_the_source_byte_for_byte_unchanged(source, tmp_path):
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
    # At least the writing commands must have really run, or the check proves nothing.
    assert all(code == 0 for code in results.values()), results


WRITERS = ("analyze", "quantize 8", "convert", "convert-fast fp8")


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
    cmds = command_lines(source, target)
    if name not in cmds:
        pytest.skip(f"{name} is not a command yet")
    before = snapshot(source)
    r = CliRunner().invoke(cli, cmds[name])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "inside the source" in lines[0], r.stderr
    assert snapshot(source) == before
