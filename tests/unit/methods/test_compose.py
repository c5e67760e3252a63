"""Composition applies stages in sequence with multiplying budgets, checked against running the rules by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.methods.compose import Compose
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.methods.streaming_llm import StreamingLLM
from tests.helpers import ids_of, kept_by_layer, kept_positions, prefill


def test_stage_ratios_and_budgets_multiply():
    method = Compose(ratio=0.75, methods=(KNorm(), KNorm(), SnapKV()), shares=(0.5, 0.25, 0.25))
    ratios = [m.ratio for m in method.methods]
    assert ratios == pytest.approx([0.5, 1 - 0.25**0.25, 1 - 0.25**0.25])
    assert 1 - math.prod(1 - r for r in ratios) == pytest.approx(0.75)
    budgets = method.stage_budgets(torch.tensor([100, 61]), 2)
    assert [b[:, 0].tolist() for b in budgets] == [[50, 30], [35, 21], [25, 15]]


def test_knorm_then_streaming_by_hand(make_model):
    model = make_model("llama")
    n, ratio, n_sink = 61, 0.5, 2
    dense = prefill(model, ids_of(n), None)
    cache = prefill(model, ids_of(n), Compose(ratio=ratio, methods=(KNorm(), StreamingLLM(n_sink=n_sink))))
    first, final = math.floor(n * 0.5**0.5), math.floor(n * 0.5)
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for h in range(2):
            norms = ref.keys[0, h].float().norm(dim=-1).tolist()
            stage1 = sorted(sorted(range(n), key=lambda p, norms=norms: (norms[p], p))[:first])
            sinks = [p for p in stage1 if p < n_sink]
            recent = [p for p in stage1 if p >= n_sink][-(final - len(sinks)) :]
            assert kept_positions(layer, 0, h) == sorted(sinks + recent)


def test_single_stage_and_nested_topk_equal_the_method(make_model):
    model = make_model("qwen2")
    ids = ids_of(50)

    def kept(method):
        cache = prefill(model, ids, method)
        return kept_by_layer(cache)

    assert kept(Compose(ratio=0.6, methods=(SnapKV(window=8),))) == kept(SnapKV(ratio=0.6, window=8))
    assert kept(Compose(ratio=0.6, methods=(KNorm(), KNorm()))) == kept(KNorm(ratio=0.6))


def test_second_stage_scores_only_what_the_first_kept(make_model):
    """SnapKV after StreamingLLM: the second stage's attention is normalized over the first stage's survivors only."""
    model = make_model("llama")
    n = 60
    composed = prefill(model, ids_of(n), Compose(ratio=0.75, methods=(StreamingLLM(n_sink=4), SnapKV(window=8))))
    first = math.floor(n * 0.25**0.5)  # 30: 4 sinks + 26 recent
    for layer in composed.full_layers():
        for h in range(2):
            kept = kept_positions(layer, 0, h)
            assert len(kept) == 15
            assert set(kept) <= {*range(4), *range(n - first + 4, n)}
            assert set(range(n - 8, n)) <= set(kept)  # SnapKV's window survives both stages


def test_compose_validates():
    with pytest.raises(ValueError, match="non-empty tuple"):
        Compose(methods=())
    with pytest.raises(ValueError, match="scoring methods"):
        Compose(methods=("knorm",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sum to 1"):
        Compose(methods=(KNorm(), KNorm()), shares=(0.5, 0.6))
    with pytest.raises(ValueError, match="2 positive numbers"):
        Compose(methods=(KNorm(), KNorm()), shares=(1.0,))
    with pytest.raises(ValueError, match="protected tokens"):
        prefill_model_error()


def prefill_model_error():
    from tests.tiny import tiny_model

    prefill(tiny_model("llama"), ids_of(40), Compose(ratio=0.75, methods=(KNorm(), StreamingLLM(n_sink=15))))
