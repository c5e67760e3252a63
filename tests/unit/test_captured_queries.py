"""Inside `compress`, scorers reuse the queries the attention function received instead of recomputing q_proj and
RoPE: the captured queries (and those rotated back to pre-RoPE) equal the recomputed ones, windows included."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

import kvsqueeze as kvs
from kvsqueeze import step
from kvsqueeze.methods.base import ScoreContext, ScorerMethod
from tests.helpers import ids_of


@dataclass
class Spy(ScorerMethod):
    """Records, per layer, the captured and the recomputed queries; scores like KNorm."""

    seen: list[tuple[bool, list[tuple[Tensor, Tensor]]]] = field(default_factory=list)

    def score(self, ctx: ScoreContext) -> Tensor:
        fresh = dataclasses.replace(ctx, captured_queries=None, _cache={})
        pairs = [
            (ctx.queries(rope=rope, last=last), fresh.queries(rope=rope, last=last))
            for rope in (True, False)
            for last in (None, 3)
        ]
        self.seen.append((ctx.captured_queries is not None, pairs))
        return -ctx.keys.float().norm(dim=-1)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3"])
def test_captured_queries_equal_recomputed(family, make_model):
    model = make_model(family)
    spy = Spy(ratio=0.5)
    ids = ids_of(20, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad(), kvs.compress(model, spy):
        model(ids, attention_mask=mask, past_key_values=kvs.KVCache(model.config))
    assert spy.seen, "the method was called"
    for captured, pairs in spy.seen:
        assert captured, "inside compress the attention function's queries are captured"
        for got, want in pairs:
            assert got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), atol=1e-5, rtol=1e-4)


def test_no_capture_outside_compress(make_model):
    model = make_model("llama")
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.attach(model):
        model(torch.randint(5, 500, (1, 12)), past_key_values=cache)
        assert all(step.take_queries(layer) is None for layer in cache.kv_layers())


def test_captured_queries_are_released(make_model):
    model = make_model("gemma3")  # sliding layers are never scored: nothing may be left on them either
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, kvs.get_method("knorm", ratio=0.5)):
        model(torch.randint(5, 500, (1, 40)), past_key_values=cache)
        assert all(step.take_queries(layer) is None for layer in cache.kv_layers())
