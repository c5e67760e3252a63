"""H2O as published: accumulated attention follows the tokens, heavy hitters + recent window, one eviction per step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.h2o import H2O, STATE
from tests.helpers import ids_of


@dataclass
class _Spy(H2O):
    """H2O that records what each plan saw (keys, positions, queries) and decided."""

    steps: list = field(default_factory=list, compare=False, repr=False)

    def plan(self, ctx):
        q = ctx.queries(rope=True).clone()
        out = super().plan(ctx)
        kept = ctx.positions.clone() if out is None else ctx.positions.gather(2, out[0])
        self.steps.append(
            (ctx.layer_idx, ctx.positions.clone(), ctx.keys.clone(), q, ctx.query_positions.clone(), kept)
        )
        return out


@torch.no_grad()
def _greedy(model, ids, steps: int, method) -> kvs.KVCache:
    cache = kvs.KVCache(model.config)
    with kvs.compress(model, method):
        logits = model(ids, past_key_values=cache).logits
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
    return cache


def _replay(spy: _Spy, scale: float, k_first: int, share: float) -> dict[int, list[dict[int, float]]]:
    """Replays every recorded step with plain dicts {position: accumulated attention} per (layer, head), checking each
    decision; returns the final dicts."""
    acc: dict[int, list[dict[int, float]]] = {}
    budget: dict[int, int] = {}
    for layer, positions, keys, q, qpos, kept in spy.steps:
        heads = acc.setdefault(layer, [{}, {}])
        g = q.shape[1] // 2
        for h in range(2):
            slots = [(int(p), keys[0, h, i].double()) for i, p in enumerate(positions[0, h].tolist()) if p >= 0]
            for p, _ in slots:
                heads[h].setdefault(p, 0.0)
            for j in range(h * g, (h + 1) * g):
                for i, qp in enumerate(qpos[0].tolist()):
                    visible = [(p, k) for p, k in slots if p <= qp]
                    probs = torch.softmax(torch.stack([q[0, j, i].double() @ k * scale for _, k in visible]), dim=0)
                    for (p, _), w in zip(visible, probs.tolist(), strict=True):
                        heads[h][p] += w
            k = budget.setdefault(layer, k_first)
            if len(heads[h]) > k:
                recent = math.floor(k * share)
                newest = max(heads[h])
                protected = [p for p in heads[h] if p > newest - recent]
                rest = sorted((p for p in heads[h] if p not in protected), key=lambda p: (-heads[h][p], p))
                keep = set(protected) | set(rest[: k - len(protected)])
                heads[h] = {p: v for p, v in heads[h].items() if p in keep}
            got = sorted(p for p in kept[0, h].tolist() if p >= 0)
            assert got == sorted(heads[h]), (layer, h, qpos[0].tolist())
    return acc


@pytest.mark.parametrize(("ratio", "share"), [(0.5, 0.5), (0.7, 0.25)])
def test_h2o_matches_a_replay_by_hand(ratio, share, make_model):
    model = make_model("llama")
    spy = _Spy(ratio=ratio, recent_share=share)
    cache = _greedy(model, ids_of(30), 20, spy)
    scale = kvs.get_adapter(model).attention_modules[0].scaling
    k = math.floor(30 * (1 - ratio))
    acc = _replay(spy, scale, k, share)
    for idx, layer in enumerate(cache.full_layers()):
        state = layer.read_slot_state(STATE)  # the state stored with the tokens equals the replayed sums
        for h in range(2):
            pos = layer.positions[0, h].tolist()
            assert len(pos) == k
            got = {p: float(state[0, h, i]) for i, p in enumerate(pos)}
            assert got.keys() == acc[idx][h].keys()
            assert all(math.isclose(got[p], acc[idx][h][p], rel_tol=1e-4, abs_tol=1e-5) for p in got)


def test_cache_stays_within_budget_and_one_more_while_generating(make_model, tokenizer):
    model = make_model("qwen2")
    spy = _Spy(ratio=0.5)
    out = kvs.generate(model, tokenizer, "the harbour was quiet " * 8, "what was quiet?", spy, max_new_tokens=40)
    context = out.stats.tokens_before
    k = math.floor(context * 0.5)
    decode = [s for s in spy.steps if s[4].shape[1] == 1]
    assert len(decode) >= 30 * len(out.cache.full_layers())  # a long generation, compressed at every step
    assert all(int((kept[0, h] >= 0).sum()) == k for *_, kept in spy.steps for h in range(2))  # K after each forward
    for _, positions, *_, kept in decode:  # K + 1 while a decoding step attends, then one eviction
        assert int((positions[0, 0] >= 0).sum()) == k + 1 and int((kept[0, 0] >= 0).sum()) == k


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_budget_above_the_length_is_uncompressed_generation(family, make_model, tokenizer):
    model = make_model(family)
    context, question = "the harbour was quiet " * 6, "what was quiet?"
    plain = kvs.generate(model, tokenizer, context, question, None, max_new_tokens=24)
    h2o = kvs.generate(model, tokenizer, context, question, H2O(budget_tokens=10_000), max_new_tokens=24)
    assert h2o.answers == plain.answers
    ids = ids_of(25)
    dense, kept = _greedy(model, ids, 10, None), _greedy(model, ids, 10, H2O(budget_tokens=100))
    for a, b in zip(dense.full_layers(), kept.full_layers(), strict=True):
        assert torch.equal(a.positions, b.positions)
        # H2O's attention sums what each slot receives as it attends (`kvsqueeze.received`): the same softmax as SDPA's
        # up to float32 rounding, which later layers' keys carry
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_fixed_budget_tokens(make_model):
    model = make_model("llama")
    cache = _greedy(model, ids_of(30), 12, H2O(budget_tokens=9))
    assert all(layer.kept.tolist() == [[9, 9]] for layer in cache.full_layers())
    assert cache.real_tokens_seen().tolist() == [42]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"budget_tokens": 0}, "budget_tokens must be an integer >= 1"),
        ({"budget_tokens": 8, "ratio": 0.5}, "not both"),
        ({"recent_share": 1.5}, r"recent_share must be a number in \[0, 1\], got 1.5"),
        ({"block_size": 0}, "block_size must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        H2O(**options)


def test_decode_target_is_refused(make_model, tokenizer):
    with pytest.raises(ValueError, match="already compresses while decoding"):
        kvs.generate(make_model("llama"), tokenizer, "some text here", "q?", H2O(0.5), decode_target=8)
