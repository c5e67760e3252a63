"""A KVCache built with kv_bits: its full-attention layers are stored quantized (sliding ones are not), methods score
each forward's tokens in full precision and what they keep is quantized when the forward ends, 8 bits answer like
full precision on the tiny models of every family, bytes and kv_bits are reported from the storages, and a saved
quantized cache comes back quantized (a damaged one is refused)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kvsqueeze as kvs
from kvsqueeze.cachefile import CacheFileError
from kvsqueeze.checksum import tensors_digest
from kvsqueeze.storage import DenseStorage, QuantizedStorage
from tests.helpers import ids_of
from tests.tiny import FAMILIES


def _run(model, cache, ids, mask=None, method=None, follow=None):
    """Prefill `ids` into `cache` (compressed with `method`), then feed the tokens `follow` (B, n) one at a time.
    Returns the next-token logits (B, n + 1, V): after the prefill, then after each fed token."""
    mask = torch.ones_like(ids) if mask is None else mask
    logits = []
    with torch.no_grad(), kvs.compress(model, method):
        out = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
        for i in range(0 if follow is None else follow.shape[1]):
            logits.append(out)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(follow[:, i : i + 1], attention_mask=mask, past_key_values=cache).logits[:, -1]
    return torch.stack([*logits, out], dim=1)


def _greedy(model, cache, ids, mask, steps):
    """(B, steps) greedy tokens after a prefill of `ids`."""
    tokens = []
    with torch.no_grad(), kvs.attach(model):
        out = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
        for _ in range(steps):
            tokens.append(out.argmax(-1))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(tokens[-1][:, None], attention_mask=mask, past_key_values=cache).logits[:, -1]
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_bits": 3}, r"kv_bits must be one of 2, 4, 8, got 3"),
        ({"kv_bits": 16}, r"kv_bits must be one of 2, 4, 8, got 16"),
        ({"kv_bits": "4"}, r"kv_bits must be an integer"),
        ({"kv_bits": 4, "kv_group_size": 0}, r"kv_group_size must be an integer >= 1 .*got 0"),
        ({"kv_group_size": 0}, r"kv_group_size must be an integer >= 1"),  # checked even without kv_bits
        ({"kv_bits": 2, "kv_residual": -3}, r"kv_residual must be an integer >= 0 .*got -3"),
    ],
)
def test_arguments_are_checked(make_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvs.KVCache(make_model("llama").config, **kwargs)


def test_full_layers_are_quantized_sliding_ones_are_not(make_model):
    model = make_model("gemma3")
    ids = ids_of(60, batch=2)
    cache, plain = kvs.KVCache(model.config, kv_bits=4, kv_group_size=8, kv_residual=8), kvs.KVCache(model.config)
    method = kvs.get_method("knorm", ratio=0.5)
    _run(model, cache, ids, method=method)
    _run(model, plain, ids, method=method)
    assert {type(layer.storage) for layer in cache.full_layers()} == {QuantizedStorage}
    assert {type(layer.storage) for layer in cache.sliding_layers()} == {DenseStorage}
    stats, plain_stats = kvs.cache_stats(cache), kvs.cache_stats(plain)
    assert stats.kv_bits == cache.kv_bits == 4 and plain_stats.kv_bits is None
    assert stats.kv_bytes == sum(layer.storage.nbytes() for layer in cache.full_layers()) < plain_stats.kv_bytes
    assert stats.sliding_kv_bytes == plain_stats.sliding_kv_bytes and stats.tokens_kept == plain_stats.tokens_kept
    for layer in cache.full_layers():  # 30 kept per head: 2 groups of 8 quantized, 14 >= residual wait
        assert layer.storage.groups.eq(2).all() and layer.storage.residual_keys.shape[0] == 2 * 2 * 14


@pytest.mark.parametrize("family", FAMILIES)
def test_eight_bits_answer_like_full_precision(make_model, family):
    """The tiny random models' next-token distributions are flat (top probability about 5%), so a small change can
    flip a greedy choice: most answers must match, and logits stay within 5% of full precision (relative norm)."""
    model = make_model(family)
    ids, follow = ids_of(96, batch=8, seed=2), ids_of(8, batch=8, seed=3)
    mask = torch.ones_like(ids)
    mask[2, :30] = 0  # a padded row
    quantized = kvs.KVCache(model.config, kv_bits=8, kv_group_size=32, kv_residual=32)
    answers = _greedy(model, quantized, ids, mask, 6), _greedy(model, kvs.KVCache(model.config), ids, mask, 6)
    same = int((answers[0] == answers[1]).all(dim=1).sum())
    assert same >= 5, f"only {same} of 8 six-token greedy answers match full precision"
    reference = _run(model, kvs.KVCache(model.config), ids, mask, follow=follow)
    errors = {}
    for bits in (8, 4, 2):
        cache = kvs.KVCache(model.config, kv_bits=bits, kv_group_size=32, kv_residual=32)
        logits = _run(model, cache, ids, mask, follow=follow)
        assert torch.equal(logits[:, 0], reference[:, 0])  # the prefill attends to its own tokens in full precision
        errors[bits] = float((logits - reference).norm() / reference.norm())
        if bits == 8:  # after the same tokens, the greedy choice rarely differs
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
            assert agree >= 0.9, f"8-bit greedy token differs in {1 - float(agree):.0%} of the steps"
    assert errors[8] < 0.05 and errors[8] < errors[4] < errors[2], errors


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("knorm", {}),
        ("adakv", {"scorer": "knorm"}),  # uneven heads: the ragged case
        ("global_budget", {"scorer": "knorm"}),  # a model-wide plan, pruned when the forward ends
        ("kvzip", {}),  # a model-wide plan from a replay of the context (which must not quantize anything)
    ],
)
def test_methods_score_full_precision_then_what_is_kept_is_quantized(make_model, name, options):
    """Quantizing during the forward would change what is kept or quantize it twice: the quantized cache must equal
    a full-precision run compressed the same way and quantized afterwards."""
    model = make_model("llama")
    method = kvs.get_method(name, ratio=0.5, **{k: kvs.get_method(v) for k, v in options.items()})
    ids = ids_of(70, batch=2, seed=5)
    quantized, plain = kvs.KVCache(model.config, kv_bits=4, kv_group_size=8, kv_residual=8), kvs.KVCache(model.config)
    _run(model, quantized, ids, method=method)
    _run(model, plain, ids, method=method)
    plain.quantize(4, kv_group_size=8, kv_residual=8)
    for a, b in zip(quantized.kv_layers(), plain.kv_layers(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.view(), b.view(), strict=True))
    if name == "adakv":
        assert any(not bool((layer.kept == layer.kept[0, 0]).all()) for layer in quantized.full_layers())


def test_decoding_keeps_the_window_and_later_chunks_join_it(make_model):
    model = make_model("qwen2")
    g, residual = 4, 6
    cache = kvs.KVCache(model.config, kv_bits=2, kv_group_size=g, kv_residual=residual)
    method = kvs.get_method("knorm", ratio=0.5)
    ids = ids_of(48, batch=2, seed=7)
    with torch.no_grad(), kvs.compress(model, method):
        for lo in range(0, 48, 16):  # chunked prefill
            model(ids[:, lo : lo + 16], past_key_values=cache)
            for layer in cache.full_layers():
                waiting = layer.storage.lengths - layer.storage.groups * g
                assert bool((waiting < residual + g).all()) and bool((waiting >= residual).all())
    _run(model, cache, ids_of(1, batch=2), follow=ids_of(9, batch=2, seed=8))  # 10 decoding steps, not compressed
    kept = kvs.cache_stats(cache).tokens_kept
    for layer in cache.full_layers():
        waiting = layer.storage.lengths - layer.storage.groups * g
        assert bool((waiting < residual + g).all()) and bool((waiting >= residual).all())
        positions = layer.view()[2]
        assert bool((positions[..., 1:] > positions[..., :-1]).all())  # slot order kept
    assert all(k == kept[0] for k in kept)


def test_copies_stay_quantized_and_a_plain_cache_can_be_quantized(make_model):
    model = make_model("llama")
    cache = kvs.KVCache(model.config, kv_bits=8, kv_group_size=4, kv_residual=4)
    _run(model, cache, ids_of(30, batch=2))
    copy = cache.select_rows(torch.tensor([1, 1, 0]))
    assert copy.kv_bits == 8 and {type(layer.storage) for layer in copy.kv_layers()} == {QuantizedStorage}
    _run(model, copy, ids_of(5, batch=3))
    assert all(layer.quant == cache.quant for layer in copy.kv_layers())
    plain = kvs.KVCache(model.config)
    _run(model, plain, ids_of(30, batch=2))
    before = kvs.cache_stats(plain).kv_bytes
    plain.quantize(8, kv_group_size=4, kv_residual=4)
    assert plain.kv_bits == 8 and kvs.cache_stats(plain).kv_bytes == kvs.cache_stats(cache).kv_bytes < before


def test_thin_keys_and_rerotation_work_on_a_quantized_cache(make_model):
    model = make_model("llama")
    ids = ids_of(40, batch=2)
    for method in (
        kvs.get_method("think", ratio=0.5, scorer=kvs.get_method("knorm"), key_channel_ratio=0.5),
        kvs.get_method("keyrerotation", ratio=0.5, scorer=kvs.get_method("knorm")),
    ):
        cache = kvs.KVCache(model.config, kv_bits=8, kv_group_size=4, kv_residual=4)
        plain = kvs.KVCache(model.config)
        follow = ids_of(4, batch=2, seed=1)
        logits, reference = (
            _run(model, cache, ids, method=method, follow=follow),
            _run(model, plain, ids, method=method, follow=follow),
        )
        assert (
            torch.allclose(logits, reference, atol=0.5)
            and kvs.cache_stats(cache).kv_bytes < kvs.cache_stats(plain).kv_bytes
        )


@pytest.fixture
def saved(make_model, tmp_path):
    model = make_model("llama")
    cache = kvs.KVCache(model.config, kv_bits=4, kv_group_size=8, kv_residual=8)
    method = kvs.get_method("adakv", ratio=0.5, scorer=kvs.get_method("knorm"))
    _run(model, cache, ids_of(50, batch=2), method=method)
    return model, cache, kvs.save_cache(tmp_path / "q.safetensors", cache, model, method)


def test_a_saved_quantized_cache_comes_back_quantized(saved):
    model, cache, path = saved
    loaded = kvs.load_cache(path, model).cache
    assert loaded.kv_bits == 4 and loaded.quant == cache.quant
    for a, b in zip(cache.kv_layers(), loaded.kv_layers(), strict=True):
        assert isinstance(b.storage, QuantizedStorage)
        saved_parts, loaded_parts = a.to_tensors(), b.to_tensors()
        assert saved_parts.keys() == loaded_parts.keys()
        assert all(torch.equal(saved_parts[n], loaded_parts[n]) for n in saved_parts)
    stats, again = kvs.cache_stats(cache), kvs.cache_stats(loaded)
    assert (again.kv_bytes, again.kv_bits, again.tokens_kept) == (stats.kv_bytes, 4, stats.tokens_kept)
    follow = ids_of(4, batch=2, seed=9)
    assert torch.equal(
        _run(model, loaded, follow[:, :1], follow=follow[:, 1:]),
        _run(model, cache, follow[:, :1], follow=follow[:, 1:]),
    )


def _resave(path, out, edit):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    edit(tensors)
    meta["checksum"] = tensors_digest(tensors, meta)  # a writer that got the data wrong but the checksum right
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.update({"layers.0.quant": torch.tensor([5, 8, 8])}), "layer 0: kv_bits must be one of 2, 4, 8"),
        (
            lambda t: t.update({"layers.1.key_codes": t["layers.1.key_codes"].to(torch.int16)}),
            "layer 1: key_codes has dtype",
        ),
        (
            lambda t: t.update({"layers.2.value_scale": t["layers.2.value_scale"][:-1]}),
            "layer 2: value_scale has shape",
        ),
        (lambda t: t.update({"layers.0.quant": torch.tensor([4, 8, 9])}), "disagree on quantization"),
    ],
)
def test_a_damaged_quantized_file_is_refused(saved, tmp_path, edit, match):
    model, _, path = saved
    with pytest.raises(CacheFileError, match=match):
        kvs.load_cache(_resave(path, tmp_path / "bad.safetensors", edit), model)


def test_flipped_code_bytes_fail_the_checksum(saved, tmp_path):
    model, _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tensors["layers.0.key_codes"] = tensors["layers.0.key_codes"] ^ 1  # one bit of every code byte
    save_file(tensors, str(tmp_path / "flipped.safetensors"), metadata=meta)
    with pytest.raises(CacheFileError, match="checksum"):
        kvs.load_cache(tmp_path / "flipped.safetensors", model)
