"""KVgrad as a method: the kept pairs are exactly the model-wide top of the replay's gradient-weighted scores, with the
exact model-wide budget; where the replay cannot run (chunked prefill, later forwards, recordings, inference mode) a
clear ValueError."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.recording import compress_recording, record
from kvsqueeze.replay import KVGRAD
from tests.helpers import ids_of, prefill
from tests.unit.methods.helpers import assert_global_top_of_replay


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_keeps_the_global_top_of_the_gradient_weighted_scores(ratio, make_model):
    log = assert_global_top_of_replay(make_model("qwen2"), "kvgrad", KVGRAD, ratio)
    assert log.seconds > 0 and log.kv_bytes_after < log.kv_bytes_before


def test_ranks_differently_from_kvzip_plus(make_model):
    model = make_model("llama")
    ids = ids_of(60, seed=3)
    plus = prefill(model, ids, kvs.get_method("kvzip_plus", ratio=0.5))
    grad = prefill(model, ids, kvs.get_method("kvgrad", ratio=0.5))
    pairs = zip(plus.full_layers(), grad.full_layers(), strict=True)
    assert any(not torch.equal(a.view()[2], b.view()[2]) for a, b in pairs)


def test_where_the_replay_cannot_run(make_model):
    model = make_model("llama")
    method = kvs.get_method("kvgrad", ratio=0.5)
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, method):
        model(ids_of(30), past_key_values=cache)
        with pytest.raises(ValueError, match=r"added 5 tokens to a cache that held 30 .*one forward"):
            model(ids_of(5, seed=1), past_key_values=cache)
    with (
        torch.inference_mode(),
        kvs.compress(model, method),
        pytest.raises(ValueError, match=r"outside torch.inference_mode\(\)"),
    ):
        model(ids_of(30), past_key_values=kvs.KVCache(model.config))
    rec_cache = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, rec_cache) as rec:
        model(ids_of(30), past_key_values=rec_cache)
    with pytest.raises(ValueError, match="compress_recording cannot replay"):
        compress_recording(rec, method)


def test_options_are_validated():
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        kvs.get_method("kvgrad", chunk_size=0)
    with pytest.raises(ValueError, match="prompt must be a string"):
        kvs.get_method("kvgrad", prompt=3)
    with pytest.raises(ValueError, match=r"ratio.*1\.5"):
        kvs.get_method("kvgrad", ratio=1.5)
    method = kvs.get_method("kvgrad")
    assert type(method).variant == KVGRAD and not type(method).shared_prefill and type(method).budget_scope == "model"
