"""k2mini inspect: counts from headers alone, checked against transformers' model."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from k2mini.cli import cli


def test_inspect_json_counts_match_the_transformers_model(tiny_fixture):
    res = CliRunner().invoke(cli, ["inspect", str(tiny_fixture.path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    # transformers keeps e_score_correction_bias as a buffer; the checkpoint stores it as a tensor.
    model = tiny_fixture.model
    model_params = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")
    )
    assert report["params"] == model_params
    assert report["bf16_bytes"] == 2 * model_params
    arch = report["architecture"]
    assert (arch["layers"], arch["dense_layers"], arch["moe_layers"]) == (4, [0], 3)
    assert (arch["routed_experts"], arch["experts_per_token"], arch["quantization"]) == (8, 2, "fp8")
    shard_bytes = sum(f.stat().st_size for f in tiny_fixture.path.glob("*.safetensors"))
    assert report["tensor_bytes"] < shard_bytes  # headers are the difference
    index = json.loads((tiny_fixture.path / "model.safetensors.index.json").read_text())
    assert report["dtypes"]["F8_E4M3"]["tensors"] == sum(n.endswith("weight_scale_inv") for n in index["weight_map"])
    assert report["problems"] == []


def test_inspect_reports_missing_tensors_and_exits_2(tiny_fixture, tmp_path):
    src = tiny_fixture.path
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.shared_experts.up_proj.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert res.exit_code == 2
    assert "missing tensor model.layers.2.mlp.shared_experts.up_proj.weight" in res.output
    assert "has no weight" in res.output  # its scale is now an orphan
