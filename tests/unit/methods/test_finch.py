"""FINCH: the question's attention picks context tokens chunk by chunk; checked against a loop over plain lists."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.finch import Finch
from kvsqueeze.models import apply_rope
from kvsqueeze.press import score_context
from kvsqueeze.recording import record
from tests.helpers import ids_of, prefill
from tests.unit.methods.helpers import budget


def _recording(model, n: int):
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, cache) as rec:
        model(ids_of(n), past_key_values=cache)
    return rec


def _reference(keys: torch.Tensor, queries: torch.Tensor, scale: float, n_q: int, chunk: int, k: int) -> list[int]:
    """Kept positions of one KV head: keys (T, D) at positions 0..T-1, the question's queries (G, n_q, D)."""
    t = keys.shape[0]
    ctx_len, question = t - n_q, list(range(t - n_q, t))
    kept: list[int] = []
    ends = list(range(ctx_len, 0, -chunk))[::-1]
    for end in ends:
        cand = kept + list(range(max(0, end - chunk), end))
        if len(cand) > k - n_q:
            score = {p: 0.0 for p in cand}
            for g in range(queries.shape[0]):
                for i in range(n_q):
                    qpos = t - n_q + i
                    visible = [p for p in cand + question if p <= qpos]
                    logits = torch.stack([queries[g, i].double() @ keys[p].double() * scale for p in visible])
                    probs = torch.softmax(logits, dim=0)
                    for p, w in zip(visible, probs.tolist(), strict=True):
                        if p in score:
                            score[p] += w / (n_q * queries.shape[0])
            cand = sorted(cand, key=lambda p: (-score[p], p))[: k - n_q]
        kept = sorted(cand)
    return sorted(kept + question)


@pytest.mark.parametrize(("family", "n", "ratio", "n_q", "chunk"), [("llama", 40, 0.5, 6, 8), ("qwen3", 37, 0.7, 5, 6)])
def test_finch_matches_the_reference(family, n, ratio, n_q, chunk, make_model):
    model = make_model(family)
    rec = _recording(model, n)
    method = Finch(ratio=ratio, question_tokens=n_q, chunk_size=chunk)
    for idx, inputs in rec.inputs.items():
        ctx = score_context(rec.adapter, rec.cache, idx, inputs)
        indices, counts = method.plan(ctx)
        q = apply_rope(rec.adapter.pre_rope_queries(ctx.module, inputs.hidden_states), *inputs.position_embeddings)
        g = q.shape[1] // 2
        for h in range(2):
            got = sorted(ctx.positions[0, h, indices[0, h, : counts[0, h]]].tolist())
            ref = _reference(
                ctx.keys[0, h], q[0, h * g : (h + 1) * g, -n_q:], ctx.scaling, n_q, chunk, budget(n, ratio)
            )
            assert got == ref, (idx, h)


def test_without_a_question_the_last_window_stands_in(make_model):
    model = make_model("llama")
    rec = _recording(model, 30)
    for idx, inputs in rec.inputs.items():
        ctx = score_context(rec.adapter, rec.cache, idx, inputs)
        plans = [m.plan(ctx) for m in (Finch(0.5, window=4, chunk_size=8), Finch(0.5, question_tokens=4, chunk_size=8))]
        assert torch.equal(plans[0][0], plans[1][0])


def test_kept_keys_are_rerotated_to_contiguous_positions(make_model):
    model = make_model("llama")
    cache = prefill(model, ids_of(40), Finch(0.5, question_tokens=5, chunk_size=8))
    for layer in cache.full_layers():
        assert layer.positions[0].tolist() == [list(range(20))] * 2
    assert cache.next_positions().tolist() == [20]


def test_question_longer_than_the_forward_raises(make_model):
    model = make_model("llama")
    with (
        pytest.raises(ValueError, match="question_tokens=50"),
        torch.no_grad(),
        kvs.compress(model, Finch(0.5, question_tokens=50)),
    ):
        model(ids_of(30), past_key_values=kvs.KVCache(model.config))


def test_the_budget_must_hold_the_question(make_model):
    model = make_model("llama")
    with (
        pytest.raises(ValueError, match="protected"),
        torch.no_grad(),
        kvs.compress(model, Finch(0.9, question_tokens=10)),
    ):
        model(ids_of(30), past_key_values=kvs.KVCache(model.config))


@pytest.mark.parametrize(
    "options", [{"question_tokens": 0}, {"chunk_size": 0}, {"window": -1}, {"question_tokens": 1.5}]
)
def test_bad_options_raise(options):
    with pytest.raises(ValueError, match=str(next(iter(options.values())))):
        Finch(**options)
