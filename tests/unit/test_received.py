"""`received.attend`: softmax attention that also sums what each slot received, against a float64 reference over
random shapes, grouped query heads, the three mask forms, pad queries, a softcap and blocks of one, two or all
queries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze import received

DEFAULT_BUDGET = received.LOGITS_BUDGET  # read once: the module-scoped patch below outlives an example


def _reference(query, key, value, visible, scale, real, softcap):
    """float64: (output (B, H_q, q, Dv), received (B, H_kv, T)) with visible (B, H_kv, q, T) bool."""
    b, hq = query.shape[:2]
    hkv = key.shape[1]
    g = hq // hkv
    k = key.double().repeat_interleave(g, dim=1)
    v = value.double().repeat_interleave(g, dim=1)
    logits = query.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~visible.repeat_interleave(g, dim=1), float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # (B, H_q, q, T)
    summed = (weights * real[:, None, :, None].double()).sum(dim=2)  # (B, H_q, T)
    return weights @ v, summed.view(b, hkv, g, -1).sum(dim=2)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    g=st.sampled_from([1, 3]),
    q=st.integers(1, 9),
    past=st.integers(0, 7),
    form=st.sampled_from(["causal", "none", "bool"]),
    pads=st.integers(0, 3),
    softcap=st.sampled_from([None, 5.0]),
    blocks=st.sampled_from(["all", "one", "two"]),
    seed=st.integers(0, 2**16),
)
def test_attend_equals_softmax_attention_and_its_column_sums(
    b, hkv, g, q, past, form, pads, softcap, blocks, seed, monkeypatch_module
):
    gen = torch.Generator().manual_seed(seed)
    d, dv = 8, 6
    t = q if form == "causal" else q + past
    query = torch.randn(b, hkv * g, q, d, generator=gen)
    key, value = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, dv, generator=gen)
    real = torch.ones(b, q, dtype=torch.bool)
    real[0, : min(pads, q - 1)] = False  # left pads in the first row (they attend to themselves only)
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    if form == "causal":
        mask: torch.Tensor | str | None = "causal"
        visible = causal.expand(b, hkv, q, q)
    elif form == "none":
        mask, visible = None, torch.ones(b, hkv, q, t, dtype=torch.bool)
    else:  # per KV head: some past slots hidden from one head
        hidden = torch.rand(b, hkv, 1, past, generator=gen) < 0.3
        own = causal & (real[:, None, :] | torch.eye(q, dtype=torch.bool))  # pads see themselves only
        visible = torch.cat([(~hidden).expand(b, hkv, q, past), own[:, None].expand(b, hkv, q, q)], dim=-1)
        visible[:, :, :, :past] &= real[:, None, :, None]
        mask = visible
    # every query in one block, one query per block, or two per block (a short last one when q is odd)
    budget = {"all": DEFAULT_BUDGET, "one": 1, "two": 2 * b * hkv * g * t}[blocks]
    monkeypatch_module.setattr(received, "LOGITS_BUDGET", budget)
    out, summed = received.attend(query, key, value, mask, d**-0.5, real, softcap)
    want_out, want_summed = _reference(query, key, value, visible, d**-0.5, real, softcap)
    assert out.dtype == query.dtype and summed.shape == (b, hkv, t)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed.double(), want_summed, atol=1e-5, rtol=1e-5)
    # every real query's weights sum to one, over the query heads of each KV head: g per real query
    torch.testing.assert_close(summed.sum(dim=-1), (real.sum(dim=1) * g).float()[:, None].expand(b, hkv))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_bfloat16_output_keeps_its_dtype_and_sums_stay_float32(monkeypatch):
    monkeypatch.setattr(received, "LOGITS_BUDGET", DEFAULT_BUDGET)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 5, 8, generator=gen).bfloat16()
    key, value = torch.randn(1, 2, 5, 8, generator=gen).bfloat16(), torch.randn(1, 2, 5, 8, generator=gen).bfloat16()
    out, summed = received.attend(query, key, value, "causal", 8**-0.5, torch.ones(1, 5, dtype=torch.bool))
    assert out.dtype == torch.bfloat16 and summed.dtype == torch.float32
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(1, 2, 5, 5)
    real = torch.ones(1, 5, dtype=torch.bool)
    want, _ = _reference(query.float(), key.float(), value.float(), causal, 8**-0.5, real, None)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


def test_logits_and_sums_stay_float32_whatever_the_default_dtype():
    gen = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 1, 4, 8, generator=gen)
    real = torch.ones(1, 4, dtype=torch.bool)
    want = received.attend(query, key, key, "causal", 8**-0.5, real)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = received.attend(query, key, key, "causal", 8**-0.5, real)
    finally:
        torch.set_default_dtype(before)
    assert got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_causal_mask_needs_as_many_queries_as_slots():
    query, key = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="'causal' mask needs as many queries as slots, got 2 and 3"):
        received.attend(query, key, key, "causal", 0.5, torch.ones(1, 2, dtype=torch.bool))
