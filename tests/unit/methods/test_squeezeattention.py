"""SqueezeAttention: cosine similarity around each attention block (checked against hidden states captured at the
model's own norms), the squeezed cluster's budget and the exact model total, k-means on obvious values."""

from __future__ import annotations

import math

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.squeezeattention import SqueezeAttention, kmeans_1d, unimportant_layers
from kvsqueeze.recording import compress_recording, record
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import budget, top_positions


def _similarities(model, ids: torch.Tensor, full: list[int]) -> list[float]:
    """Per full layer: mean over tokens of cos(decoder layer input, the stream after attention), the latter read at the
    input of the norm that follows the residual add (pre_feedforward_layernorm in Gemma2/3, else
    post_attention_layernorm)."""
    layers = kvs.get_adapter(model).decoder_layers
    after: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        handles.append(norm.register_forward_pre_hook(lambda m, args, i=i: after.__setitem__(i, args[0].detach())))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    out = []
    for i in full:
        x, y = hidden[i][0], after[i][0]
        cos = [float(x[t] @ y[t]) / math.sqrt(float(x[t] @ x[t]) * float(y[t] @ y[t])) for t in range(x.shape[0])]
        out.append(sum(cos) / len(cos))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_similarity_budgets_and_kept_tokens(family, make_model):
    model = make_model(family)
    n, ratio, squeeze = 50, 0.5, 0.4
    ids = ids_of(n, seed=6)
    method = SqueezeAttention(ratio=ratio, scorer="knorm", squeeze=squeeze)
    seen = {}
    original = method.layer_scores
    method.layer_scores = lambda ctx: seen.setdefault(ctx.layer_idx, original(ctx))  # type: ignore[method-assign]
    cache = prefill(model, ids, method)
    dense = prefill(model, ids, None)
    full = kvs.get_adapter(model).full_layers
    expected = _similarities(model, ids, full)
    got = [float(seen[i].similarity[0]) for i in full]
    assert got == pytest.approx(expected, abs=1e-5)
    flags = unimportant_layers(got)
    keep = budget(n, ratio)
    low = math.floor(keep * squeeze)
    n_low = sum(flags)
    kept = [int(cache.layer(i).kept[0, 0]) for i in full]
    assert sum(kept) == keep * len(full)  # the model total is exact
    for i, flag, k in zip(full, flags, kept, strict=True):
        if n_low and len(full) > 1:
            assert k == low if flag else k >= keep
        keys = dense.layer(i).keys[0]
        for h in range(2):
            scores = [-float(keys[h, t].norm()) for t in range(n)]
            assert kept_positions(cache.layer(i), 0, h) == top_positions(scores, k)


def test_kmeans_on_obvious_values():
    assert kmeans_1d([0.1, 0.12, 0.5, 0.52, 0.9, 0.93]) == [0, 0, 1, 1, 2, 2]
    assert kmeans_1d([0.9, 0.1, 0.5]) == [2, 0, 1]
    assert unimportant_layers([0.2, 0.95, 0.5, 0.96, 0.21]) == [False, True, False, True, False]
    assert unimportant_layers([0.7, 0.7, 0.7]) == [False, False, False]  # no signal: nothing squeezed
    assert unimportant_layers([0.3]) == [False]


def test_low_ratio_gives_the_overflow_back(make_model):
    """At a low ratio the important layers cannot hold all the freed budget: the squeezed layers get it back."""
    model = make_model("llama")
    n = 40
    cache = prefill(model, ids_of(n, seed=1), SqueezeAttention(ratio=0.1, scorer="knorm", squeeze=0.0))
    kept = [int(layer.kept[0, 0]) for layer in cache.full_layers()]
    assert sum(kept) == 4 * budget(n, 0.1)
    assert max(kept) == n


def test_recorded_prefill_is_refused(make_model):
    model = make_model("llama")
    cache = kvs.KVCache(model.config)
    with record(model, cache) as rec, torch.no_grad():
        model(ids_of(20), past_key_values=cache)
    with pytest.raises(ValueError, match="residual stream"):
        compress_recording(rec, SqueezeAttention(ratio=0.5, scorer="knorm"))


def test_validates_its_options():
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="squeeze"):
            SqueezeAttention(squeeze=bad)
    with pytest.raises(ValueError, match="scorer"):
        SqueezeAttention(scorer="adakv")
