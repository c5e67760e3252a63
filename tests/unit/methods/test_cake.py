"""CAKE: layer preferences (entropy, variance), proportional layer budgets and the mean + gamma variance indicator,
against the model's eager attention by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.methods._shares import capped_shares, integer_shares
from kvsqueeze.methods.cake import CAKE
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import budget


def _stats(attn: torch.Tensor, window: int) -> tuple[float, float, list[list[float]], list[list[float]]]:
    """attn (H_q, n, n) -> entropy and summed variance over the earlier slots, and per query head and slot the mean
    and (unbiased) variance of the attention of the last `window` queries."""
    hq, n, _ = attn.shape
    rows = list(range(n - window, n))
    entropy = shift = 0.0
    means, variances = [], []
    for k in range(hq):
        m_row, v_row = [], []
        for i in range(n):
            xs = [float(attn[k, j, i]) for j in rows]
            m = sum(xs) / len(xs)
            v = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
            m_row.append(m)
            v_row.append(v)
            if i < n - window:
                entropy -= sum(x * math.log(x + 1e-10) for x in xs)
                shift += v
        means.append(m_row)
        variances.append(v_row)
    return entropy, shift, means, variances


def _indicator(means, variances, gamma: float, kernel: int, h: int) -> list[list[float]]:
    hq, n = len(means), len(means[0])
    g = hq // h
    out = []
    for head in range(h):
        row = []
        for i in range(n):
            near = range(max(0, i - kernel // 2), min(n, i + kernel // 2 + 1))
            total = 0.0
            for k in range(head * g, head * g + g):
                total += sum(means[k][j] + gamma * variances[k][j] for j in near) / len(near)
            row.append(total / g)
        out.append(row)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layer_budgets_and_kept_tokens_match_the_rule(family, make_model):
    model = make_model(family, attn_implementation="eager")
    n, ratio, window, kernel, gamma, tau1, tau2 = 40, 0.5, 6, 3, 5.0, 1.3, 0.7
    ids = ids_of(n, seed=11)
    method = CAKE(ratio=ratio, window=window, kernel=kernel, gamma=gamma, tau1=tau1, tau2=tau2)
    cache = prefill(model, ids, method)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    keep = budget(n, ratio)
    stats = [_stats(attentions[i][0], window) for i in range(4)]
    prefs = [e ** (1 / tau1) * v ** (1 / tau2) for e, v, _, _ in stats]
    rest = 4 * (keep - window)
    shares = [rest * p / sum(prefs) for p in prefs]
    assert max(shares) < n - window  # no cap in this case: plain proportions
    whole = [math.floor(s) for s in shares]
    for i in sorted(range(4), key=lambda i: -(shares[i] - whole[i]))[: rest - sum(whole)]:
        whole[i] += 1
    assert len(set(whole)) > 1, "layers get different budgets"
    for idx, layer in enumerate(cache.full_layers()):
        _, _, means, variances = stats[idx]
        scores = _indicator(means, variances, gamma, kernel, 2)
        for h in range(2):
            earlier = sorted(range(n - window), key=lambda i: (-scores[h][i], i))[: whole[idx]]
            assert kept_positions(layer, 0, h) == sorted(earlier) + list(range(n - window, n))
    assert sum(int(layer.kept[0, 0]) for layer in cache.full_layers()) == 4 * keep


def test_capped_shares_spread_the_overflow_in_proportion():
    assert capped_shares(10.0, [1.0, 1.0, 2.0], [100, 100, 100]) == [2.5, 2.5, 5.0]
    assert capped_shares(10.0, [1.0, 1.0, 8.0], [100, 100, 4]) == [3.0, 3.0, 4.0]
    assert capped_shares(6.0, [0.0, 0.0], [5, 5]) == [3.0, 3.0]
    assert integer_shares([2.5, 2.5, 5.0], 10, [9, 9, 9]) == [3, 2, 5]  # ties: the earlier layer
    assert integer_shares([1.2, 1.9, 2.9], 6, [9, 1, 9]) == [2, 1, 3]  # capped layers get no extra token


def test_model_total_is_exact_and_window_kept(make_model):
    model = make_model("mistral")
    n = 57
    cache = prefill(model, ids_of(n, seed=4), CAKE(ratio=0.7, window=4))
    kept = [int(layer.kept[0, 0]) for layer in cache.full_layers()]
    assert sum(kept) == 4 * budget(n, 0.7)
    for layer in cache.full_layers():
        for h in range(2):
            assert kept_positions(layer, 0, h)[-4:] == list(range(n - 4, n))


def test_window_larger_than_the_budget_is_refused(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="window"):
        prefill(model, ids_of(20), CAKE(ratio=0.9, window=8))


def test_validates_its_options():
    for bad in ({"window": 0}, {"kernel": 2}, {"gamma": -1.0}, {"tau1": 0}, {"tau2": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CAKE(**bad)
