"""k2mini teacher: the cache against transformers' own model, N ranks against one, a killed
run resumed, and every bad input one line with exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.errors import UsageError
from k2mini.model.hf import load_checkpoint_model
from k2mini.teacher.cache import MANIFEST, TeacherCache, bytes_per_token

ARGS = ["--samples", "5", "--seq-len", "24", "--block-sequences", "2", "--quiet"]


def teacher(*args: str):
    return CliRunner().invoke(cli, ["teacher", *args], catch_exceptions=False)


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def cache_files(root: Path) -> dict[str, str]:
    """The cache's identity: shards and manifest (teacher_run.json records how the run went)."""
    return {k: v for k, v in tree(root).items() if k != "teacher_run.json"}


@pytest.fixture(scope="module")
def cache_tiny(tiny_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "tiny.teacher"
    res = teacher("-s", str(tiny_fixture.path), "-o", str(out), "--top-k", "8", *ARGS)
    assert res.exit_code == 0, res.output
    return out


def _reference_logits(ck: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    """transformers' DeepseekV3ForCausalLM on the dequantized source, strictly loaded."""
    model = load_checkpoint_model(ck)
    with torch.no_grad():
        return model(ids, use_cache=False).logits.double()


def test_cached_logprobs_equal_transformers_log_softmax_at_its_top_k(tiny_fixture, cache_tiny):
    cache = TeacherCache(cache_tiny)
    b = cache.read(range(cache.sequences))
    ck = Checkpoint.open(tiny_fixture.path)
    logits = _reference_logits(ck, b.input_ids)
    ref = logits.log_softmax(-1)
    k = cache.top_k
    # The cached ids are transformers' top-k, in its order (the logits have no ties here).
    ref_top = ref.topk(k, dim=-1)
    assert torch.equal(b.topk_ids, ref_top.indices)
    at_ids = ref.gather(-1, b.topk_ids)
    err = (b.topk_logprobs.double() - at_ids).abs()
    # float16 storage: half an ulp is |x| * 2^-11; plus float32 arithmetic on both sides.
    bound = at_ids.abs() * 2.0**-11 + 1e-5
    print(f"max abs error of cached log-probs {err.max().item():.2e} (log-probs down to {at_ids.min().item():.2f})")
    assert (err <= bound).all()
    assert (b.logsumexp.double() - logits.logsumexp(-1)).abs().max() < 1e-4
    # Not a vacuous check: the tail outside the top-8 holds real mass.
    tail = 1 - b.topk_logprobs.exp().sum(-1)
    assert tail.min() > 0.01


def test_top_k_of_the_whole_vocabulary_is_the_full_distribution(tiny_fixture, tmp_path):
    vocab = tiny_fixture.config["vocab_size"]
    out = tmp_path / "full.teacher"
    res = teacher("-s", str(tiny_fixture.path), "-o", str(out), "--top-k", str(vocab), "--samples", "2", "--seq-len", "8", "--quiet")
    assert res.exit_code == 0, res.output
    b = TeacherCache(out).read([0, 1])
    assert torch.equal(b.topk_ids.sort(-1).values, torch.arange(vocab).expand_as(b.topk_ids))
    mass = b.topk_logprobs.double().exp().sum(-1)
    assert (mass - 1).abs().max() < 2e-3  # float16 log-probs, summed over the whole vocabulary


def test_manifest_records_source_tokenizer_corpus_and_every_shard(tiny_fixture, cache_tiny):
    m = json.loads((cache_tiny / MANIFEST).read_text())
    cfg_sha = hashlib.sha256((tiny_fixture.path / "config.json").read_bytes()).hexdigest()
    idx_sha = hashlib.sha256((tiny_fixture.path / "model.safetensors.index.json").read_bytes()).hexdigest()
    assert (m["source"]["config_sha256"], m["source"]["index_sha256"]) == (cfg_sha, idx_sha)
    tok_sha = hashlib.sha256((tiny_fixture.path / m["tokenizer"]["file"]).read_bytes()).hexdigest()
    assert m["tokenizer"]["sha256"] == tok_sha and m["tokenizer"]["vocab_size"] == tiny_fixture.config["vocab_size"]
    assert (m["sequences"], m["seq_len"], m["tokens"], m["top_k"]) == (5, 24, 120, 8)
    assert [s["sequences"] for s in m["shards"]] == [2, 2, 1]
    for s in m["shards"]:
        assert hashlib.sha256((cache_tiny / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert m["bytes_per_token"] == bytes_per_token(8) == 56
    assert bytes_per_token(64) <= 400
    assert m["corpus"]["sources"] and m["tool_version"]


def _torchrun(nproc: int, args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "k2mini.cli", "teacher", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_ranks_write_the_cache_one_rank_writes_byte_for_byte(tiny_fixture, tmp_path):
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"r{n}"
        p = _torchrun(n, ["-s", str(tiny_fixture.path), "-o", str(outs[n]), "--top-k", "8", "--device", "cpu", "--json", *ARGS])
        assert p.returncode == 0, p.stderr[-3000:]
        report = json.loads(p.stdout)
        assert report["ranks"] == n and len(report["per_rank"]) == n
        assert sum(r["sequences"] for r in report["per_rank"]) == 5
        if n == 2:  # each rank computed its own blocks (0, 2 and 1) and read the source itself
            assert [r["blocks"] for r in report["per_rank"]] == [2, 1]
            assert all(r["bytes_requested"] > 0 for r in report["per_rank"])
    assert cache_files(outs[1]) == cache_files(outs[2])
    assert len(cache_files(outs[1])) == 4  # 3 shards + manifest


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_cache(tiny_fixture, tmp_path):
    ref = tmp_path / "ref"
    assert teacher("-s", str(tiny_fixture.path), "-o", str(ref), "--top-k", "8", *ARGS).exit_code == 0
    out = tmp_path / "out"
    count = tmp_path / "events"
    base = [sys.executable, "-m", "k2mini.testing.faults"]
    argv = ["teacher", "-s", str(tiny_fixture.path), "-o", str(out), "--top-k", "8", *ARGS]
    subprocess.run([*base, f"count:{count}", *argv], check=True, capture_output=True, timeout=600)
    n_events = int(count.read_text())
    shutil.rmtree(out)
    # Kill after the first block is renamed into place (each block: open, fsync, rename).
    partial = out.parent / f".{out.name}.k2mini-partial"
    for k in range(2, n_events):
        shutil.rmtree(partial, ignore_errors=True)
        p = subprocess.run([*base, f"kill@{k}", *argv], capture_output=True, timeout=600)
        assert p.returncode == -9
        if len(list(partial.glob("block-*.safetensors"))) == 1:
            break
    else:
        pytest.fail("no kill point left exactly one finished block")
    assert not out.exists()
    res = teacher(*argv[1:], "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["per_rank"][0]["blocks_resumed"] == 1
    assert cache_files(out) == cache_files(ref)


@pytest.mark.parametrize("args, needle", [
    (["--top-k", "0"], "--top-k 0"),
    (["--top-k", "100000"], "--top-k 100000"),
    (["--samples", "2", "--tokens", "40"], "--samples and --tokens"),
])
def test_bad_flags_are_one_line_and_exit_2(tiny_fixture, tmp_path, args, needle):
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["teacher", "-s", str(tiny_fixture.path), "-o", str(out), "--seq-len", "8", "--quiet", *args])
    assert res.exit_code == 2 and needle in res.output and res.output.strip().count("\n") == 0
    assert not out.exists()


def test_no_calibration_text_is_refused(tiny_fixture, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["teacher", "-s", str(tiny_fixture.path), "-o", str(out), "--calib", str(empty), *ARGS])
    assert res.exit_code == 2 and str(empty) in res.output and "no text" in res.output
    assert not out.exists() and not any(tmp_path.glob(".o.*"))


def test_output_inside_the_source_and_existing_output_are_refused(tiny_fixture, tmp_path, cache_tiny):
    inside = tiny_fixture.path / "teacher"
    res = CliRunner().invoke(cli, ["teacher", "-s", str(tiny_fixture.path), "-o", str(inside), *ARGS])
    assert res.exit_code == 2 and "inside" in res.output and not inside.exists()
    before = tree(cache_tiny)
    res = CliRunner().invoke(cli, ["teacher", "-s", str(tiny_fixture.path), "-o", str(cache_tiny), *ARGS])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert tree(cache_tiny) == before


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_shard_is_named_when_read_back(cache_tiny, tmp_path, damage):
    copy = tmp_path / "c"
    shutil.copytree(cache_tiny, copy)
    shard = copy / "block-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    cache = TeacherCache(copy)
    cache.read([0])  # shard 0 is intact
    with pytest.raises(UsageError, match=r"block-00001\.safetensors: corrupt or truncated"):
        cache.read([2])


def test_a_cache_from_another_source_is_refused(tiny_fixture, aligned_fixture, cache_tiny):
    from k2mini.analysis.schema import SourceFingerprint

    cache = TeacherCache(cache_tiny)
    mine = SourceFingerprint.of(Checkpoint.open(tiny_fixture.path))
    cache.check_source(mine.config_sha256, mine.index_sha256, what="the reduced model")  # its own source: fine
    other = SourceFingerprint.of(Checkpoint.open(aligned_fixture.path))
    with pytest.raises(UsageError, match="made from .* use a teacher cache of the same source"):
        cache.check_source(other.config_sha256, other.index_sha256, what="the reduced model")


def test_dry_run_writes_nothing_and_sizes_the_cache(tiny_fixture, tmp_path):
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["teacher", "-s", str(tiny_fixture.path), "-o", str(out), "--top-k", "64", "--dry-run", "--json", *ARGS])
    assert res.exit_code == 0, res.output
    est = json.loads(res.output)
    assert est["tokens"] == 120 and est["cache_bytes"] == 120 * 392 and est["blocks"] == 3
    ck = Checkpoint.open(tiny_fixture.path)
    assert est["bytes_read_per_layer"][0] == sum(t.nbytes for n, t in ck.tensors.items() if n.startswith("model.layers.0."))
    assert est["estimated_seconds"] > 0
    assert not out.exists()
