"""`prefix_attention.attend`: attention split into each row's shared prefix and its own slots, recombined, equals
softmax attention over the row's whole set of slots (checked against the plain formula on random tensors), whether a
prefix is read through its view or head by head (ragged), in chunks or at once, in float32 or bfloat16."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze import prefix_attention
from kvsqueeze.prefix_attention import attend
from kvsqueeze.storage import DenseStorage
from kvsqueeze.storage.shared import PrefixRead, halves, prefix_read


def plain(query, keys, values, visible, scale, softcap=None):
    """Softmax attention of query (1, H_q, q, D) over keys (1, H_kv, T, D), visible (H_kv or 1, q, T) bool; float64."""
    groups = query.shape[1] // keys.shape[1]
    k, v = keys.double().repeat_interleave(groups, 1), values.double().repeat_interleave(groups, 1)
    logits = (query.double() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    mask = visible.repeat_interleave(groups, 0) if visible.shape[0] > 1 else visible
    logits = logits.masked_fill(~mask[None], float("-inf"))
    return torch.softmax(logits, -1) @ v


def reference(query, views, owner, keys, values, visible, scale, softcap=None):
    """Each row's attention over its prefix's filled slots and its own visible slots, one row at a time."""
    rows = []
    for b in range(query.shape[0]):
        pk, pv, ppos = views[int(owner[b])]
        kv_heads, q, s = keys.shape[1], query.shape[2], keys.shape[2]
        all_keys = torch.cat([pk[0], keys[b]], dim=1)[None]
        all_values = torch.cat([pv[0], values[b]], dim=1)[None]
        own = torch.ones(1, q, s, dtype=torch.bool) if visible is None else visible[b]
        seen = torch.cat([(ppos[0] >= 0)[:, None, :].expand(kv_heads, q, -1), own.expand(kv_heads, q, s)], -1)
        rows.append(plain(query[b : b + 1], all_keys, all_values, seen, scale, softcap))
    return torch.cat(rows)


def random_case(g, rows, prefixes, kv_heads, groups, q, own, d=8, full=False, lengths=None):
    """lengths: each prefix's slots (random, 1 to 8, when None); head 0 of a prefix that is not full keeps one fewer."""
    owner = torch.randint(0, prefixes, (rows,), generator=g)
    views = []
    for j in range(prefixes):
        length = int(torch.randint(1, 9, (1,), generator=g)) if lengths is None else lengths[j]
        pos = torch.arange(length).expand(1, kv_heads, length).clone().to(torch.int32)
        if length > 1 and not full:  # a ragged prefix's view: some heads keep fewer (empty slots at the end)
            pos[:, 0, -1] = -1
        k, v = torch.randn(1, kv_heads, length, d, generator=g), torch.randn(1, kv_heads, length, d, generator=g)
        views.append((k * (pos >= 0)[..., None], v * (pos >= 0)[..., None], pos))
    s = own + q
    query = torch.randn(rows, kv_heads * groups, q, d, generator=g)
    keys, values = torch.randn(rows, kv_heads, s, d, generator=g), torch.randn(rows, kv_heads, s, d, generator=g)
    visible = torch.rand(rows, 1, q, s, generator=g) < 0.7
    visible[..., own:] |= torch.eye(q, dtype=torch.bool)  # every query sees itself
    return owner, views, query, keys, values, visible


def reads_of(views, owner, ragged: bool):
    """Each prefix as a storage would hand it over: through its view, or (ragged) by its heads' segments."""
    out = []
    for j, (k, v, pos) in enumerate(views):
        rows = (owner == j).nonzero().flatten()
        if not rows.numel():
            continue
        storage = DenseStorage(k, v, pos)
        if ragged:
            every = torch.arange(pos.shape[-1]).expand(1, pos.shape[1], -1)
            storage = storage.prune(every, storage.kept(), ragged=True)  # type: ignore[assignment]
        out.append(prefix_read(storage, None if len(views) == 1 else rows))
    return out


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
    ragged=st.booleans(),
    full=st.booleans(),
)
def test_equals_attention_over_prefix_and_own_slots(
    rows, prefixes, kv_heads, groups, q, own, seed, softcap, ragged, full
):
    """Any prefixes (full ones go through the fused kernel unless soft-capped), their own slots, masks, soft-caps."""
    g = torch.Generator().manual_seed(seed)
    owner, views, query, keys, values, visible = random_case(g, rows, prefixes, kv_heads, groups, q, own, full=full)
    got = attend(query, reads_of(views, owner, ragged), keys, values, visible, 0.3, softcap)
    want = reference(query, views, owner, keys, values, visible, 0.3, softcap)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernel_gives_the_products_answer(monkeypatch, dtype):
    """Full prefixes through the fused kernel (the prefix and the rows' own slots, masked, each by one call, joined by
    their log-sum-exps) against the same prefixes through the separate products and softmax: the same attention, up
    to float32 rounding (bfloat16: the kernel's outputs are rounded to it before joining)."""
    g = torch.Generator().manual_seed(3)
    owner, views, query, keys, values, visible = random_case(g, 3, 2, 2, 3, 2, 3, d=16, full=True)
    views = [tuple(t.to(dtype) if t.is_floating_point() else t for t in view) for view in views]
    query, keys, values = query.to(dtype), keys.to(dtype), values.to(dtype)
    reads = reads_of(views, owner, False)
    kernel, calls = prefix_attention.FLASH_WITH_LSE, []
    assert kernel is not None and all(read.full for read in reads)
    monkeypatch.setattr(prefix_attention, "FLASH_WITH_LSE", lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    fused = attend(query, reads, keys, values, visible, 0.25)
    assert len(calls) == 2 * len(reads)  # each prefix and its rows' own slots went through the kernel
    monkeypatch.setattr(prefix_attention, "fused_ok", lambda queries, keys, values: False)
    products = attend(query, reads, keys, values, visible, 0.25)
    assert len(calls) == 2 * len(reads)  # and now none did
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused.float(), products.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_ragged_prefix_goes_through_the_kernel_in_halves(monkeypatch, dtype):
    """Ragged prefixes (heads of odd and even lengths) through the fused kernel, each head's two halves in one call,
    against the same prefixes through the separate products and softmax: the same attention."""
    g = torch.Generator().manual_seed(4)
    owner, views, query, keys, values, visible = random_case(g, 3, 2, 2, 3, 2, 3, d=16, lengths=[8, 5])
    owner = torch.tensor([0, 1, 1])  # one row reads the first prefix, two rows the second
    views = [tuple(t.to(dtype) if t.is_floating_point() else t for t in view) for view in views]
    query, keys, values = query.to(dtype), keys.to(dtype), values.to(dtype)
    reads = reads_of(views, owner, True)
    assert [[k.shape[0] for k, _ in read.heads or ()] for read in reads] == [[7, 8], [4, 5]]
    assert all(read.halves is not None for read in reads)
    kernel, calls = prefix_attention.FLASH_WITH_LSE, []
    assert kernel is not None
    monkeypatch.setattr(prefix_attention, "FLASH_WITH_LSE", lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    fused = attend(query, reads, keys, values, visible, 0.25)
    assert len(calls) == 2 * (2 + 1)  # per prefix: one call per head (its two halves) and one for the own slots
    monkeypatch.setattr(prefix_attention, "fused_ok", lambda queries, keys, values: False)
    products = attend(query, reads, keys, values, visible, 0.25)
    assert len(calls) == 6
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fused.float(), products.float(), rtol=tolerance, atol=tolerance)
    want = reference(query.double(), [tuple(t.double() if t.is_floating_point() else t for t in v) for v in views],
                     owner, keys.double(), values.double(), visible, 0.25)  # fmt: skip
    torch.testing.assert_close(fused.double(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("ragged", [False, True])
def test_keys_whose_channels_are_not_adjacent_keep_the_products(ragged):
    """Keys stored channel-major (a legal strided tensor): the fused kernel would read their rows wrongly, so they go
    through the products, which answer as the plain formula does."""
    g = torch.Generator().manual_seed(8)
    owner, views, query, keys, values, visible = random_case(g, 2, 1, 2, 3, 2, 2, d=8, full=True, lengths=[5])
    pk, pv, pos = views[0]
    views = [(pk.transpose(-1, -2).contiguous().transpose(-1, -2), pv, pos)]  # the same values, column-major
    reads = reads_of(views, owner, ragged)
    if ragged:  # pruning copies; put the channel-major keys back in
        read = reads[0]
        assert read.heads is not None
        flat = torch.cat([k for k, _ in read.heads]).T.contiguous().T
        segments = torch.split(flat, [k.shape[0] for k, _ in read.heads])
        heads = tuple((k, v) for k, (_, v) in zip(segments, read.heads, strict=True))
        reads = [read._replace(heads=heads, halves=tuple(halves(k, v) for k, v in heads))]
        probe = reads[0].halves[0].keys  # type: ignore[index]
    else:
        probe = reads[0].view[0]  # type: ignore[index]
    assert probe.stride(-1) != 1 and not prefix_attention.fused_ok(query, probe, probe)
    got = attend(query, reads, keys, values, visible, 0.5)
    torch.testing.assert_close(got.double(), reference(query, views, owner, keys, values, visible, 0.5), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_keys_narrower_than_values():
    """Thin keys (ThinK: fewer key channels than value channels) over a full prefix, which the fused kernel cannot take
    (it wants one head size): the separate products answer, as the plain formula does."""
    g = torch.Generator().manual_seed(5)
    pos = torch.arange(6, dtype=torch.int32).expand(1, 2, 6)
    view = (torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 8, generator=g), pos)
    query = torch.randn(1, 4, 2, 4, generator=g)
    keys, values = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    visible = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    assert not prefix_attention.fused_ok(query, view[0], view[1])
    got = attend(query, [prefix_read(DenseStorage(*view), None)], keys, values, visible, 0.5)
    want = reference(query, [view], torch.zeros(1, dtype=torch.long), keys, values, visible, 0.5)
    assert got.shape == (1, 4, 2, 8)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_no_mask_means_every_own_slot_is_seen():
    g = torch.Generator().manual_seed(0)
    owner, views, query, keys, values, _ = random_case(g, 2, 1, 2, 2, 1, 2)
    got = attend(query, reads_of(views, owner, False), keys, values, None, 0.5)
    torch.testing.assert_close(
        got.double(), reference(query, views, owner, keys, values, None, 0.5), rtol=1e-5, atol=1e-5
    )


def test_queries_taken_in_chunks_give_the_same_answer(monkeypatch):
    g = torch.Generator().manual_seed(1)
    owner, views, query, keys, values, visible = random_case(g, 3, 2, 2, 3, 4, 2)
    at_once = attend(query, reads_of(views, owner, False), keys, values, visible, 0.3)
    monkeypatch.setattr(prefix_attention, "LOGITS_BUDGET", 1)  # one query per chunk
    for ragged in (False, True):
        chunked = attend(query, reads_of(views, owner, ragged), keys, values, visible, 0.3)
        torch.testing.assert_close(chunked, at_once, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ragged", [False, True])
def test_the_fused_kernel_in_chunks_gives_the_same_answer(monkeypatch, ragged):
    """Full prefixes or ragged ones in halves (the fused kernel) under a mask: queries taken in chunks that bound the
    own slots' mask, each chunk its own kernel calls, give the answer taken at once."""
    g = torch.Generator().manual_seed(4)
    owner, views, query, keys, values, visible = random_case(g, 3, 2, 2, 3, 4, 2, full=not ragged, lengths=[3, 6])
    reads = reads_of(views, owner, ragged)
    assert all((read.halves is not None) == ragged for read in reads)
    at_once = attend(query, reads, keys, values, visible, 0.3)
    kernel, calls = prefix_attention.FLASH_WITH_LSE, []
    assert kernel is not None
    monkeypatch.setattr(prefix_attention, "FLASH_WITH_LSE", lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    monkeypatch.setattr(prefix_attention, "LOGITS_BUDGET", 1)  # one query per chunk
    chunked = attend(query, reads, keys, values, visible, 0.3)
    per_chunk = 2 + 1 if ragged else 2  # the prefix (a ragged one: a call per KV head) and the own slots
    assert len(calls) == per_chunk * 3 * 4 * len(reads)  # chunks of one query (3 query heads per KV head, q=4)
    torch.testing.assert_close(chunked, at_once, rtol=1e-6, atol=1e-6)
    want = reference(query, views, owner, keys, values, visible, 0.3)
    torch.testing.assert_close(chunked.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("full", "ragged"), [(True, False), (False, False), (False, True)])
def test_a_query_that_sees_no_own_slot_reads_its_prefix_alone(full, ragged):
    """A query whose own slots are all masked (not one `step_mask` makes, but `attend` accepts it): its prefix's
    attention alone, through the fused kernel (which reports such a row's log-sum-exp as 0), a ragged prefix's in
    halves, as through the products."""
    g = torch.Generator().manual_seed(6)
    owner, views, query, keys, values, visible = random_case(g, 2, 1, 2, 3, 3, 2, full=full, lengths=[5])
    visible[0, :, 1] = False  # row 0's second query sees none of its own slots
    reads = reads_of(views, owner, ragged)
    assert (reads[0].halves is not None) == ragged  # heads of 4 and 5 slots
    got = attend(query, reads, keys, values, visible, 0.4)
    want = reference(query, views, owner, keys, values, visible, 0.4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_a_prefix_head_with_nothing_kept_weighs_nothing():
    """A head of a prefix that keeps no slot, beside own logits far below 0: the answer is the own values (the empty
    prefix must weigh nothing, and the own slots' tiny exponentials must not vanish)."""
    view = (torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.full((1, 1, 1), -1, dtype=torch.int32))
    query = torch.full((1, 1, 1, 4), 10.0)
    keys, values = torch.full((1, 1, 1, 4), -10.0), torch.ones(1, 1, 1, 4)  # logit -400 x 0.5
    for read in (
        PrefixRead(view, None, None, False),
        PrefixRead(None, ((torch.zeros(0, 4), torch.zeros(0, 4)),), None, True),
    ):
        out = attend(query, [read], keys, values, None, 0.5)
        torch.testing.assert_close(out, torch.ones(1, 1, 1, 4))


def test_bfloat16_is_as_close_to_exact_as_sdpa():
    """Logits in float32 whatever the dtype: in bfloat16 the error against the exact answer stays at SDPA's."""
    g = torch.Generator().manual_seed(2)
    d, length = 64, 2000
    k, v = torch.randn(1, 2, length, d, generator=g), torch.randn(1, 2, length, d, generator=g)
    query = torch.randn(1, 4, 1, d, generator=g)
    own_k, own_v = torch.randn(1, 2, 1, d, generator=g), torch.randn(1, 2, 1, d, generator=g)
    exact = plain(
        query,
        torch.cat([k, own_k], 2),
        torch.cat([v, own_v], 2),
        torch.ones(1, 1, length + 1, dtype=torch.bool),
        d**-0.5,
    )
    bf = [t.to(torch.bfloat16) for t in (query, k, v, own_k, own_v)]
    view = (bf[1], bf[2], torch.arange(length).expand(1, 2, length))
    got = attend(bf[0], [PrefixRead(view, None, None, True)], bf[3], bf[4], None, d**-0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        bf[0], torch.cat([bf[1], bf[3]], 2), torch.cat([bf[2], bf[4]], 2), enable_gqa=True
    )
    assert got.dtype == torch.bfloat16
    error = float((got.double() - exact).norm() / exact.norm())
    assert error <= 1.5 * float((sdpa.double() - exact).norm() / exact.norm()) + 1e-3


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_float16_large_logits_stay_finite(softcap):
    view = (torch.full((1, 1, 3, 8), 200.0, dtype=torch.float16), torch.ones(1, 1, 3, 8, dtype=torch.float16),
            torch.arange(3).expand(1, 1, 3))  # fmt: skip
    query = torch.full((1, 1, 1, 8), 200.0, dtype=torch.float16)  # q.k = 320,000 > float16's largest
    own = torch.full((1, 1, 1, 8), 200.0, dtype=torch.float16), torch.ones(1, 1, 1, 8, dtype=torch.float16)
    out = attend(query, [PrefixRead(view, None, None, True)], *own, None, 8**-0.5, softcap)
    assert bool(torch.isfinite(out).all()) and torch.allclose(out.float(), torch.ones(1, 1, 1, 8))
