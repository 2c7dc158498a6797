"""The one routing (model/routing.py) against transformers' own DeepseekV3 router, with and
without group-limited choice: the same experts with the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from k2mini.model.routing import Routing


@pytest.mark.parametrize("which", ["tiny_fixture", "grouped_fixture"])
@torch.no_grad()
def test_route_chooses_what_transformers_router_chooses(which, request):
    fx = request.getfixturevalue(which)
    model = copy.deepcopy(fx.model).float()
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert gates and (which == "tiny_fixture" or gates[0].num_group > 1)
    for gate in gates:
        x = torch.randn(64, gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
        _, ref_w, ref_idx = gate(x)
        idx, w = Routing.of_gate(gate).route(x)
        a, oa = idx.sort(-1)
        b, ob = ref_idx.sort(-1)
        assert torch.equal(a, b)
        torch.testing.assert_close(w.gather(1, oa), ref_w.float().gather(1, ob), rtol=1e-5, atol=1e-6)


def test_from_config_reads_the_routing_constants():
    w = torch.randn(8, 4)
    r = Routing.from_config({"num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "norm_topk_prob": False,
                             "routed_scaling_factor": 2.5}, w, None)
    assert (r.top_k, r.n_group, r.topk_group, r.norm_topk_prob, r.scaling) == (2, 4, 2, False, 2.5)
    assert torch.equal(r.bias, torch.zeros(8))
