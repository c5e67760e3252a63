"""Merge: the scorer's kept set, each evicted value averaged into the kept token with the most similar key; checked
against a slow loop over tokens, through a real prefill (rectangular and ragged layouts), and its options."""

from __future__ import annotations

import math

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.adakv import AdaKV
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.merge import Merge
from kvsqueeze.methods.snapkv import SnapKV
from tests.helpers import ids_of, prefill
from tests.unit.methods.helpers import fake_ctx


def reference(keys, values, positions, kept: list[list[list[int]]], min_similarity: float = -1.0):
    """Per (row, head): every evicted real slot goes to the kept slot of highest cosine (first on ties) and each kept
    value becomes the mean of itself and what it received. Returns {(b, h, slot): value}."""
    out = {}
    b_n, h_n, t_n, _ = keys.shape
    for b in range(b_n):
        for h in range(h_n):
            kept_slots = kept[b][h]
            received: dict[int, list[torch.Tensor]] = {i: [values[b, h, i].double()] for i in kept_slots}
            for j in range(t_n):
                if positions[b, h, j] < 0 or j in kept_slots:
                    continue
                best, best_sim = None, -math.inf
                for i in kept_slots:
                    ki, kj = keys[b, h, i].double(), keys[b, h, j].double()
                    sim = float(ki @ kj / (ki.norm() * kj.norm()))
                    if sim > best_sim + 1e-9:
                        best, best_sim = i, sim
                if best is not None and best_sim >= min_similarity:
                    received[best].append(values[b, h, j].double())
            for i, vs in received.items():
                out[(b, h, i)] = sum(vs) / len(vs)
    return out


def check(method, ctx, plan):
    indices, counts = plan
    merged = method.merge_values(ctx, indices, counts)
    kept = [[indices[b, h, : counts[b, h]].tolist() for h in range(indices.shape[1])] for b in range(indices.shape[0])]
    expected = reference(ctx.keys, ctx.values, ctx.positions, kept, method.min_similarity)
    assert len(expected) == int(counts.sum())
    for (b, h, slot), value in expected.items():
        rank = kept[b][h].index(slot)
        torch.testing.assert_close(merged[b, h, rank].double(), value, rtol=1e-5, atol=1e-6)
    return merged


@pytest.mark.parametrize("min_similarity", [-1.0, 0.2])
def test_merge_matches_a_slow_reference(min_similarity):
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 17, 6, generator=gen), torch.randn(2, 3, 17, 5, generator=gen)
    positions = torch.arange(17, dtype=torch.int32).expand(2, 3, 17).clone()
    positions[1, :, :4] = -1  # a left-padded row
    ctx = fake_ctx(keys, values, positions)
    method = Merge(ratio=0.6, min_similarity=min_similarity)
    plan = method.plan(ctx)
    assert plan is not None
    assert torch.equal(plan[0], KNorm(ratio=0.6).plan(ctx)[0])  # exactly the scorer's kept set
    merged = check(method, ctx, plan)
    kept_values = values.gather(2, plan[0][..., None].expand(-1, -1, -1, 5))
    assert not torch.allclose(merged, kept_values)  # something was merged


def test_merge_with_uneven_counts_per_head():
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 12, 4, generator=gen), torch.randn(1, 2, 12, 4, generator=gen)
    ctx = fake_ctx(keys, values)
    indices = torch.tensor([[[0, 3, 5, 9], [2, 7, 0, 0]]])
    counts = torch.tensor([[4, 2]])
    check(Merge(ratio=0.5), ctx, (indices, counts))


def test_merged_values_reach_the_cache_and_keys_do_not_change(make_model):
    model = make_model("llama")
    ids = ids_of(40)
    plain = prefill(model, ids, KNorm(ratio=0.5))
    merged = prefill(model, ids, Merge(ratio=0.5))
    for a, b in zip(plain.full_layers(), merged.full_layers(), strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys)
        assert not torch.equal(a.values, b.values)
    with torch.no_grad(), kvs.attach(model):  # the merged cache answers normally
        logits = model(ids_of(5, seed=3), past_key_values=merged).logits
    assert torch.isfinite(logits).all()


def test_merge_over_a_ragged_layer(make_model):
    """A head-adaptive scorer keeps different counts per head: the merged values are packed in the ragged layout."""
    model = make_model("llama")
    ids = ids_of(48)
    plain = prefill(model, ids, AdaKV(ratio=0.5, scorer=SnapKV(window=8)))
    merged = prefill(model, ids, Merge(ratio=0.5, scorer=AdaKV(scorer=SnapKV(window=8))))
    layer = merged.full_layers()[1]
    assert layer.is_ragged
    assert torch.equal(layer.positions, plain.full_layers()[1].positions)
    assert layer.values.shape == plain.full_layers()[1].values.shape
    assert not torch.equal(layer.values, plain.full_layers()[1].values)


def test_ratio_zero_keeps_values(make_model):
    model = make_model("llama")
    ids = ids_of(30)
    a, b = prefill(model, ids, None), prefill(model, ids, Merge(ratio=0.0))
    assert all(torch.equal(x.values, y.values) for x, y in zip(a.full_layers(), b.full_layers(), strict=True))


@pytest.mark.parametrize(("options", "match"), [
    ({"min_similarity": 1.5}, r"min_similarity must be a number in \[-1, 1\].*1\.5"),
    ({"min_similarity": "high"}, "min_similarity.*'high'"),
    ({"scorer": "nonsense"}, "nonsense"),
])  # fmt: skip
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        Merge(ratio=0.5, **options)


def test_scorer_by_name_may_have_per_layer_budgets():
    method = Merge(ratio=0.5, scorer="adakv")  # Ada-KV pools per layer: the budget wrappers would refuse it
    assert method.scorer.name == "adakv" and method.scorer.ratio == 0.5
    with pytest.raises(ValueError, match=r"scorer must be a scoring method .*got 3"):
        Merge(ratio=0.5, scorer=3)  # type: ignore[arg-type]
