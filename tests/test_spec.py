"""What a config implies, checked against the published Kimi-K2 facts (docs/facts.md §1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2mini.model.spec import ModelSpec

# A copy of the real Kimi-K2-Instruct config.json (../shared/reference/), kept in the repo so
# nothing here depends on a file outside it.
REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json"


@pytest.fixture(scope="module")
def k2_config():
    return json.loads(REFERENCE.read_text())


def test_real_k2_config_implies_139644_tensors_with_inv_freq_and_1_026e12_params(k2_config):
    spec = ModelSpec.from_config(k2_config)
    tensors = list(spec.tensors())
    # docs/facts.md §1: 139,644 tensors including one rotary_emb.inv_freq per layer.
    assert len(tensors) + spec.num_hidden_layers == 139_644
    assert round(spec.param_count() / 1e12, 3) == 1.026
    assert spec.dense_layers == [0] and len(spec.moe_layers) == 60
    kv_a = next(t for t in tensors if t.name == "model.layers.5.self_attn.kv_a_proj_with_mqa.weight")
    kv_a_scale = next(t for t in tensors if t.name == "model.layers.5.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
    assert kv_a.shape == (576, 7168) and kv_a_scale.shape == (5, 56)


def test_implausible_config_values_are_refused_by_name(k2_config):
    from k2mini.errors import CheckpointError

    bad = dict(k2_config, hidden_size=-1)
    with pytest.raises(CheckpointError, match="hidden_size"):
        ModelSpec.from_config(bad)
    with pytest.raises(CheckpointError, match="n_routed_experts"):
        ModelSpec.from_config(dict(k2_config, n_routed_experts=10**9))
