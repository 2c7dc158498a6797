"""Nano K2 training pieces: balancing rule, load counting, Muon orthogonalisation, unigram
baseline, layer dropping — each against an independent computation."""

import math

import torch

from k2mini.nano import data
from k2mini.nano.study import drop_layers
from k2mini.model.balance import LoadMeter, balance_step
from k2mini.nano.train import _NS3


def test_balance_step_moves_bias_by_gamma_toward_underloaded_experts(tiny_fixture):
    model = tiny_fixture.model
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    before = [g.e_score_correction_bias.clone() for g in gates]
    loads = torch.tensor([[10.0, 0, 4, 2, 0, 0, 0, 0]] * len(gates))  # mean 2
    balance_step(gates, loads, 0.01)
    expected = torch.tensor([-0.01, 0.01, -0.01, 0.0, 0.01, 0.01, 0.01, 0.01])
    for g, b in zip(gates, before):
        torch.testing.assert_close(g.e_score_correction_bias - b, expected)
        g.e_score_correction_bias.copy_(b)


@torch.no_grad()
def test_load_meter_counts_top_k_choices_of_the_design_routing(tiny_fixture):
    model = tiny_fixture.model
    meter = LoadMeter(model)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    captured = {}
    layer = model.model.layers[1]
    h = layer.mlp.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    model(input_ids=ids, use_cache=False)
    h.remove()
    loads = meter.reset()
    meter.remove()
    g = layer.mlp.gate
    choice = torch.sigmoid(captured["x"].float() @ g.weight.float().T) + g.e_score_correction_bias
    idx = choice.topk(g.top_k, dim=-1).indices
    torch.testing.assert_close(loads[0], torch.bincount(idx.flatten(), minlength=8).float())
    assert float(loads.sum()) == len(meter.gates) * ids.numel() * g.top_k


def test_newton_schulz_flattens_singular_values():
    g = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(_NS3.orthogonalize(g))
    # Muon's quintic iteration maps singular values into roughly [0.7, 1.2], not exactly 1.
    assert float(s.min()) > 0.5 and float(s.max()) < 1.3


def test_unigram_perplexity_formula():
    train = torch.tensor([0, 0, 1, 2])
    test = torch.tensor([0, 3])
    counts = [3, 2, 2, 1]  # add-one over vocab 4
    expected = math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    assert abs(data.unigram_perplexity(train, test, 4) - expected) < 1e-9
    assert sum(counts) == 8


@torch.no_grad()
def test_drop_layers_equals_running_the_remaining_layers_and_leaves_model_intact(tiny_fixture):
    model = tiny_fixture.model
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    full = model(input_ids=ids, use_cache=False).logits
    small = drop_layers(model, [2])
    assert len(small.model.layers) == 3 and len(model.model.layers) == 4
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, full)
    # Reference: the same forward with layer 2 replaced by identity.
    mods = model.model.layers
    h = mods[2].register_forward_hook(lambda m, a, out: a[0])
    ref = model(input_ids=ids, use_cache=False).logits
    h.remove()
    torch.testing.assert_close(small(input_ids=ids, use_cache=False).logits, ref)
