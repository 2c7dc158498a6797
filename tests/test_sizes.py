"""One meaning for a size on every flag and variable: a unit without ``i`` is a power of 1000,
with ``i`` a power of 1024 (``8G`` = 8e9 bytes, ``8GiB`` = 8 * 2**30), as pydantic's ByteSize
reads them; the references below are the powers written out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from k2mini.checkpoint.hub import open_source
from k2mini.cli import cli
from k2mini.errors import UsageError
from k2mini.sizes import format_size, parse_size


@pytest.mark.parametrize("text,want", [
    ("5GB", 5 * 10**9), ("5G", 5 * 10**9), ("5 gb", 5 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29),
    ("8K", 8000), ("8KiB", 8192), ("2T", 2 * 10**12), ("1000", 1000), ("1000B", 1000), ("0", 0),
])
def test_units_without_i_are_powers_of_1000_and_with_i_of_1024(text, want):
    assert parse_size(text, flag="--x", minimum=0) == want


@pytest.mark.parametrize("text", ["lots", "8gbit", "8G and more", "8Gi", "-1G", ""])
def test_what_is_not_a_size_is_one_line_naming_the_flag(text):
    with pytest.raises(UsageError, match=r"^--memory-budget .*G = 10\^9 bytes, GiB = 2\^30"):
        parse_size(text, flag="--memory-budget")


def test_a_size_under_the_minimum_is_refused():
    with pytest.raises(UsageError, match="--max-shard-size"):
        parse_size("0", flag="--max-shard-size")


def test_format_uses_the_unit_it_prints():
    assert format_size(5_100_000_000) == "5.10 GB"
    assert format_size(5 * 2**30 + 2**29, binary=True) == "5.50 GiB"
    assert format_size(999) == "999 B" and format_size(1000) == "1.00 KB"
    assert format_size(1023, binary=True) == "1023 B" and format_size(1024, binary=True) == "1.00 KiB"


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_max_shard_size_in_G_is_the_same_layout_as_in_bytes(tiny_fixture, tmp_path):
    def shards(size):
        r = _cli("convert-fast", "-s", tiny_fixture.path, "--layers", "3", "--experts", "4", "--dry-run", "--json",
                 "--max-shard-size", size, "-o", tmp_path / "o")
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["shards"]

    assert shards("0.0003G") == shards("300000") == shards("300KB") == shards("300K")
    assert shards("0.0003GiB") == shards(str(int(0.0003 * 2**30)))
    assert shards("0.0003G") != shards("0.0003GiB")  # 300000 vs 322122 bytes: the tiny layout differs


@pytest.mark.parametrize("command,flag", [
    (["quantize", "{src}", "--bits", "4", "-o", "{out}", "--max-shard-size", "8gbit"], "--max-shard-size"),
    (["convert-fast", "-s", "{src}", "--layers", "3", "--experts", "4", "-o", "{out}", "--max-shard-size", "8gbit"], "--max-shard-size"),
    (["analyze", "-s", "{src}", "-o", "{out}", "--memory-budget", "8gbit"], "--memory-budget"),
    (["teacher", "-s", "{src}", "-o", "{out}", "--memory-budget", "8gbit"], "--memory-budget"),
    (["run", "{src}", "--offload", "--budget", "8gbit", "--prompt", "x"], "--budget"),
    (["run", "{src}", "--offload", "--budget", "8G", "--host-budget", "8gbit", "--prompt", "x"], "--host-budget"),
])
def test_every_size_flag_reads_sizes_the_same_way(tiny_fixture, tmp_path, command, flag):
    r = _cli(*(a.format(src=tiny_fixture.path, out=tmp_path / "o") for a in command))
    assert r.exit_code == 2, r.output
    assert f"{flag} '8gbit'" in r.stderr and "G = 10^9 bytes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_cache_size_variable_reads_sizes_the_same_way(monkeypatch, tmp_path):
    monkeypatch.setenv("K2MINI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("K2MINI_CACHE_SIZE", "8gbit")
    with pytest.raises(UsageError, match="^K2MINI_CACHE_SIZE '8gbit'"):
        open_source("some-org/some-model")
