"""Non-causal chunked attention and Compactor's blend, checked against loops over chunks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.compactor import Compactor
from kvsqueeze.methods.leverage import leverage_scores
from kvsqueeze.methods.noncausal_attention import NonCausalAttention
from tests.helpers import ids_of, kept_by_layer, kept_positions, prefill
from tests.unit.methods.helpers import budget, top_positions


@dataclass
class _Spy(NonCausalAttention):
    """Records what it saw: (queries, keys, positions, query positions, scores) per call."""

    calls: list = field(default_factory=list, compare=False, repr=False)

    def score(self, ctx):
        scores = super().score(ctx)
        q = ctx.queries(rope=True)
        self.calls.append(
            (
                ctx.layer_idx,
                q.clone(),
                ctx.keys.clone(),
                ctx.positions.clone(),
                ctx.query_positions.clone(),
                scores.clone(),
            )
        )
        return scores


def _reference(q, keys, positions, qpos, chunk: int, scaling: float) -> torch.Tensor:
    """One row: q (H_q, q, D), keys (H, T, D), positions (H, T), qpos (q,) -> (H, T), by loops over chunks."""
    hq, h = q.shape[0], keys.shape[0]
    g = hq // h
    out = torch.zeros(positions.shape)
    scored = torch.zeros(positions.shape, dtype=torch.bool)
    for head in range(h):
        for c in sorted({int(p) // chunk for p in qpos.tolist() if p >= 0}):
            slots = [
                t for t in range(keys.shape[1]) if positions[head, t] >= 0 and int(positions[head, t]) // chunk == c
            ]
            queries = [i for i in range(q.shape[1]) if qpos[i] >= 0 and int(qpos[i]) // chunk == c]
            acc = torch.zeros(len(slots))
            for qh in range(head * g, (head + 1) * g):
                for i in queries:
                    logits = torch.stack([q[qh, i] @ keys[head, t] for t in slots]) * scaling
                    acc += logits.softmax(dim=0)
            for j, t in enumerate(slots):
                out[head, t] = acc[j] / (g * len(queries))
                scored[head, t] = True
        mean = out[head][scored[head]].mean() if scored[head].any() else 0.0
        out[head][~scored[head]] = mean
    return out


@pytest.mark.parametrize(("family", "chunk"), [("llama", 8), ("qwen3", 16), ("phi3", 5), ("llama", 1000)])
def test_noncausal_chunk_attention_by_hand(family, chunk, make_model):
    model = make_model(family)
    spy = _Spy(ratio=0.5, chunk_size=chunk)
    prefill(model, ids_of(37), spy)
    assert len(spy.calls) == len(model.model.layers)
    for _, q, keys, positions, qpos, scores in spy.calls:
        expected = _reference(q[0].float(), keys[0].float(), positions[0], qpos[0], chunk, 16**-0.5)
        torch.testing.assert_close(scores[0], expected, atol=1e-5, rtol=1e-4)


def test_noncausal_attention_with_padding_and_a_second_forward(make_model):
    model = make_model("llama")
    spy = _Spy(ratio=0.5, chunk_size=8)
    ids = ids_of(30, batch=2)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :9] = 0
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, spy):
        model(ids, attention_mask=mask, past_key_values=cache)
        model(ids_of(5, seed=1).repeat(2, 1), attention_mask=torch.ones(2, 35, dtype=torch.long), past_key_values=cache)
    for _, q, keys, positions, qpos, scores in spy.calls:
        for b in range(2):
            expected = _reference(q[b].float(), keys[b].float(), positions[b], qpos[b], 8, 16**-0.5)
            valid = positions[b] >= 0
            torch.testing.assert_close(scores[b][valid], expected[valid], atol=1e-5, rtol=1e-4)
    # in the second forward (positions 30-34 and 21-25) only the chunks holding them are scored, the rest imputed
    _, _, _, positions, qpos, scores = spy.calls[-1]
    assert qpos[0].tolist() == list(range(30, 35)) and qpos[1].tolist() == list(range(21, 26))


def test_compactor_blends_standardized_scores(make_model):
    model = make_model("llama")
    n, ratio, chunk, blend = 45, 0.5, 8, 0.3
    spy = _Spy(ratio=ratio, chunk_size=chunk)
    prefill(model, ids_of(n), spy)
    cache = prefill(model, ids_of(n), Compactor(ratio=ratio, blend=blend, chunk_size=chunk, sketch_rows=0, n_sink=2))
    for layer_idx, _, keys, positions, _, attn in spy.calls:
        lev = leverage_scores(keys, positions)[0].float()

        def z(x):
            return (x - x.mean(dim=-1, keepdim=True)) / x.std(dim=-1, unbiased=False, keepdim=True)

        expected = (1 - blend) * z(lev) + blend * z(attn[0])
        for h in range(2):
            kept = kept_positions(cache.layer(layer_idx), 0, h)
            assert kept == top_positions(expected[h].tolist(), budget(n, ratio), {0, 1})


def test_blend_extremes_are_the_parts(make_model):
    model = make_model("qwen2")
    ids = ids_of(40)

    def kept(method):
        cache = prefill(model, ids, method)
        return kept_by_layer(cache)

    assert kept(Compactor(ratio=0.5, blend=1.0, chunk_size=8, n_sink=0)) == kept(
        NonCausalAttention(ratio=0.5, chunk_size=8)
    )
    lev = kvs.get_method("leverage", ratio=0.5, sketch_rows=64, seed=3)
    assert kept(Compactor(ratio=0.5, blend=0.0, sketch_rows=64, seed=3, n_sink=0)) == kept(lev)


def test_compactor_validates_options():
    for bad in ({"blend": 1.5}, {"chunk_size": 0}, {"sketch_rows": -2}, {"n_sink": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Compactor(**bad)
    with pytest.raises(ValueError, match="chunk_size"):
        NonCausalAttention(chunk_size=0)
