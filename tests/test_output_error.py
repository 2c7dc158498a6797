"""Output-error selector: routing among kept experts equals transformers' DeepseekV3 MoE
on a sliced router/expert set; elimination removes an expert that is never chosen first."""

import copy

import pytest

import torch

from k2mini.model.routing import Routing
from k2mini.analysis.output_error import elimination_order, expert_outputs, relative_error, routed_output


def _layer(tiny_fixture):
    return tiny_fixture.model.model.layers[1].mlp


def _routing(mlp):
    g = mlp.gate
    return Routing(g.weight.detach(), g.e_score_correction_bias.detach().clone(), g.top_k, g.norm_topk_prob, g.routed_scaling_factor)


def _inputs(tiny_fixture, n: int, seed: int):
    """(layer 1's MoE, n random inputs, its routing, every expert's output on them)."""
    mlp = _layer(tiny_fixture)
    x = torch.randn(n, mlp.gate.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    return mlp, x, _routing(mlp), expert_outputs(x, mlp.experts.gate_up_proj, mlp.experts.down_proj)


@torch.no_grad()
def test_routed_output_matches_sliced_transformers_moe(tiny_fixture):
    mlp, x, r, outs = _inputs(tiny_fixture, 40, 0)
    scores = torch.sigmoid(x @ r.weight.T)
    choice = scores + r.bias
    full = routed_output(scores, choice, outs, torch.ones(8, dtype=torch.bool), r)
    ref_full = mlp(x[None])[0] - mlp.shared_experts(x[None])[0]
    torch.testing.assert_close(full, ref_full, rtol=1e-4, atol=1e-5)
    kept = [0, 2, 5, 7]
    sliced = copy.deepcopy(mlp)
    sliced.gate.weight = torch.nn.Parameter(mlp.gate.weight[kept].clone())
    sliced.gate.e_score_correction_bias = mlp.gate.e_score_correction_bias[kept].clone()
    sliced.gate.num_experts = len(kept)
    sliced.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj[kept].clone())
    sliced.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj[kept].clone())
    sliced.experts.num_experts = len(kept)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[kept] = True
    ref = sliced(x[None])[0] - sliced.shared_experts(x[None])[0]
    torch.testing.assert_close(routed_output(scores, choice, outs, mask, r), ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_unused_expert_is_eliminated_first_and_order_is_a_permutation(tiny_fixture):
    _, x, r, outs = _inputs(tiny_fixture, 64, 1)
    r.bias[3] = -100.0  # never among the top-k
    order = elimination_order(x, r, outs)
    assert sorted(order) == list(range(8))
    assert order[0] == 3
    assert relative_error(x, r, outs, [e for e in range(8) if e != 3]) == 0.0
    # Greedy picks, at each round, the removal of least error given earlier removals.
    removed = {3}
    alive = [e for e in range(8) if e not in removed]
    errs = {c: relative_error(x, r, outs, [e for e in alive if e != c]) for c in alive}
    assert order[1] == min(alive, key=lambda c: (errs[c], c))


@torch.no_grad()
def test_residuals_equal_the_relative_error_of_each_kept_set(tiny_fixture):
    _, x, r, outs = _inputs(tiny_fixture, 64, 2)
    residuals: list[float] = []
    order = elimination_order(x, r, outs, residuals=residuals)
    E, k = len(order), r.top_k
    assert len(residuals) == E - k + 1
    for i, res in enumerate(residuals):
        assert res == pytest.approx(relative_error(x, r, outs, order[i:]), rel=1e-4, abs=1e-9)
