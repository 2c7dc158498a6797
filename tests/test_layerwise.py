"""The layer-streamed runner against transformers' own DeepseekV3ForCausalLM on the same weights."""

from __future__ import annotations

import torch

from k2mini.checkpoint.names import Role
from k2mini.checkpoint.reader import Checkpoint
from k2mini.model.layerwise import LayerObserver, read_rows, stream_forward
from slow_source import SlowSource

# float32 everywhere; different matmul blocking (fused gate_up vs separate) moves the last bits.
TOL = 1e-4


def _ids(vocab: int, shape=(3, 20), seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


class _Routes(LayerObserver):
    def __init__(self):
        self.idx, self.w = {}, {}

    def routed(self, layer, topk_idx, topk_weight):
        self.idx[layer], self.w[layer] = topk_idx.clone(), topk_weight.clone()


def _reference(model, ids):
    """transformers' forward with the pre-norm output of every layer and each router's choice."""
    outs, routes, hooks = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach().clone())))
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: routes.__setitem__(i, (o[2].clone(), o[1].clone()))))
    try:
        with torch.no_grad():
            ref = model(ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return ref, outs, routes


def _check_routes(mine: _Routes, routes: dict) -> None:
    assert sorted(mine.idx) == sorted(routes)
    for layer, (idx, w) in routes.items():
        a, order_a = mine.idx[layer].sort(dim=-1)
        b, order_b = idx.sort(dim=-1)
        assert torch.equal(a, b), f"layer {layer}: routed experts differ from transformers' router"
        wa, wb = mine.w[layer].gather(1, order_a), w.gather(1, order_b)
        # float32 rounding: transformers computes the logits with F.linear, we with a matmul
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)


def test_stream_forward_matches_transformers(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    ids = _ids(tiny_fixture.config["vocab_size"])
    routes = _Routes()
    out = stream_forward(ck, ids, return_hidden_states=True, observer=routes)
    ref, layer_out, ref_routes = _reference(tiny_fixture.model, ids)

    n = tiny_fixture.config["num_hidden_layers"]
    assert len(out.hidden_states) == n + 1
    assert torch.equal(out.hidden_states[0], ref.hidden_states[0])  # embedding rows, exact
    errs = [(out.hidden_states[i + 1] - layer_out[i]).abs().max().item() for i in range(n)]
    final_err = (out.last_hidden_state - ref.hidden_states[-1]).abs().max().item()
    logit_err = (out.logits - ref.logits).abs().max().item()
    print(f"per-layer max abs error {errs}, final normed state {final_err:.2e}, logits {logit_err:.2e}")
    assert max(errs) < TOL and final_err < TOL and logit_err < TOL
    # The check can fail: the states are not trivially small and differ layer to layer.
    assert ref.logits.abs().max() > 0.1
    assert (out.hidden_states[-1] - out.hidden_states[-2]).abs().max() > 10 * TOL
    _check_routes(routes, ref_routes)


def test_grouped_routing_matches_transformers(grouped_fixture):
    """n_group 4 / topk_group 2 (DeepSeek-V3 style): the group-limited choice matches."""
    ck = Checkpoint.open(grouped_fixture.path)
    ids = _ids(grouped_fixture.config["vocab_size"], (2, 24), seed=3)
    routes = _Routes()
    out = stream_forward(ck, ids, observer=routes)
    ref, _, ref_routes = _reference(grouped_fixture.model, ids)
    assert (out.logits - ref.logits).abs().max() < TOL
    _check_routes(routes, ref_routes)


def test_unrouted_experts_are_never_read(tiny_fixture, monkeypatch):
    """Two tokens pick at most 4 of 8 experts per layer: the rest must never be read."""
    ck = Checkpoint.open(tiny_fixture.path)
    ids = _ids(tiny_fixture.config["vocab_size"], (1, 2), seed=7)
    read: list[str] = []
    orig = Checkpoint.read
    monkeypatch.setattr(ck, "read", lambda name: (read.append(name), orig(ck, name))[1])
    before = ck.source.bytes_read
    stream_forward(ck, ids)
    _, _, ref_routes = _reference(tiny_fixture.model, ids)

    unread = 0
    for layer, (idx, _) in ref_routes.items():
        routed = set(idx.flatten().tolist())
        loaded = {ck.tensors[n].parsed.expert for n in read if ck.tensors[n].parsed.role is Role.EXPERT and ck.tensors[n].parsed.layer == layer}
        assert loaded == routed, f"layer {layer}: read experts {sorted(loaded)}, routed {sorted(routed)}"
        unread += tiny_fixture.config["n_routed_experts"] - len(routed)
    assert unread > 0
    # Every byte fetched belongs to a tensor we asked for (plus FP8 scales and embedding/head rows).
    expert_bytes = sum(t.nbytes for t in ck.tensors.values() if t.parsed.role is Role.EXPERT)
    fetched = ck.source.bytes_read - before
    wanted = sum(ck.tensors[n].nbytes + (ck.scale_of(n).nbytes if ck.scale_of(n) else 0) for n in read)
    head = ck.tensors["lm_head.weight"].nbytes
    row = ck.tensors["model.embed_tokens.weight"].nbytes // tiny_fixture.config["vocab_size"]
    assert fetched == wanted + head + 2 * row or fetched == wanted + head + row
    assert fetched < ck.total_bytes() - expert_bytes / 4


def test_expert_reads_overlap_where_the_source_wants_it_and_change_nothing(tiny_fixture):
    # Headers are read at open; after that only the expert loop reads ahead, so any overlap
    # seen during the forward pass is the runner's read-ahead.
    ids = _ids(tiny_fixture.config["vocab_size"])
    plain = stream_forward(Checkpoint.open(tiny_fixture.path), ids)
    ck = Checkpoint.open(tiny_fixture.path)
    ck.source = SlowSource(ck.source, concurrency=4)
    ahead = stream_forward(ck, ids)
    assert 1 < ck.source.max_in_flight <= 4
    assert torch.equal(ahead.logits, plain.logits)


def test_layer_subset_matches_transformers_without_those_layers(tiny_fixture):
    """``layers=[0, 2]`` = the model with layers 1 and 3 removed (what a layer-pruned output computes)."""
    import copy

    ck = Checkpoint.open(tiny_fixture.path)
    ids = _ids(tiny_fixture.config["vocab_size"], (2, 12), seed=1)
    out = stream_forward(ck, ids, layers=[0, 2])
    model = copy.deepcopy(tiny_fixture.model)
    model.model.layers = torch.nn.ModuleList([model.model.layers[0], model.model.layers[2]])
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        ref = model(ids, use_cache=False)
    assert (out.logits - ref.logits).abs().max() < TOL


def test_spilled_activations_give_the_same_result(tiny_fixture, tmp_path):
    ck = Checkpoint.open(tiny_fixture.path)
    ids = _ids(tiny_fixture.config["vocab_size"], (2, 10), seed=2)
    ram = stream_forward(ck, ids)
    disk = stream_forward(ck, ids, memory_budget=1, spill_dir=tmp_path)
    assert torch.equal(ram.logits, disk.logits)
    assert not list(tmp_path.iterdir())  # spill files are removed once used


def test_read_rows_reads_only_the_rows(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    full = ck.read("model.embed_tokens.weight")
    before = ck.source.bytes_read
    ids = torch.tensor([[5, 6, 7, 900], [6, 0, 900, 5]])
    got = read_rows(ck, "model.embed_tokens.weight", ids)
    assert torch.equal(got, full[ids])
    assert ck.source.bytes_read - before == 5 * full.shape[1] * 2  # 5 distinct rows of BF16
    assert torch.equal(read_rows(ck, "lm_head.weight", slice(10, 20)), ck.read("lm_head.weight")[10:20])
