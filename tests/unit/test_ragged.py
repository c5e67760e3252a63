"""The ragged layout: per-(row, head) token counts held for real. Attention over it equals a dense reference that masks
the same tokens; bytes are exactly the kept tokens (plus small metadata); padded batches hold no empty slots; new
tokens are appended to every head; rows copy."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.storage import SharedStorage, unpack
from tests.helpers import full_layer_positions, ids_of, kept_total, prefill
from tests.unit.test_attention import reference_question_logits

N_CTX, N_Q = 50, 6
ATOL = 1e-4


ADAKV_CASES = [
    ("llama", kvs.get_method("adakv", ratio=0.5, scorer="knorm")),
    ("llama", kvs.get_method("adakv", ratio=0.6, scorer=SnapKV(window=8))),
    ("gemma2", kvs.get_method("adakv", ratio=0.5, scorer="knorm")),
    ("gemma3", kvs.get_method("adakv", ratio=0.5, scorer=SnapKV(window=8))),
]


@pytest.mark.parametrize(("family", "method"), ADAKV_CASES, ids=["llama-knorm", "llama-snapkv", "gemma2", "gemma3"])
def test_ragged_attention_equals_dense_masked_reference(family, method, make_model):
    model = make_model(family)
    ctx, question = ids_of(N_CTX, seed=2), ids_of(N_Q, seed=3)
    cache = prefill(model, ctx, method)
    full = cache.full_layers()
    assert any(layer.is_ragged for layer in full), "heads must keep different counts to test the ragged layout"
    kept = full_layer_positions(cache)
    with torch.no_grad(), kvs.attach(model):
        got = model(question, past_key_values=cache).logits
    expected = reference_question_logits(model, ctx, question, kept)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    with torch.no_grad():
        unmasked = model(torch.cat([ctx, question], dim=1), use_cache=False).logits[:, N_CTX:]
    assert (got - unmasked).abs().max() > 1e-2, "eviction must matter, else this test proves nothing"


def test_ragged_decoding_steps_equal_dense_reference(make_model):
    """Several forwards over a ragged cache (question, then single tokens) equal one dense masked forward."""
    model = make_model("llama")
    ctx, question = ids_of(N_CTX, seed=4), ids_of(N_Q, seed=5)
    cache = prefill(model, ctx, kvs.get_method("adakv", ratio=0.5, scorer="knorm"))
    kept = full_layer_positions(cache)
    ragged = [layer.is_ragged for layer in cache.full_layers()]
    assert any(ragged)
    steps = [question[:, :3], question[:, 3:4], question[:, 4:5], question[:, 5:]]
    with torch.no_grad(), kvs.attach(model):
        got = torch.cat([model(s, past_key_values=cache).logits for s in steps], dim=1)
    expected = reference_question_logits(model, ctx, question, kept)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    # every head got the 6 new tokens appended after its kept context tokens
    for idx, layer in enumerate(cache.full_layers()):
        assert torch.equal(layer.kept, (kept[idx] >= 0).sum(-1) + N_Q)
        pos = layer.view()[2][0]
        assert [p[p >= 0][-N_Q:].tolist() for p in pos] == [list(range(N_CTX, N_CTX + N_Q))] * 2
        # single-token steps read the segments in place and append to a dense suffix (no repack per step); the layer
        # still saves ragged, with no empty slot
        if ragged[idx]:
            assert isinstance(layer.storage, SharedStorage) and layer.storage.suffix.width() == 3
            saved = layer.storage.to_tensors()
            assert "lengths" in saved and torch.equal(saved["lengths"], layer.kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_are_the_kept_tokens_plus_small_metadata(dtype, make_model):
    model = make_model("llama", head_dim=64).to(dtype)
    cache = prefill(model, ids_of(200), kvs.get_method("adakv", ratio=0.5, scorer="knorm"))
    stats = kvs.cache_stats(cache)
    kept = kept_total(cache)  # (token, head) pairs
    assert any(layer.is_ragged for layer in cache.full_layers())
    assert kept == 4 * 2 * 100  # the pooled totals: H x floor(n (1 - r)) per layer
    per_token_head = 2 * 64 * torch.finfo(dtype).bits // 8  # one key and one value
    assert stats.kv_bytes == kept * per_token_head
    assert stats.padding_bytes == 0
    assert 0 < stats.metadata_bytes < 0.02 * stats.kv_bytes
    dense = prefill(model, ids_of(200), kvs.get_method("knorm", ratio=0.5))
    assert kvs.cache_stats(dense).kv_bytes == stats.kv_bytes  # same memory as the uniform budget


def test_padded_batch_holds_no_empty_slots_and_rows_equal_alone(make_model):
    model = make_model("llama")
    lengths = [N_CTX, 29]
    rows = [ids_of(n, seed=7 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(2, N_CTX, dtype=torch.long)
    mask = torch.zeros(2, N_CTX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, N_CTX - len(row) :], mask[i, N_CTX - len(row) :] = row, 1
    method = kvs.get_method("adakv", ratio=0.5, scorer="knorm")
    cache = prefill(model, ids, method, mask)
    stats = kvs.cache_stats(cache)
    assert stats.padding_bytes == 0
    kept = [int(layer.kept.sum()) for layer in cache.full_layers()]
    assert kept == [2 * (25 + 14)] * 4
    assert stats.kv_bytes == sum(kept) * 2 * 16 * 4
    # a left-padded question: pads are not stored, real tokens are appended to every head of their row
    question = ids_of(N_Q, seed=9, batch=2)
    qmask = torch.ones(2, N_Q, dtype=torch.long)
    qmask[1, :2] = 0
    before = [layer.kept.clone() for layer in cache.full_layers()]
    with torch.no_grad(), kvs.attach(model):
        got = model(question, attention_mask=qmask, past_key_values=cache).logits[:, -1]
    for layer, k in zip(cache.full_layers(), before, strict=True):
        assert torch.equal(layer.kept, k + torch.tensor([[N_Q], [N_Q - 2]]))
    assert kvs.cache_stats(cache).padding_bytes == 0
    for b, row in enumerate(rows):
        alone = prefill(model, row[None], method)
        q = question[b : b + 1, 2 * b :]
        with torch.no_grad(), kvs.attach(model):
            expected = model(q, past_key_values=alone).logits[:, -1]
        torch.testing.assert_close(got[b : b + 1], expected, atol=ATOL, rtol=1e-4)


def test_select_rows_and_chunked_prefill_over_ragged_layers(make_model):
    model = make_model("qwen2")
    method = kvs.get_method("adakv", ratio=0.5, scorer="knorm")
    cache = kvs.KVCache(model.config)
    ids = ids_of(96, batch=2)
    with torch.no_grad(), kvs.compress(model, method):
        for lo in range(0, 96, 32):  # each chunk is scored and pruned together with what the ragged layer holds
            model(ids[:, lo : lo + 32], past_key_values=cache)
    for layer in cache.full_layers():
        assert layer.kept.sum(-1).tolist() == [2 * 48, 2 * 48]
        assert layer.seen.tolist() == [96, 96]
    copy = cache.select_rows(torch.tensor([1, 0, 1]))
    for old, new in zip(cache.full_layers(), copy.full_layers(), strict=True):
        for a, b in zip(old.view(), new.view(), strict=True):
            assert torch.equal(a[[1, 0, 1]], b)
        assert new.keys.untyped_storage().data_ptr() != old.keys.untyped_storage().data_ptr()
    assert kvs.cache_bytes(copy) == kvs.cache_bytes(cache) * 3 // 2


def test_unpack_left_aligns_segments():
    flat = torch.arange(6.0)[:, None]  # segments of 1, 3, 0, 2 tokens
    lengths = torch.tensor([[1, 3], [0, 2]])
    out = unpack(flat, lengths, -1.0)
    assert out.shape == (2, 2, 3, 1)
    assert out[..., 0].tolist() == [[[0, -1, -1], [1, 2, 3]], [[-1, -1, -1], [4, 5, -1]]]
