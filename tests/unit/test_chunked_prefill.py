"""Chunked prefill with compression between chunks: the cache never holds more than the budget plus one chunk
(peak bytes from the cache's own tracker), and chunking without compression changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.pipeline import prefill
from tests.helpers import ids_of

N = 97
PER_TOKEN = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head_dim 16, fp32: bytes per token in one layer
SCORERS = {"knorm": {}, "streaming_llm": {"n_sink": 2}, "snapkv": {"window": 2}}  # window <= the first chunk's budget


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("chunk", [8, 16, 33])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_peak_is_at_most_the_budget_plus_one_chunk(name, chunk, ratio, make_model):
    model = make_model("llama")
    method = kvs.get_method(name, ratio=ratio, **SCORERS[name])
    x = ids_of(N)
    cache, _, _, _ = prefill(model, x, torch.ones_like(x), method, chunk_size=chunk)
    stats = kvs.cache_stats(cache)
    budget = math.floor(N * (1 - ratio))
    assert stats.tokens_kept == [budget] * 4
    assert stats.kv_bytes == 4 * budget * PER_TOKEN
    # at any time: every layer at most its budget, and one layer also holding the chunk just appended
    assert stats.peak_kv_bytes <= (4 * budget + chunk) * PER_TOKEN
    assert stats.peak_kv_bytes > 4 * budget * PER_TOKEN  # the chunk was held for real before the pruning
    one_shot, _, _, _ = prefill(model, x, torch.ones_like(x), method)
    assert kvs.cache_stats(one_shot).peak_kv_bytes == (3 * budget + N) * PER_TOKEN
    assert stats.peak_kv_bytes < kvs.cache_stats(one_shot).peak_kv_bytes


def test_peak_counts_sliding_layers_too(make_model):
    model = make_model("gemma3")  # layers 0 and 2 slide over 16 tokens and are never pruned
    x = ids_of(N)
    cache, _, _, _ = prefill(model, x, torch.ones_like(x), kvs.get_method("knorm", ratio=0.5), chunk_size=8)
    stats = kvs.cache_stats(cache)
    budget = N // 2
    full = 2 * budget * PER_TOKEN
    assert stats.kv_bytes == full
    assert stats.peak_kv_bytes <= full + stats.sliding_kv_bytes + (16 + 8) * PER_TOKEN * 2


def test_chunking_without_compression_changes_nothing(make_model):
    model = make_model("llama")
    x = ids_of(N)
    a, _, _, _ = prefill(model, x, torch.ones_like(x), None)
    b, _, _, _ = prefill(model, x, torch.ones_like(x), None, chunk_size=10)
    for la, lb in zip(a.kv_layers(), b.kv_layers(), strict=True):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-5, atol=1e-5)
        assert torch.equal(la.positions, lb.positions)
