"""`ModelAdapter.pre_rope_keys_values` + RoPE (through `AttentionCall.keys_values`) give exactly the keys and values
the model caches, for every supported family (k_norm, fused qkv, partial rotary)."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.calibration import collect_attention
from tests.helpers import ids_of, prefill
from tests.tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_values_match_the_cache(family, make_model):
    model = make_model(family)
    ids = ids_of(23)
    cache = prefill(model, ids)
    got = collect_attention(model, ids[0], lambda call: call.keys_values(), chunk_size=23)
    for idx in kvs.get_adapter(model).full_layers:
        keys, values = got[idx][0]
        torch.testing.assert_close(keys, cache.layer(idx).keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, cache.layer(idx).values, atol=1e-5, rtol=1e-5)
