"""Scissorhands: persistence counts (attention >= 1/t over the history window), against eager attention by hand."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.scissorhands import Scissorhands
from tests.helpers import ids_of, kept_positions, prefill, record_scores
from tests.unit.methods.helpers import budget, top_positions


def _by_hand(attn: torch.Tensor, window: int, h: int) -> list[list[float]]:
    """attn (H_q, n, n): per KV head and slot i, how many (query head of the group, query j among the last `window`,
    j >= i) give slot i at least 1/(j + 1), the average over the j + 1 tokens query j attends to."""
    hq, n, _ = attn.shape
    g = hq // h
    out = []
    for head in range(h):
        counts = [0.0] * n
        for k in range(g):
            for j in range(max(0, n - window), n):
                for i in range(j + 1):
                    counts[i] += float(attn[head * g + k, j, i]) >= 1.0 / (j + 1)
        out.append(counts)
    return out


@pytest.mark.parametrize(("family", "window"), [("llama", 6), ("qwen3", 4), ("gemma3", 9)])
def test_counts_and_kept_tokens_match_the_rule(family, window, make_model):
    model = make_model(family, attn_implementation="eager")
    n, ratio = 36, 0.5
    ids = ids_of(n, seed=7)
    method = Scissorhands(ratio=ratio, window=window)
    seen = record_scores(method)
    cache = prefill(model, ids, method)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert seen
    for idx, scores in seen.items():
        expected = _by_hand(attentions[idx][0], window, 2)
        assert scores[0].tolist() == expected
        assert 0 < max(max(row) for row in expected) <= 2 * window  # real counts, not all zero
        for h in range(2):
            kept = kept_positions(cache.layer(idx), 0, h)
            assert kept == top_positions(expected[h], budget(n, ratio), set(range(n - window, n)))


def test_padding_does_not_change_the_counts(make_model):
    model = make_model("llama")
    row = ids_of(25, seed=2)[0]
    ids = torch.cat([torch.zeros(10, dtype=torch.long), row])[None]
    mask = torch.cat([torch.zeros(10, dtype=torch.long), torch.ones(25, dtype=torch.long)])[None]
    padded, alone = Scissorhands(ratio=0.5, window=5), Scissorhands(ratio=0.5, window=5)
    seen_padded, seen_alone = record_scores(padded), record_scores(alone)
    prefill(model, ids, padded, mask)
    prefill(model, row[None], alone)
    for idx, scores in seen_alone.items():
        assert seen_padded[idx][0, :, 10:].tolist() == scores[0].tolist()
        assert float(seen_padded[idx][0, :, :10].abs().max()) == 0.0


def test_validates_its_options():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="window"):
            Scissorhands(window=bad)
