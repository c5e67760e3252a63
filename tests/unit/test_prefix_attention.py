"""`prefix_attention.attend`: attention split into each row's shared prefix and its own slots, recombined, equals
softmax attention over the row's whole set of slots (checked against the plain formula on random tensors)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.prefix_attention import attend


def plain(query, keys, values, visible, scale, softcap=None):
    """Softmax attention of query (1, H_q, q, D) over keys (1, H_kv, T, D), visible (H_kv or 1, q, T) bool."""
    groups = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    logits = (query @ k.transpose(-1, -2)).double() * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    mask = visible.repeat_interleave(groups, 0) if visible.shape[0] > 1 else visible
    logits = logits.masked_fill(~mask[None], float("-inf"))
    return (torch.softmax(logits, -1) @ v.double()).float()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    prefixes=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.sampled_from([1, 3]),
    q=st.integers(1, 4),
    own=st.integers(0, 3),
    seed=st.integers(0, 10_000),
    softcap=st.sampled_from([None, 5.0]),
)
def test_equals_attention_over_prefix_and_own_slots(rows, prefixes, kv_heads, groups, q, own, seed, softcap):
    g = torch.Generator().manual_seed(seed)
    d = 8
    owner = torch.randint(0, prefixes, (rows,), generator=g)
    views = []
    for _ in range(prefixes):
        length = int(torch.randint(1, 9, (1,), generator=g))
        pos = torch.arange(length).expand(1, kv_heads, length).clone().to(torch.int32)
        if length > 1:  # a ragged prefix's view: some heads keep fewer (empty slots at the end)
            pos[:, 0, -1] = -1
        k, v = torch.randn(1, kv_heads, length, d, generator=g), torch.randn(1, kv_heads, length, d, generator=g)
        views.append((k, v, pos))
    s = own + q
    query = torch.randn(rows, kv_heads * groups, q, d, generator=g)
    keys, values = torch.randn(rows, kv_heads, s, d, generator=g), torch.randn(rows, kv_heads, s, d, generator=g)
    visible = torch.rand(rows, 1, q, s, generator=g) < 0.7
    visible[..., own:] |= torch.eye(q, dtype=torch.bool)  # every query sees itself
    prefix_rows = [(v, (owner == j).nonzero().flatten()) for j, v in enumerate(views)]
    got = attend(query, [p for p in prefix_rows if p[1].numel()], keys, values, visible, 0.3, softcap)
    for b in range(rows):
        pk, pv, ppos = views[int(owner[b])]
        all_keys = torch.cat([pk[0], keys[b]], dim=1)[None]
        all_values = torch.cat([pv[0], values[b]], dim=1)[None]
        seen = torch.cat([(ppos[0] >= 0)[:, None, :].expand(kv_heads, q, -1), visible[b].expand(kv_heads, q, s)], -1)
        want = plain(query[b : b + 1], all_keys, all_values, seen, 0.3, softcap)
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)


def test_no_mask_means_every_own_slot_is_seen():
    g = torch.Generator().manual_seed(0)
    view = (torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g), torch.arange(5).expand(1, 2, 5))
    query, keys, values = torch.randn(2, 4, 1, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    got = attend(query, [(view, torch.tensor([0, 1]))], keys, values, None, 0.5)
    for b in range(2):
        all_k = torch.cat([view[0][0], keys[b]], 1)[None]
        all_v = torch.cat([view[1][0], values[b]], 1)[None]
        want = plain(query[b : b + 1], all_k, all_v, torch.ones(1, 1, 8, dtype=torch.bool), 0.5)
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_inputs_come_back_in_their_dtype(dtype):
    view = (torch.randn(1, 1, 6, 4, dtype=dtype), torch.randn(1, 1, 6, 4, dtype=dtype), torch.arange(6).expand(1, 1, 6))
    own = torch.randn(1, 1, 1, 4, dtype=dtype), torch.randn(1, 1, 1, 4, dtype=dtype)
    out = attend(torch.randn(1, 2, 1, 4, dtype=dtype), [(view, torch.tensor([0]))], *own, None, 0.5)
    assert out.dtype == dtype and out.shape == (1, 2, 1, 4) and bool(torch.isfinite(out).all())
