"""`select`: top-k per (row, head), protected first, empty slots never, earlier slot wins ties, sorted output."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvsqueeze.methods.base import ScoreContext, ScorerMethod, select
from tests.helpers import ids_of, prefill


def kept_sets(indices: torch.Tensor, counts: torch.Tensor) -> list[list[list[int]]]:
    b, h, _ = indices.shape
    return [[indices[i, j, : int(counts[i, j])].tolist() for j in range(h)] for i in range(b)]


def slow_select(scores, valid, budget, protected=None):
    """Reference: loop over (row, head); protected first, then by score, earlier slot first on ties."""
    out = []
    for i in range(scores.shape[0]):
        row = []
        for j in range(scores.shape[1]):
            slots = [t for t in range(scores.shape[2]) if valid[i, j, t]]
            prot = [t for t in slots if protected is not None and protected[i, j, t]]
            rest = sorted((t for t in slots if t not in prot), key=lambda t: (-float(scores[i, j, t]), t))
            k = min(int(budget[i, j]), len(slots))
            row.append(sorted((prot + rest)[:k]))
        out.append(row)
    return out


def test_keeps_exactly_the_top_k():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 50, generator=gen)
    valid = torch.ones(3, 2, 50, dtype=torch.bool)
    budget = torch.tensor([[10, 10], [1, 50], [25, 3]])
    indices, counts = select(scores, valid, budget)
    assert counts.tolist() == budget.tolist()
    assert indices.shape == (3, 2, 50)
    for i in range(3):
        for j in range(2):
            k = int(budget[i, j])
            expected = sorted(torch.topk(scores[i, j], k).indices.tolist())
            assert indices[i, j, :k].tolist() == expected


def test_matches_a_slow_reference_with_everything_mixed():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (4, 3, 30), generator=gen).float()  # many ties
    valid = torch.rand(4, 3, 30, generator=gen) > 0.3
    protected = (torch.rand(4, 3, 30, generator=gen) > 0.85) & valid
    budget = torch.maximum(protected.sum(-1), torch.randint(1, 30, (4, 3), generator=gen))
    indices, counts = select(scores, valid, budget, protected)
    assert kept_sets(indices, counts) == slow_select(scores, valid, budget, protected)
    assert counts.tolist() == torch.minimum(budget, valid.sum(-1)).tolist()


def test_ties_keep_the_earlier_slot():
    scores = torch.zeros(1, 1, 10)
    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    indices, counts = select(scores, valid, torch.tensor([[4]]))
    assert kept_sets(indices, counts) == [[[0, 1, 2, 3]]]
    scores = torch.tensor([[[1.0, 2.0, 1.0, 2.0, 1.0, 2.0]]])
    indices, counts = select(scores, valid[..., :6], torch.tensor([[4]]))
    assert kept_sets(indices, counts) == [[[0, 1, 3, 5]]]


def test_protected_always_kept():
    scores = torch.arange(10.0).view(1, 1, 10)  # later = better
    valid = torch.ones(1, 1, 10, dtype=torch.bool)
    protected = torch.zeros(1, 1, 10, dtype=torch.bool)
    protected[0, 0, [0, 2]] = True  # the two worst-scored slots
    indices, counts = select(scores, valid, torch.tensor([[3]]), protected)
    assert kept_sets(indices, counts) == [[[0, 2, 9]]]


def test_padding_never_kept_even_with_a_large_budget():
    scores = torch.tensor([[[9.0, 8.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0]]])
    valid = torch.tensor([[[False, False, True, True, True], [False, True, False, True, False]]])
    indices, counts = select(scores, valid, torch.tensor([[100, 100]]))
    assert counts.tolist() == [[3, 2]]
    assert kept_sets(indices, counts) == [[[2, 3, 4], [1, 3]]]
    assert indices.shape[-1] == 3  # K = the largest count, not the budget


def test_output_is_sorted_with_kept_slots_first():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 2, 40, generator=gen)
    valid = torch.ones(2, 2, 40, dtype=torch.bool)
    budget = torch.tensor([[5, 17], [40, 1]])
    indices, counts = select(scores, valid, budget)
    assert indices.shape == (2, 2, 40)  # K = the largest budget
    for i in range(2):
        for j in range(2):
            kept = indices[i, j, : int(counts[i, j])]
            assert torch.all(kept[1:] > kept[:-1])
            assert int(indices[i, j].max()) < 40 and int(indices[i, j].min()) >= 0


def test_nan_scores_raise():
    scores = torch.tensor([[[1.0, float("nan"), 2.0]]])
    with pytest.raises(RuntimeError, match="NaN"):
        select(scores, torch.ones(1, 1, 3, dtype=torch.bool), torch.tensor([[2]]))


def test_nan_in_padding_is_ignored():
    scores = torch.tensor([[[float("nan"), 1.0, 2.0]]])
    valid = torch.tensor([[[False, True, True]]])
    indices, counts = select(scores, valid, torch.tensor([[1]]))
    assert kept_sets(indices, counts) == [[[2]]]


def test_minus_inf_scores_never_let_padding_in():
    scores = torch.tensor([[[0.0, float("-inf"), 5.0]]])
    valid = torch.tensor([[[False, True, True]]])
    indices, counts = select(scores, valid, torch.tensor([[2]]))
    assert kept_sets(indices, counts) == [[[1, 2]]]


def test_protected_padding_is_still_not_kept():
    valid = torch.tensor([[[False, True, True]]])
    protected = torch.tensor([[[True, False, False]]])
    indices, counts = select(torch.tensor([[[0.0, 1.0, 5.0]]]), valid, torch.tensor([[2]]), protected)
    assert kept_sets(indices, counts) == [[[1, 2]]]


@dataclass
class _LogProbLike(ScorerMethod):
    """A scorer that gives -inf to the first 10 positions (as log(0) would)."""

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.where(ctx.positions < 10, float("-inf"), 0.0)


def test_minus_inf_scores_through_compress(make_model):
    model = make_model("llama")
    ids = ids_of(40, batch=2)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :20] = 0  # row 1: 20 real tokens
    cache = prefill(model, ids, _LogProbLike(ratio=0.1), mask)
    for layer in cache.full_layers():
        assert layer.kept.tolist() == [[36, 36], [18, 18]]  # floor(n * 0.9) real tokens per row
