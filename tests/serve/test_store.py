"""The context store on its own: least recently used contexts leave first to stay under the byte bound (measured from
the storages), files on disk come back checked, and ids cannot name a path outside the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvsqueeze.memory import cache_bytes
from kvsqueeze.pipeline import prefill
from kvsqueeze.serve.store import ContextStore, StoredContext, context_id
from tests.tiny import tiny_model

MODEL = tiny_model("llama")
NONE = {"method": "none", "ratio": 0.0, "options": {}, "budget_policy": None}


def stored(seed: int, n: int = 24, info: dict | None = None) -> StoredContext:
    ids = torch.randint(5, 400, (1, n), generator=torch.Generator().manual_seed(seed))
    cache, *_ = prefill(MODEL, ids, torch.ones_like(ids))
    cache.make_room()  # as the store holds a context (room for its forks), so its bytes are what the store counts
    cid = context_id("fingerprint", None, ids[0].tolist())
    return StoredContext(cid, cache, info or {"tokens": n, "compression": NONE}, cache_bytes(cache))


def test_least_recently_used_leave_first() -> None:
    a, b, c, d = (stored(i) for i in range(4))
    store = ContextStore(MODEL, max_bytes=int(2.5 * a.nbytes))
    for context in (a, b, c):
        store.put(context, None)
    assert store.get(a.id) == (None, "miss")  # a was the oldest: dropped for c
    assert store.counts.evictions == 1 and len(store) == 2 and store.held_bytes == b.nbytes + c.nbytes
    assert store.get(b.id)[1] == "memory"  # b is now the most recently used
    store.put(d, None)
    assert store.holds(b.id) and store.holds(d.id) and not store.holds(c.id)
    assert store.counts.evictions == 2 and store.held_bytes <= store.max_bytes


def test_a_context_larger_than_the_bound_is_not_held() -> None:
    big = stored(0, n=64)
    store = ContextStore(MODEL, max_bytes=big.nbytes - 1)
    store.put(big, None)
    assert len(store) == 0 and store.counts.too_large == 1 and store.held_bytes == 0


def test_a_held_context_counts_the_room_its_forks_decode_in() -> None:
    ids = torch.randint(5, 400, (1, 24), generator=torch.Generator().manual_seed(9))
    cache, *_ = prefill(MODEL, ids, torch.ones_like(ids))
    bare = cache_bytes(cache)
    context = StoredContext(context_id("fingerprint", None, ids[0].tolist()), cache, {"tokens": 24}, bare)
    store = ContextStore(MODEL, 10**9)
    store.put(context, None)
    assert store.held_bytes == context.nbytes == cache_bytes(cache) > bare  # the room, made when held, counts
    cache.fork([0])  # a fork lends it: nothing copied, nothing more held
    assert cache_bytes(cache) == store.held_bytes


def test_disk_round_trip_and_documents(tmp_path: Path) -> None:
    context = stored(1, info={"tokens": 24, "document": "the text", "kind": "document", "compression": NONE})
    ContextStore(MODEL, 10**9, tmp_path).put(context, None)
    assert (tmp_path / f"{context.id}.safetensors").is_file()
    fresh = ContextStore(MODEL, 10**9, tmp_path)  # a restarted server
    assert fresh.document(context.id) == context.info  # read from the file's metadata
    loaded, where = fresh.get(context.id)
    assert where == "disk" and loaded is not None and loaded.nbytes == context.nbytes
    for mine, theirs in zip(loaded.cache.layers, context.cache.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert fresh.get(context.id)[1] == "memory"
    assert fresh.delete(context.id) and not (tmp_path / f"{context.id}.safetensors").exists()
    assert fresh.get(context.id) == (None, "miss") and fresh.document(context.id) is None
    assert not fresh.delete(context.id)


def test_a_file_of_another_model_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    context = stored(2)
    ContextStore(MODEL, 10**9, tmp_path).put(context, None)
    other = ContextStore(tiny_model("llama", seed=1), 10**9, tmp_path)
    assert other.get(context.id) == (None, "miss")
    assert "not by this model" in caplog.text


@pytest.mark.parametrize("cid", ["../escape", "ctx-../../x", "/etc/passwd", "ctx-" + "g" * 32])
def test_ids_that_are_not_context_ids_name_no_file(tmp_path: Path, cid: str) -> None:
    store = ContextStore(MODEL, 10**9, tmp_path)
    assert store.path(cid) is None
    assert store.get(cid) == (None, "miss") and store.info(cid) is None and not store.delete(cid)


def test_ids_depend_on_model_method_and_tokens() -> None:
    ids = [5, 6, 7]
    base = context_id("f", None, ids)
    assert base == context_id("f", None, list(ids))
    assert len({base, context_id("g", None, ids), context_id("f", None, [5, 6, 8]), context_id("f", "x", ids)}) == 4


@pytest.mark.parametrize(
    "info",
    [{"tokens": 0, "compression": NONE}, {"tokens": 3}, {"tokens": 3, "compression": {**NONE, "ratio": "half"}},
     {"tokens": 3, "compression": NONE, "document": 5}, {"tokens": 3, "compression": {**NONE, "extra": 1}}],
)  # fmt: skip
def test_a_file_whose_info_is_not_the_servers_is_skipped(tmp_path: Path, info: dict) -> None:
    context = stored(3, info=info)
    ContextStore(MODEL, 10**9, tmp_path).put(context, None)  # written as given (the server only writes good info)
    fresh = ContextStore(MODEL, 10**9, tmp_path)
    assert fresh.get(context.id) == (None, "miss") and fresh.info(context.id) is None
