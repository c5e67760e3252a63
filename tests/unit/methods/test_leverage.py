"""Leverage scores (exact and sketched) against an SVD reference; the sketch approximates the exact scores."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.leverage import Leverage, leverage_scores
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import budget, fake_ctx, top_positions


def _svd_leverage(k: torch.Tensor) -> torch.Tensor:
    """Squared row norms of the left singular vectors of k (n, d) with a non-negligible singular value."""
    u, s, _ = torch.linalg.svd(k.double(), full_matrices=False)
    rank = int((s > s.max() * 1e-10).sum())
    return (u[:, :rank] ** 2).sum(dim=1)


def test_exact_leverage_matches_the_svd():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 40, 8, generator=gen)
    keys[0, 0, :, 4:] = keys[0, 0, :, :4]  # a rank-deficient head
    scores = leverage_scores(keys, torch.arange(40).int().expand(2, 3, 40))
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(scores[b, h], _svd_leverage(keys[b, h]), atol=1e-8, rtol=1e-6)
    assert float(scores[0, 0].sum()) == pytest.approx(4.0)  # the leverage scores sum to the rank
    assert float(scores[1, 2].sum()) == pytest.approx(8.0)


def test_sketched_leverage_by_hand():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 1, 30, 4, generator=gen)
    rows, seed = 12, 5
    s = torch.randn(rows, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / rows**0.5
    k = keys[0, 0].double()
    sk = s @ k
    expected = torch.stack([k[i] @ torch.linalg.pinv(sk.T @ sk) @ k[i] for i in range(30)])
    scores = leverage_scores(keys, torch.arange(30).int().view(1, 1, 30), rows, seed)
    torch.testing.assert_close(scores[0, 0], expected, atol=1e-8, rtol=1e-6)


def test_sketch_approximates_and_follows_positions():
    gen = torch.Generator().manual_seed(2)
    keys = (torch.randn(1, 1, 600, 16, generator=gen) @ torch.randn(16, 16, generator=gen)).contiguous()
    pos = torch.arange(600).int().view(1, 1, 600)
    exact = leverage_scores(keys, pos)
    approx = leverage_scores(keys, pos, 512)
    assert float(torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1]) > 0.95
    # left padding: empty slots score 0 and the real ones exactly as without padding (columns follow positions)
    padded = leverage_scores(
        torch.cat([torch.ones(1, 1, 7, 16), keys], 2), torch.cat([torch.full((1, 1, 7), -1), pos], 2), 512
    )
    assert torch.all(padded[..., :7] == 0)
    torch.testing.assert_close(padded[..., 7:], approx)


def test_leverage_keeps_the_outlier():
    keys = torch.randn(1, 1, 50, 8, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0] * 7 + [0.01])
    keys[0, 0, 17, 7] = 5.0  # the only key along the last direction
    scores = Leverage(sketch_rows=0).score(fake_ctx(keys))
    assert int(scores[0, 0].argmax()) == 17


def test_leverage_keeps_the_top_scores(make_model):
    model = make_model("qwen3")
    n, ratio = 61, 0.5
    dense = prefill(model, ids_of(n), None)
    cache = prefill(model, ids_of(n), Leverage(ratio=ratio, sketch_rows=0))
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for h in range(2):
            scores = _svd_leverage(ref.keys[0, h]).tolist()
            assert kept_positions(layer, 0, h) == top_positions(scores, budget(n, ratio))


def test_leverage_is_seeded_per_layer():
    keys = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(4))
    a, b = Leverage(sketch_rows=16, seed=1), Leverage(sketch_rows=16, seed=2)
    assert torch.equal(a.score(fake_ctx(keys)), a.score(fake_ctx(keys)))
    assert not torch.equal(a.score(fake_ctx(keys)), b.score(fake_ctx(keys)))
    assert not torch.equal(a.score(fake_ctx(keys)), a.score(fake_ctx(keys, layer_idx=1)))


def test_leverage_validates_options():
    with pytest.raises(ValueError, match="sketch_rows"):
        Leverage(sketch_rows=-1)
