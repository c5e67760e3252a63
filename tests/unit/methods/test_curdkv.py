"""CurDKV's windowed leverage product, checked against a loop over windows."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.curdkv import CurDKV
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import budget, fake_ctx, top_positions


def _reference(keys: list[list[float]], values: list[list[float]], window: int) -> list[float]:
    n = len(keys)
    k2 = [sum(x * x for x in k) for k in keys]
    v2 = [sum(x * x for x in v) for v in values]
    out = []
    for i in range(n):
        lo = (i // window) * window if window else 0
        hi = min(n, lo + window) if window else n
        out.append(k2[i] / sum(k2[lo:hi]) * v2[i] / sum(v2[lo:hi]))
    return out


@pytest.mark.parametrize(("n", "window"), [(40, 16), (33, 5), (20, 0), (7, 16)])
def test_curdkv_scores_by_hand(n, window):
    gen = torch.Generator().manual_seed(n + window)
    keys, values = torch.randn(2, 2, n, 6, generator=gen), torch.randn(2, 2, n, 6, generator=gen)
    scores = CurDKV(window=window).score(fake_ctx(keys, values))
    for b in range(2):
        for h in range(2):
            expected = torch.tensor(_reference(keys[b, h].tolist(), values[b, h].tolist(), window))
            torch.testing.assert_close(scores[b, h], expected, rtol=1e-5, atol=1e-8)


def test_curdkv_windows_sum_to_at_most_one_and_ignore_padding():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 1, 24, 4, generator=gen), torch.randn(1, 1, 24, 4, generator=gen)
    positions = torch.cat([torch.full((4,), -1), torch.arange(20)]).int().view(1, 1, 24)
    scores = CurDKV(window=8).score(fake_ctx(keys, values, positions))
    assert torch.all(scores[0, 0, :4] == 0)
    alone = CurDKV(window=8).score(fake_ctx(keys[:, :, 4:], values[:, :, 4:]))
    torch.testing.assert_close(scores[..., 4:], alone)
    for lo in (0, 8, 16):  # a window's products are at most the product of its shares' sums (1 * 1)
        assert float(alone[0, 0, lo : lo + 8].sum()) <= 1.0 + 1e-6


def test_curdkv_keeps_the_top_products(make_model):
    model = make_model("mistral")
    n, ratio, window = 50, 0.75, 8
    dense = prefill(model, ids_of(n), None)
    cache = prefill(model, ids_of(n), CurDKV(ratio=ratio, window=window))
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for h in range(2):
            scores = _reference(ref.keys[0, h].tolist(), ref.values[0, h].tolist(), window)
            assert kept_positions(layer, 0, h) == top_positions(scores, budget(n, ratio))


def test_curdkv_validates_window():
    with pytest.raises(ValueError, match=r"window must be an integer >= 0 \(0 = the whole head\), got -1"):
        CurDKV(window=-1)
