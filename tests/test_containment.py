"""Containment: a checkpoint can name only its own files, its remote code never runs, and
config values that feed arithmetic are range-checked.

That no command imports the checkpoint's remote code is proven where every command is run
once: tests/test_source_integrity.py (the remote-code files there leave a marker if
imported, transformers' remote-code entry points are spied on).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import k2mini
from k2mini.checkpoint.reader import INDEX_FILE, Checkpoint
from k2mini.checkpoint.source import LocalSource
from k2mini.cli import cli
from k2mini.errors import CheckpointError

PACKAGE_DIR = Path(k2mini.__file__).parent


# -- file names that escape ----------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    ["../x", "a/../../x", "/etc/passwd", "C:\\x", "C:x", "a\\..\\..\\x", "nul\x00byte", "", "sub/../../x"],
)
def test_names_that_escape_are_refused(tmp_path, rel):
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        LocalSource(tmp_path / "ck").path(rel)


def test_symlinks_are_followed_only_inside_the_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    (ck / "sub").mkdir(parents=True)
    (ck / "sub" / "real.bin").write_bytes(b"inside")
    (tmp_path / "secret.bin").write_bytes(b"outside")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "f.bin").write_bytes(b"outside")
    os.symlink(ck / "sub" / "real.bin", ck / "alias.bin")  # inside -> allowed
    os.symlink(tmp_path / "secret.bin", ck / "file_link.bin")  # file outside
    os.symlink(tmp_path / "outdir", ck / "dir_link")  # directory outside
    os.symlink("../secret.bin", ck / "relative_link.bin")  # relative, outside
    src = LocalSource(ck)
    assert src.read_bytes("alias.bin") == b"inside"
    for rel in ("file_link.bin", "dir_link/f.bin", "relative_link.bin"):
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            src.read_bytes(rel)
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            src.size(rel)


def test_hf_cache_snapshot_may_link_into_its_own_blobs_only(tmp_path):
    """huggingface_hub's cache layout is snapshots/<rev>/name -> ../../blobs/<sha>."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "blobs" / "123").write_bytes(b"blob")
    other = tmp_path / "models--evil--repo" / "blobs"
    other.mkdir(parents=True)
    (other / "456").write_bytes(b"evil")
    os.symlink("../../blobs/123", repo / "snapshots" / "abc" / "config.json")
    os.symlink(other / "456", repo / "snapshots" / "abc" / "evil.json")
    src = LocalSource(repo / "snapshots" / "abc")
    assert src.read_bytes("config.json") == b"blob"
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        src.read_bytes("evil.json")


def test_index_naming_a_symlinked_dir_outside_is_refused_before_reading(tiny_fixture, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_fixture.path, ck)
    idx = json.loads((ck / INDEX_FILE).read_text())
    shard = idx["weight_map"]["model.norm.weight"]
    (tmp_path / "out").mkdir()
    shutil.move(ck / shard, tmp_path / "out" / shard)
    os.symlink(tmp_path / "out", ck / "shards")
    idx["weight_map"] = {k: (f"shards/{v}" if v == shard else v) for k, v in idx["weight_map"].items()}
    (ck / INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        Checkpoint.open(ck)


# -- remote code ----------------------------------------------------------------------


def test_package_never_passes_trust_remote_code_true():
    """No call site in k2mini hard-codes trust_remote_code=True (an opt-in flag may pass a variable)."""
    offenders = []
    for py in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(), filename=str(py))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if isinstance(node.value, ast.Constant) and node.value.value is True:
                    offenders.append(f"{py.relative_to(PACKAGE_DIR)}:{node.value.lineno}")
    assert not offenders, offenders


# -- config values used in arithmetic -------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_hidden_layers", 0),
        ("num_hidden_layers", 10**9),
        ("n_routed_experts", -1),
        ("hidden_size", 1 << 40),
        ("hidden_size", "7168"),
        ("hidden_size", True),
        ("vocab_size", 1e30),
        ("num_experts_per_tok", 9),  # > n_routed_experts (8)
        ("first_k_dense_replace", 99),
        ("first_k_dense_replace", "1"),
        ("n_group", 3),  # 8 experts do not split into 3 groups
        ("topk_group", 2),  # > n_group
        ("n_shared_experts", 10**6),
        ("q_lora_rank", -5),
        ("quantization_config", [1, 2]),
        ("rope_theta", float("inf")),
        ("rms_norm_eps", -1.0),
        ("rope_scaling", [1]),
        ("max_position_embeddings", -5),
    ],
)
def test_out_of_range_config_values_are_refused_by_name(tiny_fixture, tmp_path, field, value):
    src = tmp_path / "src"
    shutil.copytree(tiny_fixture.path, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(cli, ["inspect", str(src)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert field in result.stderr and "config.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "field,value,says",
    [
        ("hidden_act", "evil", "hidden_act"),  # else a KeyError deep in transformers' MLP
        ("tie_word_embeddings", "no", "tie_word_embeddings"),  # transformers' own validation
        ("rope_scaling", {"type": "yarn", "factor": -1.0}, "rope_scaling.factor"),  # transformers only warns
    ],
)
def test_config_values_transformers_would_choke_on_are_refused_by_name(tiny_fixture, tmp_path, field, value, says):
    src = tmp_path / "src"
    shutil.copytree(tiny_fixture.path, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(cli, ["analyze", "--source", str(src), "-o", str(tmp_path / "a.json"),
                                      "--samples", "2", "--seq-len", "16", "--no-plots", "--quiet"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert says in result.stderr and "config.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a.json").exists()


def test_layers_times_experts_is_bounded_but_k2_passes():
    from k2mini.model.spec import ModelSpec
    from k2mini.testing.fixtures import REFERENCE_CONFIG

    # K2's real dims on top of the fixture factory's copy of the K2 config fields.
    k2 = REFERENCE_CONFIG | {
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "first_k_dense_replace": 1, "n_routed_experts": 384, "num_experts_per_tok": 8, "num_attention_heads": 64,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 163840, "n_group": 1, "topk_group": 1,
    }
    assert sum(1 for _ in ModelSpec.from_config(k2).tensors()) == 139583
    with pytest.raises(CheckpointError, match="layers x"):
        ModelSpec.from_config(k2 | {"num_hidden_layers": 4096, "n_routed_experts": 4096})
