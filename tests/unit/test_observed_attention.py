"""Observed attention: attention received from the context's queries, normalised by how many queries see each key,
against the model's own eager attention weights summed by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.observed_attention import ObservedAttention, seers
from kvsqueeze.recording import compress_recording, record
from tests.helpers import ids_of, prefill, record_scores


def _by_hand(attn: torch.Tensor, rows: list[int], group: int = 2) -> torch.Tensor:
    """attn (H_q, n, T) eager weights -> (H, T): sum over the query rows `rows`, divided per key i by how many of
    those rows are at or after i, averaged over each GQA group."""
    hq, _, t = attn.shape
    total = attn[:, rows].sum(dim=1)  # (H_q, T)
    count = torch.tensor([sum(1 for j in rows if j >= i) for i in range(t)], dtype=total.dtype)
    return (total / count.clamp(min=1)).view(hq // group, group, t).mean(dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3", "mistral", "gemma2"])
@pytest.mark.parametrize("block_size", [256, 7])
@pytest.mark.parametrize("attn", ["eager", "default"])  # sdpa where the family has it: the forward sums it
def test_score_matches_the_models_eager_attention(family, block_size, attn, make_model):
    model = make_model(family) if attn == "default" else make_model(family, attn_implementation="eager")
    n = 45
    ids = ids_of(n, seed=4)
    method = ObservedAttention(ratio=0.5, block_size=block_size)
    seen = record_scores(method)
    prefill(model, ids, method)
    with torch.no_grad():
        attentions = make_model(family, attn_implementation="eager")(ids, output_attentions=True).attentions
    assert seen, "observed attention scored nothing"
    for idx, scores in seen.items():
        expected = _by_hand(attentions[idx][0], list(range(n)))
        torch.testing.assert_close(scores[0], expected, atol=1e-6, rtol=1e-4)


def test_query_stride_uses_every_kth_query_from_the_last(make_model):
    model = make_model("llama", attn_implementation="eager")
    n = 40
    ids = ids_of(n, seed=8)
    method = ObservedAttention(ratio=0.5, block_size=5, query_stride=3)
    seen = record_scores(method)
    prefill(model, ids, method)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    rows = list(range(n - 1, -1, -3))  # 39, 36, ..., 0
    for idx, scores in seen.items():
        torch.testing.assert_close(scores[0], _by_hand(attentions[idx][0], rows), atol=1e-6, rtol=1e-4)


def test_score_does_not_depend_on_left_padding(make_model):
    model = make_model("qwen2")
    row = ids_of(31, seed=6)[0]
    ids = torch.cat([torch.zeros(19, dtype=torch.long), row])[None].repeat(2, 1)
    ids[0] = ids_of(50, seed=7)[0]
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :19] = 0
    batched, alone = ObservedAttention(ratio=0.5, block_size=16), ObservedAttention(ratio=0.5)
    seen_batched, seen_alone = record_scores(batched), record_scores(alone)
    prefill(model, ids, batched, mask)
    prefill(model, row[None], alone)
    for idx, scores in seen_alone.items():
        torch.testing.assert_close(seen_batched[idx][1, :, 19:], scores[0], atol=1e-6, rtol=1e-4)
        assert float(seen_batched[idx][1, :, :19].abs().max()) == 0.0


def test_seers_counts_the_queries_at_or_after_each_slot():
    positions = torch.tensor([[[0, 1, 2, 5, 4]]])  # (B, H, T)
    qpos = torch.tensor([[-1, 2, 5, 3]])  # a pad query and queries at 2, 5, 3
    assert seers(positions, qpos).tolist() == [[[3, 3, 3, 1, 1]]]


def test_validates_its_options():
    with pytest.raises(ValueError, match="block_size"):
        ObservedAttention(block_size=0)
    with pytest.raises(ValueError, match="query_stride"):
        ObservedAttention(query_stride=0)


@dataclass
class _Spy(ObservedAttention):
    """Observed attention that keeps what each layer's context held as `received`."""

    seen: dict = field(default_factory=dict)

    def score(self, ctx):
        self.seen[ctx.layer_idx] = ctx.received
        return super().score(ctx)


def test_the_forward_sums_received_attention_on_sdpa_and_the_score_uses_it(make_model):
    model = make_model("llama")  # sdpa
    ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids_of(40, seed=6)], dim=1)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left pads: queries that add nothing
    spy = _Spy(ratio=0.5)
    prefill(model, ids, spy, mask)
    assert spy.seen and all(r is not None for r in spy.seen.values())
    with torch.no_grad():
        eager = make_model("llama", attn_implementation="eager")
        attentions = eager(ids, attention_mask=mask, output_attentions=True).attentions
    for idx, received in spy.seen.items():
        weights = attentions[idx][0, :, 5:]  # (H_q, real queries, T)
        by_hand = weights.sum(dim=1).view(received.shape[1], -1, weights.shape[-1]).sum(dim=1)  # (H, T)
        torch.testing.assert_close(received[0], by_hand, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_forwards_sums_keep_the_slots_a_recomputation_keeps(family, make_model):
    """In the forward (sums from its attention) and over a recording (recomputed after it), the same slots are kept;
    the caches' numbers differ only by float32 rounding (the forward ran `received.attend` instead of SDPA)."""
    model = make_model(family)
    ids = torch.randint(5, 400, (2, 50), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    method = ObservedAttention(ratio=0.5)
    direct = prefill(model, ids, method, mask)
    full = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, full) as rec:
        model(ids, attention_mask=mask, past_key_values=full)
    copy, _ = compress_recording(rec, method)
    for a, b in zip(direct.kv_layers(), copy.kv_layers(), strict=True):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_with_a_query_stride_the_forward_does_not_sum_received_attention(make_model):
    spy = _Spy(ratio=0.5, query_stride=8)  # its score recomputes the strided queries' attention: sums would be waste
    prefill(make_model("llama"), ids_of(40, seed=6), spy)
    assert spy.seen and all(r is None for r in spy.seen.values())
    assert _Spy(ratio=0.5).uses("received_attention") and not spy.uses("received_attention")


def test_at_ratio_zero_nothing_is_summed_and_the_forward_stays_plain_attention():
    assert not ObservedAttention(ratio=0.0).uses("received_attention")
    assert ObservedAttention(ratio=0.0).uses("queries")
