"""save_cache/load_cache: a compressed cache survives a round trip to disk bit for bit, answers from it are identical,
and loading it with another model fails with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import kvsqueeze as kvs
from kvsqueeze.cachefile import model_fingerprint
from kvsqueeze.pipeline import answer, split_prompt

CONTEXT = (
    "The harbour master walked to the market in the morning because it was raining. The old baker sold a box of "
    "apples after the storm. The lighthouse keeper counted the boats at night and nobody knows why."
)
QUESTIONS = ["Who sold apples?", "When did the keeper count the boats?"]


@pytest.mark.parametrize(
    ("family", "name"), [("llama", "knorm"), ("gemma3", "snapkv"), ("qwen3", "pyramidkv"), ("llama", "adakv")]
)
def test_round_trip_gives_identical_answers(family, name, make_model, tokenizer, tmp_path):
    model = make_model(family)
    small = kvs.get_method("snapkv", window=8)
    options = {"snapkv": {"window": 8}, "pyramidkv": {"scorer": small}, "adakv": {"scorer": kvs.get_method("knorm")}}
    method = kvs.get_method(name, ratio=0.5, **options.get(name, {}))
    out = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS, method=method, max_new_tokens=8)
    if name == "adakv":
        assert any(layer.is_ragged for layer in out.cache.kv_layers()), "Ada-KV should store uneven heads ragged"
    path = kvs.save_cache(tmp_path / "ctx.safetensors", out.cache, model, method)
    saved = kvs.load_cache(path, model)
    for a, b in zip(out.cache.kv_layers(), saved.cache.kv_layers(), strict=True):
        for name_ in ("keys", "values", "positions", "seen"):
            assert torch.equal(getattr(a, name_), getattr(b, name_))
        assert a.is_ragged == b.is_ragged and (not a.is_ragged or torch.equal(a.lengths, b.lengths))
        assert a.total_seen == b.total_seen and a.sliding_window == b.sliding_window
    assert kvs.cache_stats(saved.cache).kv_bytes == kvs.cache_stats(out.cache).kv_bytes
    assert saved.method == repr(method) and saved.ratio == 0.5
    assert saved.seen == out.cache.real_tokens_seen().tolist()
    assert saved.version == kvs.__version__ and saved.fingerprint == model_fingerprint(model)
    tails = [split_prompt(tokenizer, CONTEXT, q)[1] for q in QUESTIONS]
    again = answer(model, tokenizer, saved.cache, [0, 0], tails, 8)[0]
    assert again == out.answers
    assert again == answer(model, tokenizer, out.cache, [0, 0], tails, 8)[0]


def test_another_model_raises(make_model, tokenizer, tmp_path):
    model = make_model("llama")
    out = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS[:1], method=kvs.get_method("knorm", ratio=0.5))
    path = kvs.save_cache(tmp_path / "ctx.safetensors", out.cache, model)
    assert kvs.load_cache(path, make_model("llama")).seen == out.cache.real_tokens_seen().tolist()  # same weights
    for other in (make_model("llama", seed=1), make_model("qwen2"), make_model("llama", num_hidden_layers=2)):
        with pytest.raises(ValueError, match=r"was computed by model .*fingerprint .* not by this model"):
            kvs.load_cache(path, other)


def test_bad_files_raise(make_model, tmp_path):
    model = make_model("llama")
    with pytest.raises(ValueError, match="does not exist"):
        kvs.load_cache(tmp_path / "missing.safetensors", model)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something"})
    with pytest.raises(ValueError, match="is not a kvsqueeze cache file"):
        kvs.load_cache(other, model)
    with pytest.raises(ValueError, match="the cache is empty"):
        kvs.save_cache(tmp_path / "empty.safetensors", kvs.KVCache(model.config), model)


def test_extra_metadata_round_trips(make_model, tokenizer, tmp_path):
    model = make_model("llama")
    out = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS[:1])
    path = kvs.save_cache(tmp_path / "c.safetensors", out.cache, model, extra={"doc": "harbour", "n": [1, 2]})
    saved = kvs.load_cache(path, model)
    assert saved.extra == {"doc": "harbour", "n": [1, 2]}
    assert saved.method == "None" and saved.ratio is None
    assert json.loads(json.dumps(saved.seen)) == saved.seen
