"""save_cache/load_cache: a compressed cache survives a round trip to disk bit for bit, answers from it are identical,
loading it with another model fails with a clear error, and a damaged or edited file never answers."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import kvsqueeze as kvs
from kvsqueeze.cachefile import CacheFileError, model_fingerprint
from kvsqueeze.generation import answer
from kvsqueeze.prompts import split_prompt

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
    again = answer(model, tokenizer, saved.cache, [0, 0], tails, 8).texts
    assert again == out.answers
    assert again == answer(model, tokenizer, out.cache, [0, 0], tails, 8).texts


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


# --- damaged files never answer ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A llama cache compressed by Ada-KV (ragged layers) saved to disk: (model, path, the original cache)."""
    from tests.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    method = kvs.get_method("adakv", ratio=0.5, scorer=kvs.get_method("knorm"))
    out = kvs.generate(model, tiny_tokenizer(), CONTEXT, QUESTIONS[:1], method=method, max_new_tokens=2)
    path = kvs.save_cache(tmp_path_factory.mktemp("saved") / "ctx.safetensors", out.cache, model, method)
    return model, path, out.cache


def _resave(path, out, edit):
    """Re-save the file after `edit(tensors, metadata)`, with a fresh valid checksum (a writer that got it wrong)."""
    from safetensors import safe_open

    from kvsqueeze.checksum import tensors_digest

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    edit(tensors, meta)
    meta["checksum"] = tensors_digest(tensors, meta)
    save_file(tensors, str(out), metadata=meta)
    return out


def _same(a, b) -> bool:
    return all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        for x, y in zip(a.kv_layers(), b.kv_layers(), strict=True)
    )


def test_unreadable_files_name_the_file(saved, tmp_path):
    model, path, _ = saved
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "header_only": data[:8],
        "empty": b"",
        "text": b"The harbour master walked to the market.\n" * 50,
        "header_damaged": data[:8] + b"{" * 20 + data[28:],
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CacheFileError, match=re.escape(repr(str(bad)))):
            kvs.load_cache(bad, model)
    with pytest.raises(CacheFileError, match="is a directory"):
        kvs.load_cache(tmp_path, model)


def test_flipped_bytes_in_the_data_fail_the_checksum(saved, tmp_path):
    model, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        kvs.load_cache(bad, model)


def test_an_edited_file_fails_the_checksum(saved, tmp_path):
    model, path, _ = saved
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    tensors["layers.0.keys"] = tensors["layers.0.keys"] * 2
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(CacheFileError, match="checksum"):
        kvs.load_cache(tmp_path / "edited.safetensors", model)
    meta["extra"] = json.dumps({"messages": ["something else"]})
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata=meta)
    with pytest.raises(CacheFileError, match="checksum"):
        kvs.load_cache(tmp_path / "meta.safetensors", model)


def _drop_layers(t, m):
    for name in [n for n in t if n.startswith(("layers.2.", "layers.3."))]:
        del t[name]


def _nan_keys(t, m):
    t["layers.1.keys"][0, 0] = float("nan")


def _huge_position(t, m):
    t["layers.0.positions"][-1] = 10**9


def _negative_seen(t, m):
    for i in range(4):
        t[f"layers.{i}.seen"] = -t[f"layers.{i}.seen"]


def _wrong_head_dim(t, m):
    for i in range(4):
        t[f"layers.{i}.keys"] = t[f"layers.{i}.keys"][:, :8].contiguous()


def _length_mismatch(t, m):
    t["layers.0.values"] = t["layers.0.values"][:-3].contiguous()


def _unsorted_positions(t, m):
    t["layers.0.positions"] = t["layers.0.positions"].flip(0).contiguous()


def _extra_layer(t, m):
    t["layers.9.keys"] = t["layers.0.keys"].clone()


def _missing_meta(t, m):
    del m["seen"]


def _bad_meta_json(t, m):
    m["ratio"] = "{half"


def _seen_disagrees(t, m):
    m["seen"] = json.dumps([3])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_drop_layers, "layer 2 is missing"),
        (_nan_keys, "layer 1: keys holds NaN"),
        (_huge_position, "layer 0: .*below its row's seen"),
        (_negative_seen, "seen .* must be >= 0"),
        (_wrong_head_dim, "keys has shape .* expected"),
        (_length_mismatch, "values has shape"),
        (_unsorted_positions, "increase strictly"),
        (_extra_layer, "unexpected tensor 'layers.9.keys'"),
        (_missing_meta, r"metadata \['seen'\] are missing"),
        (_bad_meta_json, "malformed metadata"),
        (_seen_disagrees, "does not match the layers"),
    ],
)
def test_files_that_do_not_fit_the_model_are_refused(saved, tmp_path, edit, match):
    model, path, _ = saved
    bad = _resave(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CacheFileError, match=match):
        kvs.load_cache(bad, model)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_raise_the_clear_error_or_load_unchanged(saved, tmp_path, data):
    """Truncations and byte flips anywhere in the file: the clear error, or (a change JSON ignores, like padding) the
    very same cache. Never another exception, never different keys or values."""
    model, path, original = saved
    content = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        content = content[: data.draw(st.integers(0, len(content) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            i = data.draw(st.integers(0, len(content) - 1), label="offset")
            content[i] ^= data.draw(st.integers(1, 255), label="mask")
    bad = tmp_path / "fuzz.safetensors"
    bad.write_bytes(bytes(content))
    try:
        loaded = kvs.load_cache(bad, model)
    except CacheFileError:
        return
    assert _same(loaded.cache, original)


def test_a_failed_write_leaves_the_old_file(saved, tmp_path, monkeypatch):
    model, path, cache = saved
    target = tmp_path / "kept.safetensors"
    target.write_bytes(path.read_bytes())
    import kvsqueeze.cachefile as cachefile

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cachefile, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        kvs.save_cache(target, cache, model)
    assert target.read_bytes() == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["kept.safetensors"]  # no temporary debris
