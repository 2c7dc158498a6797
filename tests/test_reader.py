"""The streaming reader: tensor table, per-tensor reads, FP8 dequant against the model."""

from __future__ import annotations

import torch

from k2mini.checkpoint.reader import Checkpoint
from k2mini.model.hf import load_checkpoint_model


def test_reader_lists_every_tensor_with_layer_expert_and_shard(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    assert not ck.problems
    files = {t.file for t in ck.tensors.values()}
    assert len(files) == 3
    e = ck.info("model.layers.2.mlp.experts.5.up_proj.weight")
    assert (e.parsed.layer, e.parsed.expert, e.dtype) == (2, 5, "F8_E4M3")
    assert e.shape == (96, 192)


def test_a_scale_lives_in_a_different_shard_than_its_weight(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    split = [n for n in ck.weight_names() if ck.scale_of(n) is not None and ck.scale_of(n).file != ck.info(n).file]
    assert split, "fixture must exercise cross-shard scales"


def test_bf16_weights_from_reader_reproduce_the_fixture_models_logits(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    model = load_checkpoint_model(ck)
    ids = torch.randint(0, tiny_fixture.config["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_fixture.model(ids).logits
        got = model(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_hugging_face_cache_snapshot_with_symlinks_into_blobs_is_readable(tiny_fixture, tmp_path):
    repo = tmp_path / "models--org--k2"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_fixture.path.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    ck = Checkpoint.open(snap)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert torch.equal(ck.read(name), Checkpoint.open(tiny_fixture.path).read(name))
