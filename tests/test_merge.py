"""Expert merging: output-cosine similarity, frequency-weighted groups, streamed weighted sums."""

import torch

from k2mini.selection.merge import merge_plan, merge_tensor, output_similarity


def test_output_similarity_is_cosine_over_tokens_and_units():
    g = torch.Generator().manual_seed(0)
    outs = torch.randn(10, 4, 6, generator=g)
    sim = output_similarity(outs)
    for i in range(4):
        for j in range(4):
            a, b = outs[:, i].flatten().double(), outs[:, j].flatten().double()
            assert abs(float(sim[i, j]) - float(a @ b / (a.norm() * b.norm()))) < 1e-5


def test_pruned_expert_joins_its_copy_weighted_by_frequency():
    g = torch.Generator().manual_seed(1)
    outs = torch.randn(20, 5, 3, generator=g)
    outs[:, 4] = 2.0 * outs[:, 1]  # expert 4 computes what expert 1 does (cosine 1)
    plan = merge_plan([0, 1, 2], output_similarity(outs), frequency=[5, 9, 3, 0, 29])
    assert dict(plan[1]) == {1: 10 / 40, 4: 30 / 40}
    assert {e for parts in plan.values() for e, _ in parts} == {0, 1, 2, 3, 4}
    assert all(abs(sum(w for _, w in parts) - 1) < 1e-12 for parts in plan.values())


def test_merge_tensor_is_the_weighted_sum():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(merge_tensor([(a.bfloat16(), 0.25), (b.bfloat16(), 0.75)]), 0.25 * a.bfloat16().float() + 0.75 * b.bfloat16().float())
