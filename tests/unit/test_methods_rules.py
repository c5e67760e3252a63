"""Each method keeps what its rule says, checked against slow, independent re-computations."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.pyramidkv import PyramidKV, pyramid_budgets
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.methods.streaming_llm import StreamingLLM
from tests.helpers import ids_of, kept_by_layer, kept_positions, prefill
from tests.unit.methods.helpers import SpySnapKV

# --- KNorm ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_knorm_keeps_the_lowest_norm_keys(family, make_model):
    model = make_model(family)
    lengths = [50, 33]
    ids = ids_of(50, batch=2)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, : 50 - lengths[1]] = 0
    dense = prefill(model, ids, None, mask)
    cache = prefill(model, ids, KNorm(ratio=0.5), mask)
    for layer, ref in zip(cache.full_layers(), dense.full_layers(), strict=True):
        for b, n in enumerate(lengths):
            pad = 50 - n
            for h in range(2):
                norms = [float(ref.keys[b, h, pad + p].norm()) for p in range(n)]
                k = n // 2
                expected = sorted(sorted(range(n), key=lambda p, norms=norms: (norms[p], p))[:k])
                assert kept_positions(layer, b, h) == expected


# --- StreamingLLM -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_sink", "ratio"), [(4, 0.5), (0, 0.5), (1, 0.9), (10, 0.25)])
def test_streaming_llm_keeps_sinks_and_recent(n_sink, ratio, make_model):
    model = make_model("qwen2")
    lengths = [61, 45]
    ids = ids_of(61, batch=2)
    mask = torch.ones(2, 61, dtype=torch.long)
    mask[1, :16] = 0
    cache = prefill(model, ids, StreamingLLM(ratio=ratio, n_sink=n_sink), mask)
    for layer in cache.full_layers():
        for b, n in enumerate(lengths):
            k = max(1, math.floor(n * (1 - ratio)))
            expected = list(range(n_sink)) + list(range(n - (k - n_sink), n))
            for h in range(2):
                assert kept_positions(layer, b, h) == expected


def test_streaming_llm_recompresses_as_tokens_arrive(make_model):
    model = make_model("llama")
    cache = kvs.KVCache(model.config)
    method = StreamingLLM(ratio=0.5, n_sink=2)
    with torch.no_grad(), kvs.compress(model, method):
        model(ids_of(20), past_key_values=cache)
        model(ids_of(10, seed=1), past_key_values=cache)
    assert kept_positions(cache.layer(0), 0, 0) == [0, 1, *range(17, 30)]


@pytest.mark.parametrize(
    ("method", "budget", "protected"),
    [(StreamingLLM(ratio=0.5, n_sink=40), 30, 40), (SnapKV(ratio=0.5, window=64), 30, 61), (SnapKV(ratio=0.9), 6, 61)],
)
def test_budget_too_small_for_protected_tokens(method, budget, protected, make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match=rf"budget of {budget} tokens cannot hold the {protected} protected"):
        prefill(model, ids_of(61), method)


# --- PyramidKV --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "ratio", "n_layers", "slope", "floor"),
    [
        (1000, 0.5, 8, 0.95, 8),
        (1000, 0.5, 8, 0.95, 400),
        (100, 0.1, 4, 0.95, 0),
        (61, 0.5, 4, 0.3, 8),
        (500, 0.75, 30, 1.0, 64),
    ],
)
def test_pyramid_budgets_decrease_and_average_the_target(n, ratio, n_layers, slope, floor):
    budgets = pyramid_budgets(n, ratio, n_layers, slope, floor)
    mean = n * (1 - ratio)
    assert len(budgets) == n_layers
    assert all(a > b for a, b in itertools.pairwise(budgets)), budgets
    assert sum(budgets) / n_layers == pytest.approx(mean, rel=1e-9)
    assert max(budgets) <= n + 1e-9
    assert min(budgets) >= floor - 1e-9
    assert budgets[0] - mean == pytest.approx(mean - budgets[-1])  # linear, symmetric around the mean


def test_pyramid_budgets_slope_limits():
    assert pyramid_budgets(1000, 0.5, 8, 0.95, 0)[0] == pytest.approx(975.0)  # the full slope
    assert pyramid_budgets(1000, 0.5, 8, 0.95, 0)[-1] == pytest.approx(25.0)
    assert pyramid_budgets(100, 0.1, 4, 0.95, 0)[0] == pytest.approx(100.0)  # capped by n
    assert pyramid_budgets(1000, 0.5, 8, 0.95, 400)[-1] == pytest.approx(400.0)  # raised to the protected floor
    assert pyramid_budgets(100, 0.5, 4, 0.0, 0) == [50.0] * 4
    assert pyramid_budgets(100, 0.5, 1, 0.95, 0) == [50.0]


def test_pyramidkv_layers_keep_their_budget(make_model):
    model = make_model("llama")
    method = PyramidKV(ratio=0.5, scorer=SnapKV(window=8))
    assert method.scorer.ratio == 0.5  # the scorer follows the method's ratio
    cache = prefill(model, ids_of(200), method)
    budgets = [math.floor(b + 1e-6) for b in pyramid_budgets(200, 0.5, 4, 0.95, 8)]  # the last is 8 - 1e-15
    assert [int(layer.kept.max()) for layer in cache.full_layers()] == budgets
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == 4
    assert sum(budgets) / 4 == pytest.approx(100, abs=1)
    # the scorer's protected window is kept in every layer, the shallowest keeps what SnapKV would keep with its budget
    snap = prefill(model, ids_of(200), SnapKV(ratio=1 - budgets[0] / 200, window=8))
    for h in range(2):
        assert set(range(192, 200)) <= set(kept_positions(cache.layer(3), 0, h))
        assert kept_positions(cache.layer(0), 0, h) == kept_positions(snap.layer(0), 0, h)


def test_pyramidkv_validates_its_options():
    with pytest.raises(ValueError, match="slope"):
        PyramidKV(ratio=0.5, slope=1.5)
    with pytest.raises(ValueError, match="scorer"):
        PyramidKV(ratio=0.5, scorer=42)  # type: ignore[arg-type]


# --- SnapKV -----------------------------------------------------------------------------------------------------------


def _pool_and_group(attn: torch.Tensor, kernel: int, group: int) -> torch.Tensor:
    """attn (H_q, T) -> avg-pooled over a window of `kernel` slots (clipped at the edges), mean over each GQA group."""
    hq, t = attn.shape
    half = kernel // 2
    pooled = torch.stack([attn[:, max(0, i - half) : i + half + 1].mean(dim=1) for i in range(t)], dim=1)
    return pooled.view(hq // group, group, t).mean(dim=1)


def test_snapkv_score_is_the_pooled_attention_of_the_last_window_by_hand(make_model):
    model = make_model("llama")
    n, window = 40, 8
    ids = ids_of(n)
    method = SpySnapKV(ratio=0.5, window=window)
    prefill(model, ids, method)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        position_ids = torch.arange(n)[None]
        for idx, block in enumerate(model.model.layers):
            attn_mod = block.self_attn
            x = block.input_layernorm(hidden[idx])
            q = attn_mod.q_proj(x).view(1, n, 4, 16).transpose(1, 2)
            k = attn_mod.k_proj(x).view(1, n, 2, 16).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, position_ids)
            cos, sin = cos[:, None], sin[:, None]

            def rope(t, cos=cos, sin=sin):
                return t * cos + torch.cat([-t[..., 8:], t[..., :8]], dim=-1) * sin

            q, k = rope(q), rope(k).repeat_interleave(2, dim=1)
            logits = q[0, :, -window:] @ k[0].transpose(-1, -2) / 4.0  # (H_q, w, T), head_dim ** -0.5 = 1/4
            query_pos = torch.arange(n - window, n)[:, None]
            logits = logits.masked_fill(torch.arange(n)[None, :] > query_pos, float("-inf"))
            attn = logits.softmax(dim=-1).mean(dim=1)  # (H_q, T)
            expected = _pool_and_group(attn, 5, 2)
            torch.testing.assert_close(method.seen_scores[idx][0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "qwen3",
        "phi3",
        "gemma3",
        "mistral",
        "gemma2",  # with its attention-logit soft-capping
    ],
)
def test_snapkv_score_matches_the_models_own_attention(family, make_model):
    """Against the attention probabilities the model itself reports (eager, output_attentions): this covers q-norms
    (qwen3, gemma3), the fused qkv and partial rotary (phi3) and Gemma's query scaling."""
    model = make_model(family, attn_implementation="eager")
    n, window, kernel = 45, 6, 3
    ids = ids_of(n, seed=4)
    method = SpySnapKV(ratio=0.5, window=window, kernel=kernel)
    prefill(model, ids, method)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert method.seen_scores, "SnapKV scored nothing"
    for idx, scores in method.seen_scores.items():
        attn = attentions[idx][0, :, -window:].mean(dim=1)  # (H_q, T)
        torch.testing.assert_close(scores[0], _pool_and_group(attn, kernel, 2), atol=1e-5, rtol=1e-4)


def test_snapkv_keeps_its_window_and_the_best_scores(make_model):
    model = make_model("llama")
    method = SpySnapKV(ratio=0.5, window=8)
    cache = prefill(model, ids_of(40), method)
    for idx, layer in enumerate(cache.full_layers()):
        scores = method.seen_scores[idx][0]
        for h in range(2):
            kept = kept_positions(layer, 0, h)
            assert set(range(32, 40)) <= set(kept)
            rest = sorted(range(32), key=lambda p, s=scores[h]: (-float(s[p]), p))[:12]
            assert kept == sorted(rest + list(range(32, 40)))


def test_snapkv_score_does_not_depend_on_left_padding(make_model):
    model = make_model("llama")
    row = ids_of(31, seed=6)[0]
    ids = torch.cat([torch.zeros(19, dtype=torch.long), row])[None].repeat(2, 1)
    ids[0] = ids_of(50, seed=7)[0]
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :19] = 0
    batched, alone = SpySnapKV(ratio=0.5, window=8), SpySnapKV(ratio=0.5, window=8)
    prefill(model, ids, batched, mask)
    prefill(model, row[None], alone)
    for idx, scores in alone.seen_scores.items():
        torch.testing.assert_close(batched.seen_scores[idx][1, :, 19:], scores[0], atol=1e-5, rtol=1e-4)


def test_snapkv_validates_its_options():
    with pytest.raises(ValueError, match="window"):
        SnapKV(window=0)
    with pytest.raises(ValueError, match="kernel"):
        SnapKV(kernel=4)


# --- Random -----------------------------------------------------------------------------------------------------------


def test_random_is_deterministic_given_seed(make_model):
    model = make_model("llama")
    ids = ids_of(50)

    def kept(seed):
        cache = prefill(model, ids, kvs.get_method("random", ratio=0.5, seed=seed))
        return kept_by_layer(cache)

    first, again, other = kept(3), kept(3), kept(4)
    assert first == again
    assert first != other
    assert first[0] != first[1], "seeded per layer: layers differ"
    assert all(len(heads[0]) == 25 for heads in first)


def test_methods_are_independent_objects():
    a, b = kvs.get_method("pyramidkv", ratio=0.5), kvs.get_method("pyramidkv", ratio=0.5)
    assert a == b and a is not b and a.scorer is not b.scorer
    c = dataclasses.replace(a, ratio=0.25)
    assert c.scorer.ratio == 0.25 and a.scorer.ratio == 0.5
