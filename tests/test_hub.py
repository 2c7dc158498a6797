"""Reading a checkpoint from the Hub by byte ranges, against a loopback stand-in for the Hub.

huggingface_hub is pointed at tests/hub_server.py through its endpoint setting; every socket
connection that is not to 127.0.0.1 fails the test. References are the fixture's bytes on
disk and the server's own count of bytes it sent.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants

from k2mini.checkpoint import hub as hubmod
from k2mini.checkpoint.hub import HubSource, RangeCache, open_source, parse_repo_location
from k2mini.checkpoint.reader import _HEADER_PROBE, Checkpoint
from k2mini.checkpoint.source import LocalSource
from k2mini.cli import cli
from k2mini.errors import CheckpointError
from k2mini.testing import build_fixture

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as h:
        yield h


@pytest.fixture
def fake_hub(hub, tiny_fixture, monkeypatch, tmp_path):
    """huggingface_hub aimed at the loopback server, a fresh HF_HOME, and no other network."""
    hub.repos.clear()
    hub.faults.clear()
    hub.cdn = False
    hub.latency = 0.0
    hub.add("org/tiny", tiny_fixture.path)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("K2MINI_CACHE_DIR", raising=False)
    monkeypatch.delenv("K2MINI_HUB_CONNECTIONS", raising=False)
    # huggingface_hub reads these once at import (transformers imported it long before this test).
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hubmod, "RETRY_WAIT", 0.01)
    monkeypatch.setattr(hubmod, "MAX_WAIT", 0.05)

    real_connect = socket.socket.connect

    def loopback_only(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    hub.reset_counts()
    return hub


def file_bytes(root: Path, rel: str, offset: int, n: int) -> bytes:
    with open(root / rel, "rb") as f:
        f.seek(offset)
        return f.read(n)


def raw_bytes(ck: Checkpoint, name: str) -> bytes:
    return ck.read_raw(name).reshape(-1).view(torch.uint8).numpy().tobytes()


def test_repo_location_parsing():
    assert parse_repo_location("moonshotai/Kimi-K2-Instruct") == ("moonshotai/Kimi-K2-Instruct", None)
    assert parse_repo_location("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_repo_location("org/name@0123abc") == ("org/name", "0123abc")
    for not_repo in ("./org/name", "../x/y", "/abs/path", "a/b/c", "name", "org/name@"):
        assert parse_repo_location(not_repo) is None, not_repo


def test_local_directory_wins_over_repo_id(tmp_path, monkeypatch, tiny_fixture):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(tiny_fixture.path, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_source("org/tiny"), LocalSource)


def test_open_reads_config_index_and_one_range_per_shard(fake_hub, tiny_fixture):
    ck = Checkpoint.open("org/tiny")
    local = Checkpoint.open(tiny_fixture.path)
    assert ck.config == local.config
    assert ck.tensors == local.tensors
    assert ck.description == f"org/tiny@{fake_hub.repos['org/tiny'].refs['main']}"
    shards = sorted({t.file for t in local.tensors.values()})
    ranged = [r for r in fake_hub.requests if r[2] is not None]
    # One request per shard: the fixture's headers fit in the first 64 KiB.
    assert sorted(p.rsplit("/", 1)[1] for _, p, _ in ranged) == shards
    for f in shards:
        assert fake_hub.sent[f] == min(_HEADER_PROBE, (tiny_fixture.path / f).stat().st_size)
    small = (tiny_fixture.path / "config.json").stat().st_size + (tiny_fixture.path / "model.safetensors.index.json").stat().st_size
    assert ck.source.bytes_read == fake_hub.total_sent() == small + sum(fake_hub.sent[f] for f in shards)


def test_every_tensor_matches_the_file_bytes_and_counts_match_the_server(fake_hub, tiny_fixture):
    ck = Checkpoint.open("org/tiny")
    fake_hub.reset_counts()
    before = ck.source.bytes_read
    for name, t in ck.tensors.items():
        assert raw_bytes(ck, name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes), name
    assert ck.source.bytes_read - before == fake_hub.total_sent() == ck.total_bytes()
    # Every data request names the pinned commit, never the branch.
    assert all(f"/resolve/{ck.source.commit_sha}/" in p for _, p, _ in fake_hub.requests)


def test_branch_moving_mid_run_does_not_mix_versions(fake_hub, tiny_fixture, tmp_path):
    ck = Checkpoint.open("org/tiny")
    name = next(n for n, t in ck.tensors.items() if t.dtype == "F8_E4M3")
    t = ck.tensors[name]
    other = tmp_path / "other"
    shutil.copytree(tiny_fixture.path, other)
    with open(other / t.file, "r+b") as f:  # a new commit with different weights for this tensor
        f.seek(t.offset)
        f.write(bytes(b ^ 0x5A for b in file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes)))
    new_sha = fake_hub.add("org/tiny", other)  # main now points at the new commit
    assert new_sha != ck.source.commit_sha
    assert raw_bytes(ck, name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes)
    assert raw_bytes(ck, name) != file_bytes(other, t.file, t.offset, t.nbytes)
    again = Checkpoint.open("org/tiny")
    assert again.source.commit_sha == new_sha
    assert raw_bytes(again, name) == file_bytes(other, t.file, t.offset, t.nbytes)
    old = Checkpoint.open(f"org/tiny@{ck.source.commit_sha}")
    assert raw_bytes(old, name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes)


def test_dropped_connections_and_5xx_are_retried_and_resumed(fake_hub, tiny_fixture):
    ck = Checkpoint.open("org/tiny")
    t = max(ck.tensors.values(), key=lambda t: t.nbytes)
    fake_hub.reset_counts()
    fake_hub.fail("drop", 2, after=10_000)
    fake_hub.fail("status", 3, status=503)
    fake_hub.fail("drop", 1, after=5_000)
    before = ck.source.bytes_read
    assert raw_bytes(ck, t.name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes)
    ranges = [r[2] for r in fake_hub.requests]
    end = t.offset + t.nbytes - 1
    # Each resumed request starts where the broken one stopped; nothing is fetched twice.
    assert ranges == [
        f"bytes={t.offset}-{end}",
        f"bytes={t.offset + 10_000}-{end}",
        *[f"bytes={t.offset + 20_000}-{end}"] * 4,
        f"bytes={t.offset + 25_000}-{end}",
    ]
    assert ck.source.bytes_read - before == fake_hub.total_sent() == t.nbytes


def test_cdn_redirect_is_followed_once_per_file_without_the_token(fake_hub, tiny_fixture, monkeypatch):
    fake_hub.cdn = True
    monkeypatch.setenv("HF_TOKEN", "hf_loopbacktesttoken")
    ck = Checkpoint.open("org/tiny")
    fake_hub.reset_counts()
    for name, t in ck.tensors.items():
        assert raw_bytes(ck, name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes), name
    resolves = [p for _, p, _ in fake_hub.requests if "/resolve/" in p]
    cdn = [i for i, (_, p, _) in enumerate(fake_hub.requests) if p.startswith("/cdn/")]
    # The redirect is asked once per shard (open resolved them already), then the signed URL is reused.
    assert resolves == [] and len(cdn) == len(ck.tensors) - sum(t.nbytes == 0 for t in ck.tensors.values())
    assert all(fake_hub.authorizations[i] is None for i in cdn)  # the token never leaves the Hub origin
    assert ck.source.bytes_read > 0 and fake_hub.total_sent() == ck.total_bytes()

    fake_hub.expire_cdn()  # signatures go stale: the next read resolves again
    fake_hub.reset_counts()
    t = next(iter(ck.tensors.values()))
    assert raw_bytes(ck, t.name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes)
    paths = [p.split("/")[1] for _, p, _ in fake_hub.requests]
    assert paths == ["cdn", "org", "cdn"]  # stale signed URL (403), resolve (302), new signed URL
    assert fake_hub.authorizations[1] == "Bearer hf_loopbacktesttoken"


def test_persistent_5xx_gives_one_line(fake_hub):
    src = HubSource("org/tiny", max_retries=2)
    fake_hub.fail("status", 10, status=502)
    with pytest.raises(CheckpointError, match=r"failed after 2 retries: HTTP 502"):
        src.read_into("model-1-of-3.safetensors", 0, memoryview(bytearray(16)))


@pytest.mark.parametrize(
    "location, message",
    [
        ("org/missing", "org/missing: no local directory of that name, and no such repo on http://127.0.0.1"),
        ("org/tiny@no-such-branch", "org/tiny: revision 'no-such-branch' does not exist on http://127.0.0.1"),
    ],
)
def test_missing_repo_or_revision_is_one_line_exit_2(fake_hub, location, message):
    r = CliRunner().invoke(cli, ["inspect", location])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"k2mini: error: {message}"), r.output


def test_missing_shard_and_missing_file(fake_hub, tiny_fixture, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in tiny_fixture.path.iterdir():
        if p.name != "model-2-of-3.safetensors":
            (broken / p.name).symlink_to(p)
    fake_hub.add("org/broken", broken)
    r = CliRunner().invoke(cli, ["inspect", "org/broken"])
    assert r.exit_code == 2 and "model-2-of-3.safetensors" in r.output and len(r.output.strip().splitlines()) == 1
    src = HubSource("org/tiny")
    with pytest.raises(CheckpointError, match="generation_config.bin: file is missing from the repo"):
        src.read_bytes("generation_config.bin")


def test_unreachable_endpoint_is_one_line_after_retries(fake_hub, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    r = CliRunner().invoke(cli, ["inspect", "org/tiny"])
    assert r.exit_code == 2
    assert r.output.strip() == (
        f"k2mini: error: org/tiny: no local directory of that name, and resolving the revision failed on {dead}: ConnectError"
    )


def test_offline_mode_is_one_line(fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        Checkpoint.open("org/tiny")


def test_token_reaches_the_server(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_loopbacktesttoken")
    ck = Checkpoint.open("org/tiny")
    ck.read_raw(next(iter(ck.tensors)))
    assert fake_hub.authorizations and set(fake_hub.authorizations) == {"Bearer hf_loopbacktesttoken"}


def test_small_files_come_whole_through_the_hub_cache(fake_hub, tiny_fixture, tmp_path):
    src = HubSource("org/tiny")
    assert src.read_bytes("tokenizer.json") == (tiny_fixture.path / "tokenizer.json").read_bytes()
    got = src.bytes_read
    assert got == (tiny_fixture.path / "tokenizer.json").stat().st_size
    cached = list((tmp_path / "hf_home" / "hub").rglob("tokenizer.json"))
    assert cached, "hf_hub_download should have stored the file in HF_HOME/hub"
    fake_hub.reset_counts()
    assert src.read_bytes("tokenizer.json") == (tiny_fixture.path / "tokenizer.json").read_bytes()
    assert src.bytes_read == got and fake_hub.total_sent() == 0  # second read from the cache
    assert src.list_files() == sorted(p.name for p in tiny_fixture.path.iterdir() if p.is_file())


def test_inspect_on_a_hub_repo_matches_local(fake_hub, tiny_fixture):
    hub_r = CliRunner().invoke(cli, ["inspect", "org/tiny", "--json"])
    local_r = CliRunner().invoke(cli, ["inspect", str(tiny_fixture.path), "--json"])
    assert hub_r.exit_code == local_r.exit_code == 0, hub_r.output
    a, b = json.loads(hub_r.stdout), json.loads(local_r.stdout)
    assert a.pop("source").startswith("org/tiny@") and b.pop("source")
    assert a == b
    assert fake_hub.total_sent() < sum(p.stat().st_size for p in tiny_fixture.path.iterdir()) / 2


# -- convert-fast straight from the Hub ------------------------------------------------------

# A source wide enough that a 2-layer, 2-expert reduction keeps a small fraction of it.
WIDE = dict(num_hidden_layers=8, n_routed_experts=16, vocab_size=256, n_shards=4, from_model=False)
REDUCE = ["--layers", "2", "--experts", "2", "--no-progress", "--json"]
# Files whose provenance names the source: a local path in one run, repo@sha in the other.
PROVENANCE_FILES = {"config.json", "plan.json", "README.md"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    build_fixture(root / "src", "tiny", **WIDE)
    r = CliRunner().invoke(cli, ["convert-fast", "-s", str(root / "src"), "-o", str(root / "from_disk"), *REDUCE])
    assert r.exit_code == 0, r.output
    return root


def convert_from_hub(fake_hub, wide, out):
    fake_hub.add("org/wide", wide / "src")
    fake_hub.reset_counts()
    r = CliRunner().invoke(cli, ["convert-fast", "-s", "org/wide", "-o", str(out), *REDUCE])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def assert_same_output(from_disk: Path, from_hub: Path, hub_location: str):
    names = sorted(p.name for p in from_disk.iterdir())
    assert names == sorted(p.name for p in from_hub.iterdir())
    assert any(n.endswith(".safetensors") for n in names)
    for n in names:
        a, b = (from_disk / n).read_bytes(), (from_hub / n).read_bytes()
        if n in PROVENANCE_FILES:
            assert hub_location.encode() in b
            b = b.replace(hub_location.encode(), str(from_disk.parent / "src").encode())
        assert a == b, n


def test_convert_fast_from_hub_fetches_kept_bytes_and_matches_disk(fake_hub, wide, tmp_path):
    s = convert_from_hub(fake_hub, wide, tmp_path / "from_hub")
    assert_same_output(wide / "from_disk", tmp_path / "from_hub", s["source"])
    src = wide / "src"
    shards = [f for f in fake_hub.sent if f.endswith(".safetensors")]
    headers = sum(min(_HEADER_PROBE, (src / f).stat().st_size) for f in shards)
    small_files = sum((src / f).stat().st_size for f in fake_hub.sent if f not in shards)
    kept = s["selected_source_bytes"]
    repo_tensor_bytes = Checkpoint.open(src).total_bytes()
    assert kept < 0.2 * repo_tensor_bytes  # the reduction keeps a small fraction
    assert fake_hub.total_sent() <= 1.1 * kept + headers + small_files
    assert s["bytes_read"] <= fake_hub.total_sent()


def fresh_hub_cache(monkeypatch, path: Path) -> None:
    """A new HF_HUB_CACHE, so a second run downloads the small files again like the first."""
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))


def test_convert_fast_from_hub_survives_drops_and_5xx(fake_hub, wide, tmp_path, monkeypatch):
    clean = convert_from_hub(fake_hub, wide, tmp_path / "clean")
    clean_sent = fake_hub.total_sent()
    fresh_hub_cache(monkeypatch, tmp_path / "cache2")
    fake_hub.fail("status", 3, status=503)  # the first ranged requests (shard headers)
    fake_hub.fail("status", 2, status=500, min_length=90_000)  # embed / lm_head (98 KB each)
    fake_hub.fail("drop", 2, after=40_000, min_length=90_000)  # ... then cut mid-tensor twice
    s = convert_from_hub(fake_hub, wide, tmp_path / "faulty")
    assert all(f.count == 0 for f in fake_hub.faults)
    assert_same_output(wide / "from_disk", tmp_path / "faulty", s["source"])
    # Broken ranges resume where they stopped: no byte crosses the wire twice.
    assert fake_hub.total_sent() == clean_sent
    assert clean["source"] == s["source"]


def test_dry_run_says_bytes_to_fetch_against_repo_total(fake_hub, wide, tmp_path, monkeypatch):
    fake_hub.add("org/wide", wide / "src")
    args = ["convert-fast", "-s", "org/wide", "-o", str(tmp_path / "x"), "--layers", "2", "--experts", "2", "--dry-run"]
    fake_hub.reset_counts()
    d = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    assert d["planning_bytes_read"] == fake_hub.total_sent()  # what the dry run itself downloaded
    text = CliRunner().invoke(cli, args).output
    fresh_hub_cache(monkeypatch, tmp_path / "cache2")
    assert not (tmp_path / "x").exists()
    src = wide / "src"
    assert d["source_total_bytes"] == sum(p.stat().st_size for p in src.iterdir())
    assert "source bytes:" in text and " in the source (" in text
    s = convert_from_hub(fake_hub, wide, tmp_path / "real")
    copied = sum((src / f).stat().st_size for f in s["copied_files"])
    planned = d["planning_bytes_read"] + d["bytes_to_read"]
    # The dry run may count a copied file the run then finds in the Hub cache.
    assert fake_hub.total_sent() <= planned <= fake_hub.total_sent() + copied
    assert planned < 0.2 * d["source_total_bytes"]


def test_reads_overlap_up_to_the_connection_limit(fake_hub, wide, tmp_path, monkeypatch):
    # With a round trip on every answer, reads from the Hub overlap (headers, scale grids for
    # scoring, tensors read ahead), never past K2MINI_HUB_CONNECTIONS; one connection reads
    # one range at a time. The bytes written are the same either way.
    fake_hub.latency = 0.01
    s = convert_from_hub(fake_hub, wide, tmp_path / "eight")
    assert 1 < fake_hub.max_in_flight <= hubmod.CONNECTIONS
    assert_same_output(wide / "from_disk", tmp_path / "eight", s["source"])
    monkeypatch.setenv("K2MINI_HUB_CONNECTIONS", "1")
    fresh_hub_cache(monkeypatch, tmp_path / "cache2")
    s = convert_from_hub(fake_hub, wide, tmp_path / "one")
    assert fake_hub.max_in_flight == 1
    assert_same_output(wide / "from_disk", tmp_path / "one", s["source"])


def test_long_range_comes_in_parallel_pieces_that_resume(fake_hub, tiny_fixture, monkeypatch):
    monkeypatch.setattr(hubmod, "PIECE_BYTES", 4096)
    ck = Checkpoint.open("org/tiny")
    name, t = max(ck.tensors.items(), key=lambda kv: kv[1].nbytes)
    pieces = -(-t.nbytes // 4096)
    assert pieces >= 4
    fake_hub.latency = 0.01
    fake_hub.reset_counts()
    assert raw_bytes(ck, name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes)
    starts = sorted(int(rng.removeprefix("bytes=").split("-")[0]) for _, _, rng in fake_hub.requests)
    assert starts == [t.offset + k * 4096 for k in range(pieces)]
    assert 1 < fake_hub.max_in_flight <= hubmod.CONNECTIONS
    # A piece cut mid-body resumes where it broke: every byte crosses the wire once.
    fake_hub.fail("drop", 2, after=1000, min_length=4096)
    fake_hub.reset_counts()
    assert raw_bytes(ck, name) == file_bytes(tiny_fixture.path, t.file, t.offset, t.nbytes)
    assert all(f.count == 0 for f in fake_hub.faults)
    assert fake_hub.total_sent() == t.nbytes
    assert len(fake_hub.requests) == pieces + 2  # the two cut pieces asked again for their rest


@pytest.mark.parametrize("value", ["0", "65", "eight", "-3"])
def test_bad_connection_count_is_one_line_exit_2(fake_hub, monkeypatch, value):
    monkeypatch.setenv("K2MINI_HUB_CONNECTIONS", value)
    r = CliRunner().invoke(cli, ["inspect", "org/tiny"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"k2mini: error: K2MINI_HUB_CONNECTIONS={value!r}: expected a whole number from 1 to 64"]


def test_range_cache_serves_a_later_run_and_stays_bounded(fake_hub, wide, tmp_path, monkeypatch):
    monkeypatch.setenv("K2MINI_CACHE_DIR", str(tmp_path / "ranges"))
    first = convert_from_hub(fake_hub, wide, tmp_path / "first")
    assert any(f.endswith(".safetensors") for f in fake_hub.sent)
    fresh_hub_cache(monkeypatch, tmp_path / "cache2")
    second = convert_from_hub(fake_hub, wide, tmp_path / "second")
    # Headers, scoring inputs and tensors all come from the range cache: no shard byte is sent.
    assert not any(f.endswith(".safetensors") for f in fake_hub.sent), dict(fake_hub.sent)
    assert_same_output(wide / "from_disk", tmp_path / "second", second["source"])
    assert first["source"] == second["source"]

    limit = 200_000
    monkeypatch.setenv("K2MINI_CACHE_DIR", str(tmp_path / "small"))
    monkeypatch.setenv("K2MINI_CACHE_SIZE", str(limit))
    convert_from_hub(fake_hub, wide, tmp_path / "third")
    assert 0 < sum(p.stat().st_size for p in (tmp_path / "small").rglob("*") if p.is_file()) <= limit


def test_range_cache_drops_least_recently_used(tmp_path):
    c = RangeCache(tmp_path, max_bytes=250)
    for off in (0, 100, 200):
        c.put("sha", "a.safetensors", off, memoryview(bytes([off // 100]) * 100))
        if off == 100:
            assert c.get("sha", "a.safetensors", 0, memoryview(bytearray(100)))  # 0 is now newer than 100
    buf = bytearray(100)
    assert not c.get("sha", "a.safetensors", 100, memoryview(buf))
    assert c.get("sha", "a.safetensors", 0, memoryview(buf)) and buf == bytes([0]) * 100
    assert c.get("sha", "a.safetensors", 200, memoryview(buf)) and buf == bytes([2]) * 100
    assert not c.get("other-sha", "a.safetensors", 200, memoryview(buf))  # another commit never hits
    again = RangeCache(tmp_path, max_bytes=250)  # a later run starts from what is on disk
    assert again.get("sha", "a.safetensors", 200, memoryview(buf))


def test_analyze_from_hub_matches_disk(fake_hub, tiny_fixture, tmp_path):
    args = ["--samples", "2", "--seq-len", "16", "--no-plots", "-q"]
    r1 = CliRunner().invoke(cli, ["analyze", "-s", str(tiny_fixture.path), "-o", str(tmp_path / "disk.json"), *args])
    r2 = CliRunner().invoke(cli, ["analyze", "-s", "org/tiny", "-o", str(tmp_path / "hub.json"), *args])
    assert r1.exit_code == r2.exit_code == 0, r2.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("disk.json", "hub.json"))
    assert b["source"].pop("location").startswith("org/tiny@") and a["source"].pop("location")
    assert a == b
