"""ChunkKV keeps whole chunks ranked by mean score, checked against a greedy loop over chunks."""

from __future__ import annotations

import pytest

from kvsqueeze.methods.chunkkv import ChunkKV
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.pyramidkv import PyramidKV
from kvsqueeze.methods.snapkv import SnapKV
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import SpySnapKV, budget


def _reference(scores: list[float], chunk: int, k: int, protected: set[int]) -> list[int]:
    """Protected first, then whole chunks by mean score (ties: earlier), the last one by its best tokens."""
    n = len(scores)
    chunks = [list(range(lo, min(n, lo + chunk))) for lo in range(0, n, chunk)]
    by_mean = sorted(range(len(chunks)), key=lambda c: (-sum(scores[p] for p in chunks[c]) / len(chunks[c]), c))
    keep = set(protected)
    for c in by_mean:
        for p in sorted(chunks[c], key=lambda p: (-scores[p], p)):
            if len(keep) < k:
                keep.add(p)
    return sorted(keep)


@pytest.mark.parametrize(("n", "ratio", "chunk"), [(61, 0.5, 20), (61, 0.75, 8), (40, 0.3, 7), (30, 0.5, 1)])
def test_chunkkv_over_knorm(n, ratio, chunk, make_model):
    model = make_model("llama")
    dense = prefill(model, ids_of(n), None)
    cache = prefill(model, ids_of(n), ChunkKV(ratio=ratio, scorer=KNorm(), chunk_size=chunk))
    k = budget(n, ratio)
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for h in range(2):
            scores = (-ref.keys[0, h].float().norm(dim=-1)).tolist()
            kept = kept_positions(layer, 0, h)
            assert kept == _reference(scores, chunk, k, set())
            starts = {p // chunk for p in kept}
            whole = [c for c in starts if all((c * chunk + i) in kept for i in range(min(chunk, n - c * chunk)))]
            assert len(starts) - len(whole) <= 1, "at most one partial chunk"


def test_chunkkv_over_snapkv_keeps_the_window(make_model):
    model = make_model("qwen2")
    n, ratio, window, chunk = 61, 0.5, 8, 10
    spy = SpySnapKV(window=window)
    method = ChunkKV(ratio=ratio, scorer=spy, chunk_size=chunk)
    cache = prefill(model, ids_of(n, seed=3), method)
    for idx, layer in enumerate(cache.full_layers()):
        for h in range(2):
            scores = method.scorer.seen_scores[idx][0, h].tolist()  # type: ignore[attr-defined]
            expected = _reference(scores, chunk, budget(n, ratio), set(range(n - window, n)))
            assert kept_positions(layer, 0, h) == expected


def test_chunkkv_uses_the_wrapped_budget(make_model):
    model = make_model("llama")
    n = 200
    inner = PyramidKV(scorer=SnapKV(window=8))
    cache = prefill(model, ids_of(n), ChunkKV(ratio=0.5, scorer=inner))
    pyramid = prefill(model, ids_of(n), PyramidKV(ratio=0.5, scorer=SnapKV(window=8)))
    assert [int(x.kept.max()) for x in cache.full_layers()] == [int(x.kept.max()) for x in pyramid.full_layers()]


def test_chunkkv_validates_options():
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkKV(chunk_size=0)
    with pytest.raises(ValueError, match="scorer"):
        ChunkKV(scorer=42)  # type: ignore[arg-type]
    assert isinstance(ChunkKV(scorer="knorm").scorer, KNorm)  # a registered name works too (as on the CLI)
    assert ChunkKV(ratio=0.25).scorer.ratio == 0.25
