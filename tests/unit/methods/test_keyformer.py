"""Keyformer: the accumulated Gumbel-softmax score, against the model's eager attention with the same noise, by hand."""

from __future__ import annotations

import math

import pytest
import torch

import kvsqueeze.methods.keyformer as keyformer_module
from kvsqueeze.methods.keyformer import Keyformer, gumbel_noise
from tests.helpers import ids_of, kept_by_layer, kept_positions, prefill, record_scores
from tests.unit.methods.helpers import budget, top_positions


def _by_hand(attn: torch.Tensor, noise: torch.Tensor, tau: float, h: int) -> list[list[float]]:
    """attn (H_q, n, n) eager weights; noise (H, G*n, n) the Gumbel draws (query head g of KV head h, query j at row
    g*n + j). Per KV head and slot i: mean over the group of sum over queries j >= i of
    exp((x_ji + g_ji) / tau) / sum_{k <= j} exp((x_jk + g_jk) / tau), with x = log(attention) (a softmax's logits up
    to a per-row constant, which cancels)."""
    hq, n, _ = attn.shape
    g = hq // h
    out = []
    for head in range(h):
        scores = [0.0] * n
        for k in range(g):
            for j in range(n):
                row, drawn = attn[head * g + k, j], noise[head, k * n + j]
                z = [(math.log(float(row[i])) + float(drawn[i])) / tau for i in range(j + 1)]
                top = max(z)
                e = [math.exp(v - top) for v in z]
                for i in range(j + 1):
                    scores[i] += e[i] / sum(e) / g
        out.append(scores)
    return out


@pytest.mark.parametrize(("family", "tau"), [("llama", 1.0), ("qwen3", 1.7)])
def test_scores_match_the_rule_with_the_drawn_noise(family, tau, make_model, monkeypatch):
    model = make_model(family, attn_implementation="eager")
    n, ratio = 24, 0.5
    ids = ids_of(n, seed=2)
    draws: list[torch.Tensor] = []

    def recording(shape, generator, device):
        out = gumbel_noise(shape, generator, device)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(keyformer_module, "gumbel_noise", recording)
    method = Keyformer(ratio=ratio, tau=tau, recent_ratio=0.25, block_size=256)  # one block: one draw per layer
    seen = record_scores(method)
    cache = prefill(model, ids, method)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert len(draws) == len(seen) > 0
    keep = budget(n, ratio)
    recent = set(range(n - math.floor(keep * 0.25), n))
    for noise, (idx, scores) in zip(draws, sorted(seen.items()), strict=True):
        assert noise.shape == (1, 2, 2 * n, n)  # (B, H, G*n, T)
        expected = _by_hand(attentions[idx][0], noise[0], tau, 2)
        torch.testing.assert_close(scores[0], torch.tensor(expected), atol=1e-5, rtol=1e-4)
        for h in range(2):
            assert kept_positions(cache.layer(idx), 0, h) == top_positions(expected[h], keep, recent)


def test_blocks_change_only_the_draws_not_the_rule(make_model, monkeypatch):
    """Without noise the score is the accumulated softmax at temperature tau, whatever the block size."""
    monkeypatch.setattr(keyformer_module, "gumbel_noise", lambda shape, generator, device: torch.zeros(shape))
    model = make_model("llama", attn_implementation="eager")
    ids = ids_of(20, seed=5)
    big, small = Keyformer(ratio=0.5, tau=2.0, block_size=256), Keyformer(ratio=0.5, tau=2.0, block_size=3)
    seen_big, seen_small = record_scores(big), record_scores(small)
    prefill(model, ids, big)
    prefill(model, ids, small)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    for idx, scores in seen_big.items():
        expected = _by_hand(attentions[idx][0], torch.zeros(2, 40, 20), 2.0, 2)
        torch.testing.assert_close(scores[0], torch.tensor(expected), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(seen_small[idx], scores, atol=1e-6, rtol=1e-5)


def test_deterministic_for_a_seed(make_model):
    model = make_model("qwen2")
    ids = ids_of(40, seed=9)
    kept = []
    for seed in (3, 3, 4):
        cache = prefill(model, ids, Keyformer(ratio=0.6, seed=seed))
        kept.append(kept_by_layer(cache))
    assert kept[0] == kept[1]
    assert kept[0] != kept[2]


def test_gumbel_noise_has_the_gumbel_moments():
    x = gumbel_noise(torch.Size([200_000]), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert abs(float(x.mean()) - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(float(x.var()) - math.pi**2 / 6) < 0.03


def test_validates_its_options():
    for bad in ({"tau": 0}, {"tau": -1.0}, {"recent_ratio": 1.5}, {"seed": 1.5}, {"block_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Keyformer(**bad)
