"""VATP: window-accumulated attention times the value's L1 norm, against the model's eager attention by hand."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.vatp import VATP
from tests.helpers import ids_of, kept_positions, prefill, record_scores
from tests.unit.methods.helpers import budget, top_positions


def _by_hand(attn: torch.Tensor, values: torch.Tensor, window: int) -> list[list[float]]:
    """attn (H_q, n, n) eager weights, values (H, n, D) -> per KV head, per slot: mean over the group's query heads
    and the last `window` queries of the attention, times sum_d |v|."""
    hq, n, _ = attn.shape
    h = values.shape[0]
    g = hq // h
    rows = range(max(0, n - window), n)
    out = []
    for head in range(h):
        scores = []
        for i in range(n):
            total = sum(float(attn[head * g + k, j, i]) for k in range(g) for j in rows)
            l1 = sum(abs(float(x)) for x in values[head, i])
            scores.append(total / (g * len(rows)) * l1)
        out.append(scores)
    return out


@pytest.mark.parametrize(("family", "window"), [("llama", 5), ("qwen3", 64), ("gemma2", 3)])
def test_scores_and_kept_tokens_match_the_rule(family, window, make_model):
    model = make_model(family, attn_implementation="eager")
    n, ratio = 30, 0.5
    ids = ids_of(n, seed=3)
    method = VATP(ratio=ratio, window=window, n_sink=2, n_recent=3)
    seen = record_scores(method)
    cache = prefill(model, ids, method)
    dense = prefill(model, ids, None)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert seen, "VATP scored nothing"
    for idx, scores in seen.items():
        expected = _by_hand(attentions[idx][0], dense.layer(idx).values[0], window)
        torch.testing.assert_close(scores[0], torch.tensor(expected), atol=1e-6, rtol=1e-4)
        protected = {0, 1, n - 3, n - 2, n - 1}
        for h in range(2):
            assert kept_positions(cache.layer(idx), 0, h) == top_positions(expected[h], budget(n, ratio), protected)


def test_value_norm_changes_the_choice(make_model):
    """Same attention, different values: the scores are the attention scaled by each slot's value L1 norm."""
    model = make_model("llama", attn_implementation="eager")
    method = VATP(ratio=0.5, window=4, n_sink=0, n_recent=0)
    seen = record_scores(method)
    dense = prefill(model, ids_of(20, seed=1), None)
    prefill(model, ids_of(20, seed=1), method)
    for idx, scores in seen.items():
        l1 = dense.layer(idx).values[0].abs().sum(-1)  # (H, T)
        ratio = scores[0] / l1
        assert not torch.allclose(scores[0] / scores[0].sum(-1, keepdim=True), ratio / ratio.sum(-1, keepdim=True))


def test_validates_its_options():
    for bad in ({"window": 0}, {"n_sink": -1}, {"n_recent": -2}, {"window": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            VATP(**bad)
