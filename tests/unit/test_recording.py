"""Compressing a copy of a recorded prefill gives exactly what compressing inside the forward gives."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.recording import compress_recording, record
from tests.helpers import prefill


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", ["knorm", "snapkv", "pyramidkv", "streaming_llm"])
def test_recording_then_compress_equals_in_forward(make_model, family: str, name: str) -> None:
    model = make_model(family)
    ids = torch.randint(5, 400, (2, 50), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row
    options = {"window": 8} if name == "snapkv" else {}
    if name == "pyramidkv":
        options = {"scorer": kvs.get_method("snapkv", window=8)}
    method = kvs.get_method(name, ratio=0.5, **options)
    direct = prefill(model, ids, method, mask)
    full = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, full) as rec:
        model(ids, attention_mask=mask, past_key_values=full)
    before = kvs.cache_bytes(full)
    copy, log = compress_recording(rec, method)
    assert kvs.cache_bytes(full) == before  # the recording is untouched
    assert log.kv_bytes_after < log.kv_bytes_before
    for a, b in zip(direct.kv_layers(), copy.kv_layers(), strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    q = torch.randint(5, 400, (2, 4))
    with torch.no_grad(), kvs.attach(model):
        la = model(q, past_key_values=direct).logits
        lb = model(q, past_key_values=copy).logits
    assert torch.equal(la, lb)
