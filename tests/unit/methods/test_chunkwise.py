"""Chunk-wise selection: every chunk keeps its largest-remainder share by the wrapped scores, checked by loops."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.methods.chunkwise import ChunkWise, chunk_quotas
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.streaming_llm import StreamingLLM
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import SpySnapKV, budget


def _reference(scores: list[float], chunk: int, k: int, protected: set[int]) -> list[int]:
    n = len(scores)
    chunks = [[p for p in range(lo, min(n, lo + chunk)) if p not in protected] for lo in range(0, n, chunk)]
    rest, m = k - len(protected), sum(len(c) for c in chunks)
    quotas = [len(c) * rest // m for c in chunks]
    remainders = [len(c) * rest % m for c in chunks]
    for c in sorted(range(len(chunks)), key=lambda c: (-remainders[c], c))[: rest - sum(quotas)]:
        quotas[c] += 1
    keep = set(protected)
    for c, members in enumerate(chunks):
        keep |= set(sorted(members, key=lambda p: (-scores[p], p))[: quotas[c]])
    return sorted(keep)


def test_chunk_quotas_by_hand():
    members = torch.tensor([[[10, 10, 5, 0], [3, 3, 3, 3]]])
    quotas = chunk_quotas(members, torch.tensor([[12, 6]]))
    assert quotas.tolist() == [[[5, 5, 2, 0], [2, 2, 1, 1]]]  # 12*5/25 = 2.4 floors; 6*3/12 = 1.5 each: ties earlier
    assert quotas.sum(-1).tolist() == [[12, 6]]


@pytest.mark.parametrize(("n", "ratio", "chunk"), [(61, 0.5, 20), (61, 0.75, 8), (40, 0.3, 7), (33, 0.5, 100)])
def test_chunkwise_over_knorm(n, ratio, chunk, make_model):
    model = make_model("llama")
    dense = prefill(model, ids_of(n), None)
    cache = prefill(model, ids_of(n), ChunkWise(ratio=ratio, scorer=KNorm(), chunk_size=chunk))
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for h in range(2):
            scores = (-ref.keys[0, h].float().norm(dim=-1)).tolist()
            assert kept_positions(layer, 0, h) == _reference(scores, chunk, budget(n, ratio), set())


def test_chunkwise_over_snapkv_keeps_the_window(make_model):
    model = make_model("qwen3")
    n, ratio, window, chunk = 61, 0.5, 8, 16
    method = ChunkWise(ratio=ratio, scorer=SpySnapKV(window=window), chunk_size=chunk)
    cache = prefill(model, ids_of(n, seed=2), method)
    for idx, layer in enumerate(cache.full_layers()):
        for h in range(2):
            scores = method.scorer.seen_scores[idx][0, h].tolist()  # type: ignore[attr-defined]
            expected = _reference(scores, chunk, budget(n, ratio), set(range(n - window, n)))
            assert kept_positions(layer, 0, h) == expected


def test_chunkwise_spreads_what_snapkv_concentrates(make_model):
    """A scorer that prefers recent tokens keeps only the end alone; chunk-wise, every chunk keeps its share."""
    model = make_model("llama")
    streaming = ChunkWise(ratio=0.5, scorer=StreamingLLM(n_sink=0), chunk_size=10)
    cache = prefill(model, ids_of(60), streaming)
    kept = kept_positions(cache.layer(0), 0, 0)
    assert [sum(1 for p in kept if lo <= p < lo + 10) for lo in range(0, 60, 10)] == [5] * 6


def test_chunkwise_validates():
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkWise(chunk_size=0)
    with pytest.raises(ValueError, match="scorer"):
        ChunkWise(scorer=42)  # type: ignore[arg-type]
