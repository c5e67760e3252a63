"""KVzip / KVzip+ as methods: the kept pairs are exactly the model-wide top of the replay scores, with the exact
model-wide budget; where the replay cannot run (chunked prefill, later forwards, recordings) a clear ValueError."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.recording import compress_recording, record
from kvsqueeze.replay import VARIANTS, kvzip_scores
from tests.helpers import ids_of, kept_counts, prefill, prefill_with_log
from tests.unit.methods.helpers import assert_global_top_of_replay

NAMES = {"kvzip": "kvzip", "kvzip_plus": "kvzip+"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_keeps_the_global_top_of_the_replay_scores(name, ratio, make_model):
    assert_global_top_of_replay(make_model("qwen2"), name, NAMES[name], ratio)


def test_kvzip_plus_ranks_differently(make_model):
    model = make_model("llama")
    ids = ids_of(60, seed=3)
    plain = prefill(model, ids, kvs.get_method("kvzip", ratio=0.5))
    plus = prefill(model, ids, kvs.get_method("kvzip_plus", ratio=0.5))
    pairs = zip(plain.full_layers(), plus.full_layers(), strict=True)
    assert any(not torch.equal(a.view()[2], b.view()[2]) for a, b in pairs)


def test_replay_time_counts_as_compression_time(make_model):
    model = make_model("llama")
    _, log = prefill_with_log(model, ids_of(40), kvs.get_method("kvzip", ratio=0.5))
    assert log.seconds > 0
    assert log.kv_bytes_after < log.kv_bytes_before


def test_chunked_prefill_and_later_forwards_raise(make_model):
    model = make_model("llama")
    method = kvs.get_method("kvzip", ratio=0.5)
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, method):
        model(ids_of(30), past_key_values=cache)
        with pytest.raises(ValueError, match=r"added 5 tokens to a cache that held 30 .*one forward"):
            model(ids_of(5, seed=1), past_key_values=cache)


def test_recording_cannot_replay(make_model):
    model = make_model("llama")
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, cache) as rec:
        model(ids_of(30), past_key_values=cache)
    with pytest.raises(ValueError, match="compress_recording cannot replay"):
        compress_recording(rec, kvs.get_method("kvzip", ratio=0.5))
    dense, _ = compress_recording(rec, kvs.get_method("kvzip", ratio=0.0))  # ratio 0 needs no replay
    assert kept_counts(dense) == [[[30, 30]]] * 4


def test_the_prompt_is_tokenized_with_the_models_tokenizer(make_model, tokenizer, monkeypatch):
    import kvsqueeze.replay as replay

    model = make_model("llama")
    monkeypatch.setattr(replay, "find_tokenizer", lambda m: tokenizer)
    prompt = "Say it again."
    ids = ids_of(30)
    cache = prefill(model, ids, kvs.get_method("kvzip", ratio=0.5, prompt=prompt))
    dense = prefill(model, ids)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = kvzip_scores(model, dense, ids, prompt_ids=prompt_ids)
    other = kvzip_scores(model, dense, ids, prompt_ids=[])
    assert any(not torch.equal(scores[i], other[i]) for i in scores)
    flat = torch.cat([s[0].flatten() for s in scores.values()])
    threshold = flat.sort(descending=True).values[15 * 2 * 4 - 1]
    for i, s in scores.items():
        kept = cache.layer(i).view()[2][0]
        for h in range(2):
            assert kept[h][kept[h] >= 0].tolist() == torch.nonzero(s[0, h] >= threshold).flatten().tolist()


@pytest.mark.parametrize("name", NAMES)
def test_options_are_validated(name):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        kvs.get_method(name, chunk_size=0)
    with pytest.raises(ValueError, match="prompt must be a string"):
        kvs.get_method(name, prompt=3)
    assert type(kvs.get_method(name)).variant in VARIANTS
    assert not type(kvs.get_method(name)).shared_prefill
