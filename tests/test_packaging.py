"""A regular (non-editable) wheel holds every module and every data file the code reads, and
the installed package finds its data through importlib.resources, not through the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

import k2mini
from k2mini.resources import config_dir

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "k2mini"
DATA_KINDS = ("gpus", "presets")


def _code_dirs() -> list[Path]:
    dirs = []
    for root, subdirs, files in os.walk(PKG):  # does not follow the configs symlink
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            dirs.append(Path(root))
    return dirs


def test_every_code_directory_is_a_regular_package():
    # setuptools' find (namespaces = false) leaves a directory without __init__.py out of the wheel.
    missing = [str(d.relative_to(REPO)) for d in _code_dirs() if not (d / "__init__.py").is_file()]
    assert not missing, f"no __init__.py in {missing}"
    assert len(_code_dirs()) > 10


def test_data_found_through_the_package_is_the_top_level_configs():
    """One copy: what the package reads is byte for byte configs/<kind>/ at the repo top."""
    for kind in DATA_KINDS:
        packaged = {p.name: p.read_bytes() for p in config_dir(kind).glob("*.json")}
        top = {p.name: p.read_bytes() for p in (REPO / "configs" / kind).glob("*.json")}
        assert packaged and packaged == top, kind
        assert config_dir(kind).resolve().is_relative_to(Path(k2mini.__file__).resolve().parents[1])


def test_package_data_patterns_cover_every_data_file():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["k2mini"]
    for kind in DATA_KINDS:
        for p in (REPO / "configs" / kind).iterdir():
            rel = f"configs/{kind}/{p.name}"
            assert any(fnmatch(rel, pat) for pat in patterns), f"{rel} is not shipped by package-data {patterns}"


@pytest.mark.slow
def test_wheel_holds_all_modules_and_data_and_runs_outside_the_repo(tmp_path):
    # Build from a copy so concurrent runs never share the repo's build/ directory.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "configs", src / "configs")
    shutil.copytree(PKG, src / "k2mini", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = (tmp_path / "whl").glob("k2mini-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    expected = {str(p.relative_to(REPO)) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts and "configs" not in p.parts}
    assert expected - names == set()
    for kind in DATA_KINDS:
        for p in (REPO / "configs" / kind).glob("*.json"):
            assert f"k2mini/configs/{kind}/{p.name}" in names

    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    probe = (
        "import json, k2mini\n"
        "from k2mini.validate.gpus import load_profile, available_profiles\n"
        "from k2mini.convert.presets import load_preset, preset_names\n"
        "print(json.dumps([k2mini.__file__, available_profiles(), preset_names(), load_profile('h100').memory_mib,"
        " load_preset('k2-mini').layers]))\n"
    )
    # Run outside the repo; the unpacked wheel comes first on sys.path, ahead of the editable install.
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    where, gpus, presets, h100, mini_layers = json.loads(r.stdout)
    assert Path(where).is_relative_to(site)
    assert gpus == sorted(p.stem for p in (REPO / "configs" / "gpus").glob("*.json"))
    assert presets == sorted(p.stem for p in (REPO / "configs" / "presets").glob("*.json"))
    assert h100 == json.loads((REPO / "configs" / "gpus" / "h100.json").read_text())["memory_mib"]
    assert mini_layers == json.loads((REPO / "configs" / "presets" / "k2-mini.json").read_text())["layers"]
