"""Budget allocation math (kvsqueeze.budgets) and the budget-policy wrappers, against slow obvious references."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.budgets import comparable_scores, pooled_counts, spread, two_stage_order
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from kvsqueeze.methods.criticalkv import projected_value_norms


def reference_pooled_counts(scores, valid, total, safeguard):
    b, s, _ = scores.shape
    out = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        rest = []
        for g in range(s):
            real = sorted([float(x) for x, v in zip(scores[r, g], valid[r, g], strict=True) if v], reverse=True)
            k = min(int(safeguard[r, g]), len(real))
            out[r, g] = k
            rest += [(x, g) for x in real[k:]]
        rest.sort(key=lambda p: -p[0])
        for _, g in rest[: max(0, int(total[r]) - int(out[r].sum()))]:
            out[r, g] += 1
    return out


def test_pooled_counts_match_a_slow_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        b, s, t = 2, 3, 9
        scores = torch.randn(b, s, t, generator=gen) * (1 + trial % 3)
        valid = torch.rand(b, s, t, generator=gen) > 0.2
        total = torch.randint(0, 12, (b,), generator=gen)
        safeguard = torch.randint(0, 3, (b, s), generator=gen)
        got = pooled_counts(scores, valid, total, safeguard)
        assert torch.equal(got, reference_pooled_counts(scores, valid, total, safeguard))
        assert (got <= valid.sum(-1)).all()
        assert torch.equal(got.sum(-1), torch.minimum(total.clamp(min=safeguard.sum(-1)), valid.sum((1, 2))))


def test_pooled_counts_follow_the_scores():
    # head 0 has two strong tokens and weak ones; head 1 is flat: with no safeguard, the pool of 4 takes head 0's
    # two strong tokens and two of head 1; a safeguard of 2 per head gives the same here, a total of 2 only head 0
    scores = torch.tensor([[[0.9, 0.8, 0.01, 0.01], [0.3, 0.3, 0.3, 0.3]]]).log()
    valid = torch.ones(1, 2, 4, dtype=torch.bool)
    assert pooled_counts(scores, valid, torch.tensor([4]), torch.zeros(1, 2)).tolist() == [[2, 2]]
    assert pooled_counts(scores, valid, torch.tensor([2]), torch.zeros(1, 2)).tolist() == [[2, 0]]
    assert pooled_counts(scores, valid, torch.tensor([2]), torch.ones(1, 2)).tolist() == [[1, 1]]


def test_comparable_scores():
    scores = torch.tensor([[[1.0, 2.0, 3.0], [0.5, 0.25, 0.25]], [[-1.0, 2.0, 0.0], [1.0, 1.0, 1.0]]])
    valid = torch.tensor([[[True, True, False], [True, True, True]]] * 2)
    soft = comparable_scores(scores, valid, "softmax")
    torch.testing.assert_close(soft.exp().sum(-1), torch.ones(2, 2))
    assert soft[0, 0, 2] == float("-inf")
    by_sum = comparable_scores(scores[:1], valid[:1], "sum").exp()
    torch.testing.assert_close(by_sum[0, 1], torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(by_sum[0, 0, :2], torch.tensor([1 / 3, 2 / 3]))
    auto = comparable_scores(scores, valid, "auto")  # row 0 non-negative: sum; row 1 has a negative score: softmax
    torch.testing.assert_close(auto[0], comparable_scores(scores[:1], valid[:1], "sum")[0])
    torch.testing.assert_close(auto[1], soft[1])
    with pytest.raises(ValueError, match="non-negative"):
        comparable_scores(scores, valid, "sum")
    with pytest.raises(ValueError, match="'max'"):
        comparable_scores(scores, valid, "max")


def test_two_stage_order_is_stage_one_then_stage_two():
    gen = torch.Generator().manual_seed(3)
    first, second = torch.rand(1, 2, 10, generator=gen), torch.rand(1, 2, 10, generator=gen) * 5
    valid = torch.ones(1, 2, 10, dtype=torch.bool)
    valid[0, 1, 0] = False
    n_first = torch.tensor([[2, 3]])
    order = two_stage_order(first, second, valid, n_first)
    for h, k in ((0, 5), (1, 6)):
        real = [i for i in range(10) if valid[0, h, i]]
        stage1 = sorted(real, key=lambda i: -float(first[0, h, i]))[: int(n_first[0, h])]
        stage2 = sorted((i for i in real if i not in stage1), key=lambda i: -float(second[0, h, i]))
        expected = set(stage1 + stage2[: k - len(stage1)])
        top = order[0, h].masked_fill(~valid[0, h], float("-inf")).topk(k).indices.tolist()
        assert set(top) == expected


def test_spread_keeps_the_mean_and_the_caps():
    budgets = spread(10.0, [1.0, 1.0, 8.0], cap=15.0)
    assert budgets[2] == 15.0 and budgets[0] == budgets[1] == 7.5
    assert math.isclose(sum(budgets) / 3, 10.0)
    low = spread(10.0, [0.0, 1.0, 1.0], cap=20.0, floor=4.0)
    assert low == [4.0, 13.0, 13.0]
    with pytest.raises(ValueError, match="weights"):
        spread(1.0, [-1.0, 2.0], cap=2.0)


def test_projected_value_norms_match_a_loop():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(2, 2, 5, 4, generator=gen)  # (B, H, T, D)
    w_o = torch.randn(4, 4, 6, generator=gen)  # (H_q = 4, D, out): G = 2 query heads per KV head
    got = projected_value_norms(values, w_o, chunk=2)
    for b in range(2):
        for h in range(2):
            for t in range(5):
                per_q = [(values[b, h, t] @ w_o[2 * h + g]).abs().sum() for g in range(2)]
                torch.testing.assert_close(got[b, h, t], sum(per_q) / 2)


# --- Ada-KV plan on hand-made scores ----------------------------------------------------------------------------------


@dataclass
class FirstChannel(ScorerMethod):
    """Test scorer: the score of a slot is its key's first channel."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.keys[..., 0]


def context(scores: torch.Tensor) -> ScoreContext:
    b, h, t = scores.shape
    keys = torch.zeros(b, h, t, 2)
    keys[..., 0] = scores
    return ScoreContext(
        keys=keys,
        values=keys.clone(),
        positions=torch.arange(t).expand(b, h, t),
        hidden_states=torch.zeros(b, 1, 4),
        query_positions=torch.full((b, 1), t - 1),
        position_embeddings=(torch.zeros(b, 1, 2), torch.zeros(b, 1, 2)),
        seen=torch.full((b,), t),
        layer_idx=0,
        module=torch.nn.Identity(),
        adapter=None,  # type: ignore[arg-type]
    )


def test_adakv_plan_pools_the_layer_budget_with_a_safeguard():
    probs = torch.tensor([[[0.7, 0.2, 0.05, 0.03, 0.01, 0.01], [0.2, 0.2, 0.15, 0.15, 0.15, 0.15]]])
    ctx = context(probs)
    ada = kvs.get_method("adakv", ratio=0.5, scorer=FirstChannel(), alpha=0.0)
    indices, counts = ada.plan(ctx)
    # a pool of 2 x 3 = 6 over the sum-normalized scores takes 0.7, 0.2 (head 0), 0.2, 0.2, 0.15, 0.15 (head 1)
    assert counts.tolist() == [[2, 4]]
    assert indices[0, 0, :2].tolist() == [0, 1]
    assert indices[0, 1, :4].tolist() == [0, 1, 2, 3]
    safe = kvs.get_method("adakv", ratio=0.5, scorer=FirstChannel(), alpha=1.0)  # safeguard = whole share: uniform
    assert safe.plan(ctx)[1].tolist() == [[3, 3]]


def test_wrappers_validate_their_options():
    with pytest.raises(ValueError, match="alpha"):
        kvs.get_method("adakv", alpha=1.5)
    with pytest.raises(ValueError, match="normalize"):
        kvs.get_method("adakv", normalize="max")
    with pytest.raises(ValueError, match="scorer"):
        kvs.get_method("adakv", scorer=kvs.get_method("adakv"))
    with pytest.raises(ValueError, match="first_share"):
        kvs.get_method("criticalkv", first_share=2.0)
    with pytest.raises(ValueError, match="weights"):
        kvs.get_method("layer_budgets", weights=[1.0, -2.0])
    with pytest.raises(ValueError, match=r"global_budget: scorer must be a scoring method .*Did you mean 'knorm'"):
        kvs.get_method("global_budget", scorer="knrom")
    assert kvs.get_method("adakv", scorer="knorm", ratio=0.25).scorer == kvs.get_method("knorm", ratio=0.25)
