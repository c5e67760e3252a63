"""Key re-rotation: re-rotated keys equal keys computed at the new positions; a one-layer model reproduces
StreamingLLM as published (the kept tokens re-encoded at positions 0..K-1) exactly."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.keyrerotation import KeyRerotation
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.streaming_llm import StreamingLLM
from kvsqueeze.recording import compress_recording, record
from tests.helpers import ids_of, kept_positions, prefill


def _cache_at(model, ids, positions) -> kvs.KVCache:
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.attach(model):
        model(ids, position_ids=positions, past_key_values=cache)
    return cache


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}}),
        ("qwen3", {}),
        ("phi3", {}),  # partial rotary
        ("gemma3", {}),  # a different rotary for sliding layers
    ],
)
def test_rerotated_keys_equal_keys_computed_at_the_new_positions(family, overrides, make_model):
    model = make_model(family, **overrides)
    adapter = kvs.get_adapter(model)
    n = 12  # below Gemma's sliding window: layer 0 keeps everything
    ids = ids_of(n)
    old = torch.arange(n)[None]
    new = torch.tensor([[0, 1, 5, 9, 40, 41, 42, 300, 301, 302, 500, 777]])
    at_old, at_new = _cache_at(model, ids, old), _cache_at(model, ids, new)
    layer_old, layer_new = at_old.layer(0), at_new.layer(0)  # layer 0 keys depend on the token and position only
    moved = adapter.rerotate(0, layer_old.keys, layer_old.positions, layer_new.positions)
    torch.testing.assert_close(moved, layer_new.keys, atol=2e-5, rtol=1e-4)
    # a constant shift leaves hidden states unchanged, so every layer can be checked
    shifted = _cache_at(model, ids, old + 37)
    for idx, (a, b) in enumerate(zip(at_old.kv_layers(), shifted.kv_layers(), strict=True)):
        torch.testing.assert_close(
            adapter.rerotate(idx, a.keys, a.positions, b.positions), b.keys, atol=1e-4, rtol=1e-3
        )


def test_unchanged_positions_are_bit_exact(make_model):
    model = make_model("llama")
    cache = _cache_at(model, ids_of(9), torch.arange(9)[None])
    layer = cache.layer(0)
    same = kvs.get_adapter(model).rerotate(0, layer.keys, layer.positions, layer.positions)
    assert torch.equal(same, layer.keys)


def test_one_layer_model_matches_streaming_llm_as_published(make_model):
    """One layer: cached K/V of a token depend only on the token and its position, so the compressed, re-rotated cache
    must be what the model computes for the kept tokens alone at positions 0..K-1, and the question sees the same."""
    model = make_model("llama", num_hidden_layers=1)
    n, ratio, n_sink = 40, 0.5, 4
    ids, question = ids_of(n), ids_of(6, seed=9)
    cache = prefill(model, ids, KeyRerotation(ratio=ratio, scorer=StreamingLLM(n_sink=n_sink)))
    kept = [*range(n_sink), *range(n - 20 + n_sink, n)]
    assert cache.layer(0).positions[0].tolist() == [list(range(20))] * 2
    assert cache.next_positions().tolist() == [20]
    fresh = _cache_at(model, ids[:, kept], torch.arange(20)[None])
    torch.testing.assert_close(cache.layer(0).keys, fresh.layer(0).keys, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cache.layer(0).values, fresh.layer(0).values)
    with torch.no_grad(), kvs.attach(model):
        got = model(question, past_key_values=cache).logits
        want = model(question, past_key_values=fresh).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert cache.layer(0).positions[0, 0, -6:].tolist() == list(range(20, 26))


def test_recompression_scores_in_the_rerotated_frame(make_model):
    """Two forwards: the sinks and the recent window are found in the re-rotated frame; the tokens kept are the ones
    StreamingLLM keeps without re-rotation (identified by their layer-0 values, which carry no position)."""
    model = make_model("llama")
    method = KeyRerotation(ratio=0.5, scorer=StreamingLLM(n_sink=2))
    first, second = ids_of(20), ids_of(10, seed=1)
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, method):
        model(first, past_key_values=cache)
        assert cache.next_positions().tolist() == [10]
        model(second, past_key_values=cache)
    assert cache.next_positions().tolist() == [15] and cache.real_tokens_seen().tolist() == [30]
    dense = _cache_at(model, torch.cat([first, second], 1), torch.arange(30)[None])
    kept = [0, 1, *range(17, 30)]
    for h in range(2):
        assert kept_positions(cache.layer(0), 0, h) == list(range(15))
        torch.testing.assert_close(cache.layer(0).values[0, h], dense.layer(0).values[0, h, kept])


def test_wrapping_another_method_and_recordings(make_model):
    model = make_model("qwen2")
    ids = ids_of(50)
    method = KeyRerotation(ratio=0.6, scorer=KNorm())
    plain = prefill(model, ids, KNorm(ratio=0.6))
    rotated = prefill(model, ids, method)
    for a, b in zip(plain.full_layers(), rotated.full_layers(), strict=True):
        assert torch.equal(a.values, b.values)  # the same tokens are kept
        assert b.positions[0].tolist() == [list(range(20))] * 2
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, cache) as rec:
        model(ids, past_key_values=cache)
    copy, _ = compress_recording(rec, method)
    for a, b in zip(copy.full_layers(), rotated.full_layers(), strict=True):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys)
    assert copy.next_positions().tolist() == [20]


def test_keyrerotation_validates():
    with pytest.raises(ValueError, match="scorer"):
        KeyRerotation(scorer=42)  # type: ignore[arg-type]
    assert KeyRerotation(ratio=0.3).scorer.ratio == 0.3
