"""LagKV's lag-relative scores, checked against a loop over partitions written from the paper's description."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.methods.lagkv import LagKV
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import budget, fake_ctx, top_positions


def _std(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _partition_scores(part: list[list[float]], ref: list[list[float]]) -> list[float]:
    d = len(part[0])
    lo = [min(r[c] for r in ref) for c in range(d)]
    hi = [max(r[c] for r in ref) for c in range(d)]
    spread = [_std([(x[c] - lo[c]) / max(hi[c] - lo[c], 1e-6) for c in range(d)]) for x in part]
    top = max(spread)
    e = [math.exp(s - top) for s in spread]
    return [v / sum(e) for v in e]


def _reference(keys: list[list[float]], values: list[list[float]], n_sink: int, size: int) -> dict[int, float]:
    """Scores of the scored positions (position -> score); the others are protected."""
    n = len(keys)
    n_complete = (n - n_sink) // size
    out: dict[int, float] = {}
    for j in range(n_complete - 1):
        lo, mid, hi = n_sink + j * size, n_sink + (j + 1) * size, n_sink + (j + 2) * size
        sk = _partition_scores(keys[lo:mid], keys[mid:hi])
        sv = _partition_scores(values[lo:mid], values[mid:hi])
        for i in range(size):
            out[lo + i] = (sk[i] + sv[i]) / 2
    return out


@pytest.mark.parametrize(("n", "n_sink", "size"), [(45, 4, 8), (40, 0, 8), (37, 3, 5), (12, 4, 8)])
def test_lagkv_scores_by_hand(n, n_sink, size):
    gen = torch.Generator().manual_seed(n)
    keys, values = torch.randn(1, 2, n, 6, generator=gen), torch.randn(1, 2, n, 6, generator=gen)
    method = LagKV(n_sink=n_sink, partition_size=size)
    ctx = fake_ctx(keys, values)
    scores, protected = method.score(ctx), method.protected(ctx)
    for h in range(2):
        expected = _reference(keys[0, h].tolist(), values[0, h].tolist(), n_sink, size)
        assert sorted(p for p in range(n) if not protected[0, h, p]) == sorted(expected)
        for p, s in expected.items():
            assert float(scores[0, h, p]) == pytest.approx(s, rel=1e-4, abs=1e-6)


def test_lagkv_partitions_follow_positions_not_slots():
    """Left padding shifts slots, not partitions: the padded row scores exactly as the row alone."""
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 30, 4, generator=gen), torch.randn(1, 2, 30, 4, generator=gen)
    pad_k, pad_v = torch.cat([torch.zeros(1, 2, 5, 4), keys], dim=2), torch.cat([torch.zeros(1, 2, 5, 4), values], 2)
    positions = torch.cat([torch.full((5,), -1), torch.arange(30)]).int().expand(1, 2, 35)
    method = LagKV(n_sink=2, partition_size=6)
    alone = method.score(fake_ctx(keys, values))
    padded = method.score(fake_ctx(pad_k, pad_v, positions.clone()))
    torch.testing.assert_close(padded[..., 5:], alone)


def test_lagkv_keeps_sinks_tail_and_best_scores(make_model):
    model = make_model("llama")
    n, ratio, n_sink, size = 61, 0.5, 4, 8
    dense = prefill(model, ids_of(n), None)
    cache = prefill(model, ids_of(n), LagKV(ratio=ratio, n_sink=n_sink, partition_size=size))
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for h in range(2):
            expected = _reference(ref.keys[0, h].tolist(), ref.values[0, h].tolist(), n_sink, size)
            protected = {p for p in range(n) if p not in expected}
            assert protected == {*range(4), *range(4 + 6 * 8, 61)}  # sinks, the last complete partition, the tail
            scores = [expected.get(p, 0.0) for p in range(n)]
            assert kept_positions(layer, 0, h) == top_positions(scores, budget(n, ratio), protected)


def test_lagkv_validates_options():
    with pytest.raises(ValueError, match="partition_size"):
        LagKV(partition_size=1)
    with pytest.raises(ValueError, match="n_sink"):
        LagKV(n_sink=-1)
