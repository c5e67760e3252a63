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


@pytest.mark.parametrize("chunk", [8, 33])
def test_bytes_before_are_the_whole_uncompressed_context(chunk, make_model):
    """The reported bytes before compression are the whole context's, not the last chunk's (a chunked run's ratio
    must read as the one-shot run's)."""
    model = make_model("llama")
    x = ids_of(N)
    method = kvs.get_method("knorm", ratio=0.5)
    _, _, _, chunked = prefill(model, x, torch.ones_like(x), method, chunk_size=chunk)
    _, _, _, one_shot = prefill(model, x, torch.ones_like(x), method)
    assert chunked == one_shot == 4 * N * PER_TOKEN


def test_early_chunks_cap_the_protected_window(make_model):
    """A window larger than an early chunk's budget is capped while more context follows; the last chunk keeps it
    whole. The same window on a one-shot prefill whose budget cannot hold it is still an error."""
    model = make_model("llama")
    x = ids_of(N)
    method = kvs.get_method("snapkv", ratio=0.5, window=16)  # chunk 8 keeps 4 tokens at first: fewer than 16
    cache, _, _, _ = prefill(model, x, torch.ones_like(x), method, chunk_size=8)
    assert kvs.cache_stats(cache).tokens_kept == [N // 2] * 4
    for layer in cache.full_layers():
        kept = set(layer.view()[2][0, 0].tolist())
        assert set(range(N - 16, N)) <= kept  # the final window is protected
    short = ids_of(20)  # one shot: a budget of 10 cannot hold the 16-token window
    with pytest.raises(ValueError, match="cannot hold the 16 protected"):
        prefill(model, short, torch.ones_like(short), method)
