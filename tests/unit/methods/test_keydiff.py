"""KeyDiff keeps the keys least similar to the mean normalized key, checked against a loop over plain floats."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.methods.keydiff import KeyDiff
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import budget, fake_ctx, top_positions


def _reference(keys: list[list[float]]) -> list[float]:
    """-cos(k_i, mean_j k_j / |k_j|), one key at a time."""
    d = len(keys[0])
    norms = [math.sqrt(sum(x * x for x in k)) for k in keys]
    anchor = [sum(k[c] / n for k, n in zip(keys, norms, strict=True)) / len(keys) for c in range(d)]
    a_norm = math.sqrt(sum(x * x for x in anchor))
    dot = [sum(x * y for x, y in zip(k, anchor, strict=True)) for k in keys]
    return [-p / (n * a_norm) for p, n in zip(dot, norms, strict=True)]


def test_keydiff_score_by_hand():
    keys = torch.randn(2, 3, 17, 8, generator=torch.Generator().manual_seed(0))
    scores = KeyDiff().score(fake_ctx(keys))
    for b in range(2):
        for h in range(3):
            expected = torch.tensor(_reference(keys[b, h].tolist()))
            torch.testing.assert_close(scores[b, h], expected, atol=1e-5, rtol=1e-5)


def test_keydiff_ignores_empty_slots():
    keys = torch.randn(1, 1, 10, 4, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[[-1, -1, -1, 0, 1, 2, 3, 4, 5, 6]]], dtype=torch.int32)
    scores = KeyDiff().score(fake_ctx(keys, positions=positions))
    expected = torch.tensor(_reference(keys[0, 0, 3:].tolist()))
    torch.testing.assert_close(scores[0, 0, 3:], expected, atol=1e-5, rtol=1e-5)


def test_keydiff_prefers_the_odd_key_out():
    base = torch.tensor([1.0, 0.0, 0.0, 0.0])
    keys = torch.stack([base * (1 + i) for i in range(5)] + [torch.tensor([0.0, 1.0, 0.0, 0.0])])[None, None]
    scores = KeyDiff().score(fake_ctx(keys))
    assert int(scores[0, 0].argmax()) == 5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_keydiff_keeps_the_most_distinctive_keys(family, make_model):
    model = make_model(family)
    n, ratio = 41, 0.5
    dense = prefill(model, ids_of(n), None)
    cache = prefill(model, ids_of(n), KeyDiff(ratio=ratio))
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for h in range(2):
            scores = _reference(ref.keys[0, h].tolist())
            assert kept_positions(layer, 0, h) == top_positions(scores, budget(n, ratio))
