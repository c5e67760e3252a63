"""CaM: the merge equals a slow token-by-token reference (sampled and expected), the attention it uses is the model's
own, draws depend only on (seed, layer, head, position), the cache stays within [target, target + every) over a long
generation (also under `generate`), the kept set is DecodingCompression's, and options are validated."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.cam import CaM, cam_merge, newest_attention, position_draws
from kvsqueeze.methods.decoding import DecodingCompression
from kvsqueeze.press import score_context
from kvsqueeze.recording import record
from tests.helpers import ids_of


def reference(values, valid, kept: list[list[list[int]]], attn, m: int, draws):
    """Per (row, head), token by token: an evicted slot j shares its value among the next m kept slots (fewer if fewer
    follow) when draw_j < min(1, A_j / mean A of those slots) (or by that probability when draws is None)."""
    out = {}
    b_n, h_n, t_n, _ = values.shape
    for b in range(b_n):
        for h in range(h_n):
            slots = kept[b][h]
            new = {i: values[b, h, i].double().clone() for i in slots}
            for j in range(t_n):
                if not valid[b, h, j] or j in slots:
                    continue
                group = [i for i in slots if i > j][:m]
                if not group:
                    continue
                mean = sum(float(attn[b, h, i]) for i in group) / len(group)
                p = min(1.0, float(attn[b, h, j]) / mean) if mean > 0 else 1.0
                weight = p if draws is None else float(float(draws[b, h, j]) < p)
                for i in group:
                    new[i] += weight * values[b, h, j].double() / len(group)
            out.update({(b, h, i): v for i, v in new.items()})
    return out


@pytest.mark.parametrize("sample", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_merge_matches_a_slow_reference(sample, m):
    gen = torch.Generator().manual_seed(0)
    b, h, t = 2, 2, 15
    values = torch.randn(b, h, t, 4, generator=gen)
    attn = torch.rand(b, h, t, generator=gen) ** 3
    valid = torch.ones(b, h, t, dtype=torch.bool)
    valid[1, :, :3] = False  # left padding
    indices = torch.tensor([[[1, 4, 5, 9, 13], [0, 2, 3, 10, 14]], [[3, 6, 7, 8, 12], [5, 6, 7, 13, 14]]])
    counts = torch.tensor([[5, 5], [5, 3]])  # the last row's second head keeps only 5, 6, 7
    draws = position_draws(7, 0, torch.arange(t).expand(b, h, t)) if sample else None
    merged = cam_merge(values, valid, indices, counts, attn, m, draws)
    kept = [[indices[i, j, : counts[i, j]].tolist() for j in range(h)] for i in range(b)]
    expected = reference(values, valid, kept, attn, m, draws)
    for (i, j, slot), value in expected.items():
        torch.testing.assert_close(merged[i, j, kept[i][j].index(slot)].double(), value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged, values.gather(2, indices[..., None].expand(-1, -1, -1, 4)))


def test_draws_depend_only_on_seed_layer_head_position():
    pos = torch.arange(2000, dtype=torch.int32).expand(1, 3, 2000)
    draws = position_draws(0, 5, pos)
    assert float(draws.min()) > 0.0 and float(draws.max()) < 1.0
    assert abs(float(draws.mean()) - 0.5) < 0.02 and abs(float((draws < 0.25).float().mean()) - 0.25) < 0.02
    shifted = position_draws(0, 5, torch.cat([torch.full((1, 3, 4), -1, dtype=torch.int32), pos[..., :10]], dim=-1))
    assert torch.equal(shifted[..., 4:], draws[..., :10])  # the same draw wherever the token sits
    assert not torch.equal(position_draws(1, 5, pos), draws)
    assert not torch.equal(position_draws(0, 6, pos), draws)
    assert not torch.equal(draws[:, 0], draws[:, 1])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_attention_is_the_models_own(family, make_model):
    model = make_model(family, attn_implementation="eager")
    ids = ids_of(30, seed=2)
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, cache) as rec:
        model(ids, past_key_values=cache)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    for idx, inputs in rec.inputs.items():
        ctx = score_context(rec.adapter, cache, idx, inputs)
        assert ctx is not None
        expected = attentions[idx][0, :, -1].view(2, 2, -1).mean(dim=1)  # (H, T): the last query, GQA mean
        torch.testing.assert_close(newest_attention(ctx)[0], expected, atol=1e-6, rtol=1e-4)


@torch.no_grad()
def greedy_sizes(model, method, steps: int) -> tuple[list[int], kvs.KVCache]:
    cache = kvs.KVCache(model.config)
    sizes = []
    with kvs.compress(model, method):
        logits = model(ids_of(40), past_key_values=cache).logits
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
            for layer in cache.full_layers():
                kept = layer.kept
                assert int(kept.min()) == int(kept.max())
                pos = layer.positions[0]
                assert all(p.unique().numel() == p.numel() for p in pos)
            sizes.append(int(cache.full_layers()[0].kept.max()))
    return sizes, cache


@pytest.mark.parametrize("every", [1, 4])
def test_long_generation_stays_within_bounds(every, make_model):
    model = make_model("llama")
    target = 20
    sizes, _ = greedy_sizes(model, CaM(target_tokens=target, every=every), 80)
    assert all(target <= s < target + every for s in sizes)
    assert sizes[0] == target + 1 if every > 1 else sizes[0] == target  # every=1: one eviction per step
    _, plain = greedy_sizes(model, DecodingCompression(target_tokens=target, every=every), 0)  # after the prefill
    _, merged = greedy_sizes(model, CaM(target_tokens=target, every=every), 0)
    for a, b in zip(plain.full_layers(), merged.full_layers(), strict=True):
        assert torch.equal(a.positions, b.positions)  # DecodingCompression's kept set, with the same scorer
        assert torch.equal(a.keys, b.keys)
        assert not torch.equal(a.values, b.values)  # but merged values


def test_generate_with_cam(make_model, tokenizer):
    model = make_model("llama")
    seen: list[int] = []

    class Watching(CaM):
        def merge_values(self, ctx, indices, counts):
            seen.append(int(counts.max()))
            return super().merge_values(ctx, indices, counts)

    out = kvs.generate(model, tokenizer, "a b c d e f " * 10, ["what?"], method=Watching(target_tokens=16),
                       max_new_tokens=30)  # fmt: skip
    assert out.stats.kv_bytes_after < out.stats.kv_bytes_before
    assert len(seen) > 4 * 20 and set(seen) == {16}  # merged at every step while answering, back to the target
    with pytest.raises(ValueError, match="already compresses while decoding"):
        kvs.generate(model, tokenizer, "a b c", ["what?"], method=CaM(target_tokens=4), decode_target=10)


@pytest.mark.parametrize(("options", "match"), [
    ({"merge_budget": 0}, "merge_budget must be an integer >= 1.*0"),
    ({"merge_budget": 2.0}, "merge_budget.*2.0"),
    ({"sample": "yes"}, "sample must be True or False.*'yes'"),
    ({"seed": -1}, "seed must be an integer >= 0.*-1"),
    ({"every": 0}, "every must be an integer >= 1.*0"),
])  # fmt: skip
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        CaM(ratio=0.5, **options)


def test_scorer_by_name():
    assert type(CaM(scorer="snapkv").scorer).name == "snapkv"  # `--option cam.scorer=snapkv`
    with pytest.raises(ValueError, match="nonsense"):
        CaM(scorer="nonsense")
