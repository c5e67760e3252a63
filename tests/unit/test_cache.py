"""The prunable KVCache: pruning frees storage for real, bytes are measured from storages, rows copy, sliding layers
trim to their window and are never pruned, the peak is tracked, and misuse fails with a clear error."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

import kvsqueeze as kvs
from kvsqueeze import step
from kvsqueeze.cache import KVCache, KVLayer
from kvsqueeze.storage import SharedStorage
from tests.helpers import ids_of, kept_counts, kept_positions

PER_TOKEN = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head_dim 16, fp32: bytes per token and layer


def run(model, ids, cache, method=None, mask=None):
    with torch.no_grad(), kvs.compress(model, method):
        return model(ids, attention_mask=mask, past_key_values=cache).logits


# --- pruning ----------------------------------------------------------------------------------------------------------


def test_prune_frees_storage(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(40), cache)
    layer = cache.layer(0)
    assert layer.keys.untyped_storage().nbytes() == 40 * 2 * 16 * 4
    old_keys, old_values = weakref.ref(layer.keys), weakref.ref(layer.values)
    total_before = kvs.cache_bytes(cache)
    positions_before = layer.positions.clone()

    keep = torch.tensor([[[1, 5, 7, 39, 0], [0, 2, 4, 6, 8]]])  # head 0 keeps 4 slots, head 1 keeps 5
    counts = torch.tensor([[4, 5]])
    expected_keys = [layer.keys[0, 0, [1, 5, 7, 39]].clone(), layer.keys[0, 1, [0, 2, 4, 6, 8]].clone()]
    layer.prune(keep, counts)
    gc.collect()

    assert old_keys() is None and old_values() is None, "the old tensors (and their storages) are released"
    # heads keep different counts: the layer switches to the ragged layout, 4 + 5 tokens and no empty slot
    assert layer.is_ragged
    assert layer.keys.shape == (9, 16)
    assert layer.keys.untyped_storage().nbytes() == 9 * 16 * 4
    assert layer.values.untyped_storage().nbytes() == 9 * 16 * 4
    assert kvs.cache_bytes(cache) == total_before - (80 - 9) * PER_TOKEN // 2
    assert layer.kept.tolist() == [[4, 5]]
    keys, _, positions = layer.view()  # rectangular copy: head 0's slot beyond its count is empty
    assert positions[0, 0].tolist() == [1, 5, 7, 39, -1]
    assert positions[0, 1].tolist() == positions_before[0, 1, [0, 2, 4, 6, 8]].tolist()
    torch.testing.assert_close(keys[0, 0, :4], expected_keys[0], rtol=0, atol=0)
    torch.testing.assert_close(keys[0, 1], expected_keys[1], rtol=0, atol=0)
    stats = kvs.cache_stats(cache)
    assert stats.padding_bytes == 0
    assert layer.seen.tolist() == [40]  # the uncompressed length is remembered


def test_compression_frees_the_uncompressed_storages(make_model):
    model = make_model("qwen2")
    cache = KVCache(model.config)
    run(model, ids_of(50), cache, kvs.get_method("knorm", ratio=0.5))
    for layer in cache.full_layers():
        assert layer.keys.untyped_storage().nbytes() == 25 * 2 * 16 * 4
        assert layer.values.untyped_storage().nbytes() == 25 * 2 * 16 * 4
        assert layer.positions.shape == (1, 2, 25)
    assert kvs.cache_bytes(cache) == 4 * 25 * PER_TOKEN


# --- measuring bytes --------------------------------------------------------------------------------------------------


def test_cache_bytes_counts_a_shared_storage_once(make_model):
    cache = DynamicCache(config=make_model("llama").config)
    big = torch.zeros(1, 2, 10, 16)  # 1280 bytes
    layer0, layer1 = cache.layers[0], cache.layers[1]
    layer0.keys, layer0.values = big[:, :, :4], big[:, :, 4:]  # two views of one storage
    assert kvs.cache_bytes(cache) == big.untyped_storage().nbytes() == 1280
    layer1.keys, layer1.values = big[:, :, 2:3], torch.ones(1, 2, 3, 16)  # the same storage again, plus a new one
    assert kvs.cache_bytes(cache) == 1280 + 3 * 2 * 16 * 4
    stats = kvs.cache_stats(cache)
    assert stats.kv_bytes == kvs.cache_bytes(cache)
    assert stats.tokens_kept == [4, 1]
    assert stats.peak_kv_bytes == stats.kv_bytes  # not a KVCache: no tracking, the current bytes


def test_cache_bytes_of_a_slice_is_its_whole_storage(make_model):
    cache = DynamicCache(config=make_model("llama").config)
    big = torch.zeros(1, 2, 100, 16)
    layer = cache.layers[0]
    layer.keys, layer.values = big[:, :, :1], big[:, :, 1:2]
    assert kvs.cache_bytes(cache) == 100 * 2 * 16 * 4


def test_cache_stats_metadata_and_kept(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(30), cache, kvs.get_method("streaming_llm", ratio=0.5))
    stats = kvs.cache_stats(cache)
    assert stats.tokens_kept == [15, 15, 15, 15]
    assert stats.kv_bytes == 4 * 15 * PER_TOKEN
    assert stats.sliding_kv_bytes == 0
    assert stats.padding_bytes == 0
    # positions (B, H, T) int32 and seen (B,) int64, per layer
    assert stats.metadata_bytes == 4 * (2 * 15 * 4 + 8)


# --- rows -------------------------------------------------------------------------------------------------------------


def test_selecting_every_row_in_order_shares_the_storages(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(20, batch=2), cache, kvs.get_method("knorm", ratio=0.5), torch.ones(2, 20, dtype=torch.long))
    copy = cache.select_rows(torch.tensor([0, 1]))
    assert all(a.storage is b.storage for a, b in zip(cache.kv_layers(), copy.kv_layers(), strict=True))
    original = [layer.view() for layer in cache.kv_layers()]
    with torch.no_grad(), kvs.attach(model):
        for _ in range(3):  # decode steps append to the copy (one token per row: into the room of its storage)
            model(ids_of(1, batch=2), past_key_values=copy)
    assert copy.real_tokens_seen().tolist() == [23, 23] and cache.real_tokens_seen().tolist() == [20, 20]
    for layer, before in zip(cache.kv_layers(), original, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(layer.view(), before, strict=True))
    assert cache.select_rows(torch.tensor([1, 0])).layer(0).storage is not cache.layer(0).storage


def test_select_rows_copies(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    run(model, ids_of(20, batch=2), cache, kvs.get_method("knorm", ratio=0.5), mask)
    new = cache.select_rows(torch.tensor([1, 1, 0]))
    assert new.real_tokens_seen().tolist() == [14, 14, 20]
    for old_layer, new_layer in zip(cache.kv_layers(), new.kv_layers(), strict=True):
        for new_t, old_t in zip(new_layer.view(), old_layer.view(), strict=True):  # rows of uneven length: ragged
            assert torch.equal(new_t, old_t[[1, 1, 0]])
        assert new_layer.keys.untyped_storage().data_ptr() != old_layer.keys.untyped_storage().data_ptr()
        assert new_layer.tracker is new.tracker
    original = [layer.keys.clone() for layer in cache.kv_layers()]
    new.layer(0).keys.add_(1.0)
    assert torch.equal(cache.layer(0).keys, original[0]), "writing the copy leaves the original alone"
    assert new.tracker.current == kvs.cache_bytes(new) == 4 * (7 + 7 + 10) * PER_TOKEN  # ragged: no empty slots
    kept_before = [layer.kept.clone() for layer in cache.kv_layers()]
    with torch.no_grad(), kvs.attach(model):
        model(ids_of(3, batch=3), past_key_values=new)
    assert new.real_tokens_seen().tolist() == [17, 17, 23]
    assert cache.real_tokens_seen().tolist() == [20, 14]
    assert all(torch.equal(a, b.kept) for a, b in zip(kept_before, cache.kv_layers(), strict=True))
    assert all(torch.equal(a, b.keys) for a, b in zip(original, cache.kv_layers(), strict=True))


FORKED = {  # a context compressed each way: rectangular, ragged (per-head budgets), thin keys
    "knorm": lambda: kvs.get_method("knorm", ratio=0.5),
    "adakv": lambda: kvs.get_method("adakv", ratio=0.5, scorer=kvs.get_method("knorm")),
    "think": lambda: kvs.get_method("think", ratio=0.5, scorer=kvs.get_method("knorm"), key_channel_ratio=0.5),
}


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
@pytest.mark.parametrize("method", sorted(FORKED))
def test_a_fork_goes_on_as_a_copy_would_reading_the_context_in_place(family, method, make_model):
    model = make_model(family)
    cache = KVCache(model.config)
    run(model, ids_of(24, batch=1), cache, FORKED[method]())
    before = [layer.view() for layer in cache.kv_layers()]
    copy, fork = cache.select_rows(torch.tensor([0])), cache.fork([0])
    for layer, forked in zip(cache.kv_layers(), fork.kv_layers(), strict=True):
        if layer.is_sliding:  # its window moves as tokens come: copied
            assert not isinstance(forked.storage, SharedStorage)
        else:
            assert isinstance(forked.storage, SharedStorage) and forked.storage.prefixes[0] is layer.storage
    assert fork.tracker.current == cache.tracker.current  # nothing copied, nothing of its own yet
    for ids in (ids_of(5, seed=3), ids_of(1, seed=4), ids_of(1, seed=5), ids_of(1, seed=6)):
        torch.testing.assert_close(run(model, ids, fork), run(model, ids, copy), rtol=1e-4, atol=1e-4)
    assert fork.real_tokens_seen().tolist() == copy.real_tokens_seen().tolist() == [32]
    for layer, was in zip(cache.kv_layers(), before, strict=True):  # the context is as it was
        assert all(torch.equal(a, b) for a, b in zip(layer.view(), was, strict=True))
    shared = [layer for layer in fork.full_layers()]
    assert all(torch.equal(f.kept, c.kept) for f, c in zip(shared, copy.full_layers(), strict=True))


def test_forking_a_row_the_cache_lacks_is_refused(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(6, batch=2), cache)
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 1\]"):
        cache.fork([0, 2])
    with pytest.raises(ValueError, match="at least one row"):
        cache.fork([])
    twice = cache.fork([1, 1])  # one prefix for both rows: row 1 copied once
    assert len(twice.layer(0).storage.prefixes) == 1  # type: ignore[union-attr]


def test_forks_of_one_context_joined_read_it_once(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(20, batch=1), cache, kvs.get_method("knorm", ratio=0.5))
    forks = [cache.fork([0]) for _ in range(3)]
    for i, fork in enumerate(forks):
        run(model, ids_of(2 + i, seed=i), fork)
    joined = forks[0].concat_rows(forks[1:])
    layer = joined.layer(0)
    assert isinstance(layer.storage, SharedStorage) and len(layer.storage.prefixes) == 1
    own = 2 + 3 + 4  # the forks' own tokens, padded to the longest (4) in the joined suffix
    assert kvs.cache_bytes(joined) == kvs.cache_bytes(cache) + 4 * 3 * len(cache.kv_layers()) * PER_TOKEN > own
    alone = run(model, ids_of(1, batch=3, seed=9), joined)
    for i, fork in enumerate(forks):
        torch.testing.assert_close(alone[i : i + 1], run(model, ids_of(1, batch=3, seed=9)[i : i + 1], fork),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    left = joined.select_rows(torch.tensor([2]))
    storage = left.layer(0).storage
    assert isinstance(storage, SharedStorage) and storage.prefixes[0] is cache.layer(0).storage


def test_one_fork_at_a_time_writes_into_the_contexts_room(make_model):
    """Once the context has room after its last slot (`make_room`, as a prefill leaves it), the first one-row fork
    takes it, so its decode steps attend to one rectangle; a second fork made meanwhile keeps its tokens apart. Both
    answer as copies of the context would, the context stays as it was, and once the first fork is gone the room is
    free for the next one."""
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(12, batch=1), cache)
    bytes_before = kvs.cache_bytes(cache)
    cache.make_room()
    assert kvs.cache_bytes(cache) - bytes_before == 128 * len(cache.kv_layers()) * PER_TOKEN
    before = [layer.view() for layer in cache.kv_layers()]
    storages = [layer.storage for layer in cache.kv_layers()]
    first, second = cache.fork([0]), cache.fork([0])
    assert all(layer.storage is was for layer, was in zip(cache.kv_layers(), storages, strict=True))  # no copy
    copy = cache.select_rows(torch.tensor([0]))  # one row: the context's storages themselves, appended to by copying
    for ids in (ids_of(3, seed=1), ids_of(1, seed=2), ids_of(1, seed=3)):
        want = run(model, ids, copy)
        torch.testing.assert_close(run(model, ids, first), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(run(model, ids, second), want, rtol=1e-4, atol=1e-4)
    assert all(isinstance(layer.storage, SharedStorage) for layer in first.kv_layers() + second.kv_layers())
    assert all(layer.storage.joined() is not None for layer in first.kv_layers())  # type: ignore[union-attr]
    assert all(layer.storage.joined() is None for layer in second.kv_layers())  # type: ignore[union-attr]
    for layer, was in zip(cache.kv_layers(), before, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(layer.view(), was, strict=True))
    del first
    gc.collect()
    third = cache.fork([0])
    fresh = cache.select_rows(torch.tensor([0]))
    torch.testing.assert_close(run(model, ids_of(2, seed=4), third), run(model, ids_of(2, seed=4), fresh),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    assert all(layer.storage.joined() is not None for layer in third.kv_layers())  # type: ignore[union-attr]


def test_a_forks_decode_steps_read_one_rectangle_on_grouped_query_heads(make_model):
    """On a model with fewer KV heads than query heads, decoding through the lent room (one attention call) answers
    as the two-part path over the same context does."""
    model = make_model("qwen3")
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    cache = KVCache(model.config)
    run(model, ids_of(10, batch=1), cache)
    joined = cache.fork([0])  # the first fork: the context gets room, and lends it
    apart = cache.fork([0])  # the room is lent: its tokens apart
    for ids in (ids_of(4, seed=1), ids_of(1, seed=2), ids_of(1, seed=3)):
        torch.testing.assert_close(run(model, ids, joined), run(model, ids, apart), rtol=1e-5, atol=1e-5)
    assert all(layer.storage.joined() is not None for layer in joined.kv_layers())  # type: ignore[union-attr]
    assert all(layer.storage.joined() is None for layer in apart.kv_layers())  # type: ignore[union-attr]


# --- sliding layers ---------------------------------------------------------------------------------------------------


def test_cache_layers_follow_the_config(make_model):
    gemma = KVCache(make_model("gemma3").config)
    assert [layer.is_sliding for layer in gemma.kv_layers()] == [True, False, True, False]
    assert [layer.sliding_window for layer in gemma.sliding_layers()] == [16, 16]
    assert len(gemma.full_layers()) == 2
    llama = KVCache(make_model("llama").config)
    assert not any(layer.is_sliding for layer in llama.kv_layers())


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_cache_layers_follow_a_global_sliding_window(family, make_model):
    config = make_model(family, sliding_window=16).config
    reference = DynamicCache(config=config)
    expected = [type(layer).__name__ == "DynamicSlidingWindowLayer" for layer in reference.layers]
    assert expected == [True] * 4
    assert [layer.is_sliding for layer in KVCache(config).kv_layers()] == expected


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_layers_trim_to_window_and_are_never_pruned(family, make_model):
    model = make_model(family)
    cache = KVCache(model.config)
    method = kvs.get_method("knorm", ratio=0.5)
    run(model, ids_of(40), cache, method)
    for layer in cache.sliding_layers():
        # only what a future query can still see: the last window - 1 = 15 positions, never pruned by the method
        assert layer.keys.shape == (1, 2, 15, 16)
        assert layer.positions.tolist() == [[list(range(25, 40))] * 2]
        assert layer.keys.untyped_storage().nbytes() == 15 * 2 * 16 * 4
    run(model, ids_of(3, seed=1), cache, method)  # another forward, still compressing
    for layer in cache.sliding_layers():
        assert layer.keys.shape == (1, 2, 15, 16)
        assert layer.positions.tolist() == [[list(range(28, 43))] * 2]
        assert layer.seen.tolist() == [43]
    for layer in cache.full_layers():
        assert layer.kept.tolist() == [[21, 21]]  # floor(43 / 2): full layers keep being pruned
    stats = kvs.cache_stats(cache)
    assert stats.sliding_kv_bytes == 2 * 15 * PER_TOKEN
    assert stats.kv_bytes == 2 * 21 * PER_TOKEN


def test_short_sliding_layers_are_not_trimmed(make_model):
    model = make_model("gemma3")
    cache = KVCache(model.config)
    run(model, ids_of(10), cache)
    for layer in cache.sliding_layers():
        assert layer.positions.tolist() == [[list(range(10))] * 2]


def test_sliding_trim_keeps_the_window_of_every_row(make_model):
    model = make_model("gemma3")
    cache = KVCache(model.config)
    run(model, ids_of(30), cache)
    work = cache.select_rows(torch.tensor([0, 0]))
    questions = ids_of(10, seed=3, batch=2)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :7] = 0  # row 0 asks a 3-token question, left-padded to 10
    run(model, questions, work, mask=mask)
    run(model, torch.tensor([[7], [7]]), work)
    for layer in work.sliding_layers():
        real = (layer.positions >= 0).sum(-1)
        assert real.tolist() == [[15, 15], [15, 15]]  # the last window - 1 real tokens of each row
        newest = layer.positions.amax(-1)
        assert newest.tolist() == [[33, 33], [40, 40]]
        for b in range(2):
            assert kept_positions(layer, b, 0) == list(range(int(newest[b, 0]) - 14, int(newest[b, 0]) + 1))


# --- peak -------------------------------------------------------------------------------------------------------------


def test_peak_one_shot_prefill(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(61), cache, kvs.get_method("knorm", ratio=0.5))
    # layers are pruned one after the other: the peak is three pruned layers plus the last one uncompressed
    assert kvs.cache_stats(cache).peak_kv_bytes == (3 * 30 + 61) * PER_TOKEN
    assert cache.tracker.current == kvs.cache_bytes(cache) == 4 * 30 * PER_TOKEN
    dense = KVCache(model.config)
    run(model, ids_of(61), dense)
    assert kvs.cache_stats(dense).peak_kv_bytes == 4 * 61 * PER_TOKEN == kvs.cache_bytes(dense)


def test_peak_chunked_prefill_is_bounded_by_budget_plus_chunk(make_model):
    model = make_model("llama")
    ids = ids_of(96)
    chunk = 16
    cache = KVCache(model.config)
    peaks = []
    for lo in range(0, 96, chunk):
        run(model, ids[:, lo : lo + chunk], cache, kvs.get_method("knorm", ratio=0.75))
        peaks.append(cache.tracker.peak)
    assert kept_counts(cache) == [[[24, 24]]] * 4
    # at any time: every layer within its budget, and one layer holding one extra chunk
    assert peaks[-1] <= (4 * 24 + chunk) * PER_TOKEN
    assert peaks == sorted(peaks)
    assert kvs.cache_stats(cache).peak_kv_bytes == peaks[-1] < 4 * 96 * PER_TOKEN


# --- misuse -----------------------------------------------------------------------------------------------------------


def test_fresh_cache_without_kvsqueeze_attention_raises(make_model):
    model = make_model("llama")
    with pytest.raises(RuntimeError, match=r"attach.*compress"), torch.no_grad():
        model(ids_of(8), past_key_values=KVCache(model.config))


def test_cache_reused_without_kvsqueeze_attention_raises(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(8), cache)
    with pytest.raises(RuntimeError, match=r"kvsqueeze\.attach\(model\).*kvsqueeze\.compress"), torch.no_grad():
        model(ids_of(8), past_key_values=cache)


def test_misuse_error_leaves_the_cache_unchanged(make_model):
    model = make_model("llama")
    cache = KVCache(model.config)
    run(model, ids_of(8), cache)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(ids_of(8), past_key_values=cache)
    assert cache.real_tokens_seen().tolist() == [8]
    assert [layer.positions.shape[-1] for layer in cache.kv_layers()] == [8] * 4


def test_compress_rejects_other_caches(make_model):
    model = make_model("llama")
    with pytest.raises(TypeError, match="KVCache"), torch.no_grad(), kvs.attach(model):
        model(ids_of(8), past_key_values=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="use_cache=False"), torch.no_grad(), kvs.attach(model):
        model(ids_of(8), use_cache=False)
    assert model.config._attn_implementation == "sdpa", "the attention implementation is restored"


def test_unsupported_cache_operations(make_model):
    cache = KVCache(make_model("llama").config)
    layer = cache.layer(0)
    with pytest.raises(NotImplementedError, match="crop"):
        layer.crop(1)
    with pytest.raises(NotImplementedError, match="beam"):
        layer.batch_repeat_interleave(2)
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        cache.begin_step(torch.arange(4))


def test_manual_step_protocol():
    layer_cache = KVCache.__new__(KVCache)  # built by hand: one full layer, no model
    layer = KVLayer()
    Cache.__init__(layer_cache, layers=[layer])
    layer_cache.tracker = layer.tracker
    layer_cache.step_positions = None
    layer_cache.begin_step(torch.tensor([[0, 1, 2], [0, 0, 1]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    keys = torch.randn(2, 2, 3, 16)
    k, _ = layer.update(keys, keys.clone())
    assert k is layer.keys
    assert layer.positions.tolist() == [[[0, 1, 2]] * 2, [[-1, 0, 1]] * 2]
    assert layer.seen.tolist() == [3, 2]
    assert layer.get_seq_length() == 3
    assert layer.tracker.current == layer.tracker.peak == 2 * 2 * 3 * 16 * 4 * 2
    assert step.take_updated(k) is layer  # what the attention function does next (and it consumes it)
    assert step.take_updated(k) is None


def test_a_forwards_tokens_are_worked_out_once_for_every_layer(make_model):
    """`begin_step` hands every layer the same `StepTokens` (positions, pads, real counts computed once per forward,
    not once per layer); setting a layer's `query_positions` by hand derives the same fields."""
    cache = KVCache(make_model("llama").config)
    cache.begin_step(torch.tensor([[4, 5, 6], [0, 0, 1]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    tokens = {id(layer.tokens) for layer in cache.kv_layers()}
    assert len(tokens) == 1 and len(cache.kv_layers()) > 1
    first = cache.kv_layers()[0]
    assert first.tokens is not None
    assert first.tokens.positions.tolist() == [[4, 5, 6], [-1, 0, 1]]
    assert first.tokens.slots.dtype == torch.int32 and first.tokens.real.tolist() == [3, 2]
    assert not first.tokens.all_real
    by_hand = KVLayer()
    by_hand.query_positions = torch.tensor([[7, 8]])
    assert by_hand.tokens is not None and by_hand.tokens.all_real and by_hand.tokens.real.tolist() == [2]
    cache.end_step()
    assert all(layer.query_positions is None for layer in cache.kv_layers())
