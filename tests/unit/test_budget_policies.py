"""Budget policies on tiny models: the global budget (scored in the forward, pruned at its end) equals compressing a
recording and attention over it equals a dense masked reference; per-layer lists follow their weights; CriticalKV
keeps its stage 1 by base score."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.recording import compress_recording, record
from tests.helpers import full_layer_positions, ids_of, kept_counts, prefill
from tests.unit.test_attention import reference_question_logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_global_budget_in_forward_equals_recording_and_dense_reference(family, make_model):
    model = make_model(family)
    ctx, question = ids_of(50, seed=2), ids_of(6, seed=3)
    method = kvs.get_method("global_budget", ratio=0.5, scorer=SnapKV(window=8))
    cache = prefill(model, ctx, method)
    full = cache.full_layers()
    totals = [int(layer.kept.sum()) for layer in full]
    assert sum(totals) == len(full) * 2 * 25  # the model total is exact
    assert len(set(totals)) > 1 or family == "gemma3", "layers keep different amounts"
    recorded = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, recorded) as rec:
        model(ctx, past_key_values=recorded)
    copy, log = compress_recording(rec, method)
    for a, b in zip(cache.kv_layers(), copy.kv_layers(), strict=True):
        for x, y in zip(a.view(), b.view(), strict=True):
            assert torch.equal(x, y)
    assert log.kv_bytes_after == kvs.cache_stats(copy).kv_bytes
    kept = full_layer_positions(cache)
    with torch.no_grad(), kvs.attach(model):
        got = model(question, past_key_values=cache).logits
    torch.testing.assert_close(got, reference_question_logits(model, ctx, question, kept), atol=1e-4, rtol=1e-4)


def test_global_budget_refuses_layer_by_layer_planning(make_model):
    method = kvs.get_method("global_budget", ratio=0.5)
    with pytest.raises(ValueError, match="every layer's scores"):
        method.plan(None)  # type: ignore[arg-type]


def test_layer_budgets_follow_the_weights(make_model):
    model = make_model("llama")
    method = kvs.get_method("layer_budgets", ratio=0.5, scorer="knorm", weights=[1, 1, 2, 4])
    cache = prefill(model, ids_of(64), method)
    kept = kept_counts(cache)
    # mean 32 over 4 layers = 128 tokens in weight 1:1:2:4 -> 16, 16, 32, 64 (64 = all the layer holds)
    assert kept == [[[16, 16]], [[16, 16]], [[32, 32]], [[64, 64]]]
    capped = kvs.get_method("layer_budgets", ratio=0.5, scorer="knorm", weights=[1, 1, 1, 9])
    kept = [layer.kept.tolist()[0][0] for layer in prefill(model, ids_of(64), capped).full_layers()]
    assert kept == [21, 21, 21, 64]  # the last layer is capped at 64; the other 64 are spread evenly (floored)
    with pytest.raises(ValueError, match="4 full-attention layers"):
        prefill(model, ids_of(64), kvs.get_method("layer_budgets", ratio=0.5, weights=[1, 2]))


def test_criticalkv_keeps_stage_one_and_weighs_the_rest_by_values(make_model):
    model = make_model("llama")
    ids = ids_of(60, seed=4)
    base = prefill(model, ids, kvs.get_method("knorm", ratio=0.5))
    critical = prefill(model, ids, kvs.get_method("criticalkv", ratio=0.5, scorer="knorm"))
    everything = prefill(model, ids, kvs.get_method("criticalkv", ratio=0.5, scorer="knorm", first_share=1.0))
    differs = False
    layers = zip(base.full_layers(), critical.full_layers(), everything.full_layers(), strict=True)
    for b_layer, c_layer, e_layer in layers:
        assert c_layer.kept.tolist() == [[30, 30]]
        assert torch.equal(e_layer.positions, b_layer.positions)  # stage 1 over the whole budget = the base scorer
        for h in range(2):
            top_half = set(b_layer.positions[0, h, :].tolist())
            kept = set(c_layer.positions[0, h].tolist())
            # stage 1 (15 tokens by base score) is a subset of both selections
            assert len(top_half & kept) >= 15
            differs |= kept != top_half
    assert differs, "the value-weighted stage 2 must change something"
