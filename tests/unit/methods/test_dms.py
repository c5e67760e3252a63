"""DMS-style delayed eviction: the kept set over a prefill and many decoding steps equals a slow token-by-token
reference; on a tiny model the recent window is always whole and about `ratio` of the judged tokens go, during
prefill, questions and decoding (also under `generate`); options are validated."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.base import ScoreContext
from kvsqueeze.methods.dms import DMS
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.snapkv import SnapKV
from tests.helpers import ids_of


def ctx_for(keys: torch.Tensor, kept: list[list[int]], seen: int, new: int) -> ScoreContext:
    """A rectangular context holding, per head, the kept positions (left-aligned, -1 after), keys from `keys`."""
    h = len(kept)
    width = max(len(k) for k in kept)
    positions = torch.full((1, h, width), -1, dtype=torch.int32)
    k_out = torch.zeros(1, h, width, keys.shape[-1])
    for head, pos in enumerate(kept):
        positions[0, head, : len(pos)] = torch.tensor(pos, dtype=torch.int32)
        k_out[0, head, : len(pos)] = keys[head, pos]
    none: object = None
    return ScoreContext(
        keys=k_out,
        values=k_out.clone(),
        positions=positions,
        hidden_states=torch.zeros(1, new, 8),
        query_positions=torch.arange(seen - new, seen)[None],
        position_embeddings=(torch.zeros(1, new, 8), torch.zeros(1, new, 8)),
        seen=torch.tensor([seen]),
        layer_idx=0,
        module=none,  # type: ignore[arg-type]
        adapter=none,  # type: ignore[arg-type]
    )


def reference_step(scores: list[float], kept: list[int], seen: int, new: int, window: int, ratio: float) -> list[int]:
    """One forward for one head, token by token: the tokens that were in the window before it or are new form R; the
    |R| - floor(|R| (1 - ratio)) lowest of R (equal scores: the later position is lower) are below the threshold;
    those that have now left the window are evicted."""
    before = seen - new
    reference = [p for p in kept if p >= before - window]
    n_high = int(len(reference) * (1 - ratio) + 1e-6)
    by_rank = sorted(reference, key=lambda p: (scores[p], -p))  # lowest first
    low = set(by_rank[: len(reference) - n_high])
    return [p for p in kept if not (p in low and before - window <= p < seen - window)]


@pytest.mark.parametrize(("ratio", "window", "prefill"), [(0.5, 6, 30), (0.75, 4, 10), (0.3, 12, 5)])
def test_prefill_and_decoding_match_a_slow_reference(ratio, window, prefill):
    gen = torch.Generator().manual_seed(0)
    n_total, heads = 70, 3
    keys = torch.randn(heads, n_total, 8, generator=gen)
    scores = [[-float(keys[h, p].norm()) for p in range(n_total)] for h in range(heads)]
    method = DMS(ratio=ratio, window=window)
    got: list[list[int]] = [[] for _ in range(heads)]
    want: list[list[int]] = [[] for _ in range(heads)]
    steps = [prefill] + [1] * (n_total - prefill - 8) + [8]  # a prefill, decoding steps, a question of 8 tokens
    seen = 0
    for new in steps:
        seen += new
        got = [g + list(range(seen - new, seen)) for g in got]
        plan = method.plan(ctx_for(keys, got, seen, new))
        if plan is not None:
            indices, counts = plan
            ctx_pos = ctx_for(keys, got, seen, new).positions
            got = [ctx_pos[0, h, indices[0, h, : counts[0, h]]].tolist() for h in range(heads)]
        want = [reference_step(scores[h], w + list(range(seen - new, seen)), seen, new, window, ratio) for h, w in
                enumerate(want)]  # fmt: skip
        assert got == want
    judged = n_total - window
    evicted = sum(n_total - len(g) for g in got) / heads
    assert 0.5 * ratio * judged < evicted < min(1.5 * ratio, 1) * judged + 1  # about `ratio` of the judged tokens
    assert len({len(g) for g in got}) > 1 or ratio == 0.75  # heads keep different counts (ragged)


def test_ties_keep_the_earlier_token():
    keys = torch.ones(1, 10, 4)  # every score equal
    plan = DMS(ratio=0.5, window=2).plan(ctx_for(keys, [list(range(10))], 10, 10))
    assert plan is not None
    kept = plan[0][0, 0, : plan[1][0, 0]].tolist()
    assert kept == [0, 1, 2, 3, 4, 8, 9]  # 5 lowest = the 5 latest, of which 5, 6, 7 have left the window


@torch.no_grad()
def test_long_generation_keeps_the_window_and_evicts_about_ratio(make_model):
    model = make_model("llama")
    window, ratio, steps = 8, 0.5, 100
    method = DMS(ratio=ratio, window=window)
    cache = kvs.KVCache(model.config)
    with kvs.compress(model, method):
        logits = model(ids_of(40), past_key_values=cache).logits
        for _ in range(steps):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache).logits
            seen = int(cache.real_tokens_seen()[0])
            for layer in cache.full_layers():
                pos = layer.view()[2]
                for head in range(pos.shape[1]):
                    held = pos[0, head][pos[0, head] >= 0].tolist()
                    assert held == sorted(set(held))
                    assert held[-window:] == list(range(seen - window, seen))  # the recent window is whole
                assert layer.keys.shape[0] == int(layer.kept.sum())  # ragged storage holds only what is kept
    judged = 40 + steps - window
    for layer in cache.full_layers():
        evicted = (40 + steps - layer.kept.float()).mean()
        assert 0.3 * judged < float(evicted) < 0.7 * judged


def test_generate_keeps_dms_on_while_answering(make_model, tokenizer):
    model = make_model("llama")
    calls: list[int] = []

    class Counting(DMS):
        def plan(self, ctx):
            calls.append(int((ctx.query_positions >= 0).sum()))
            return super().plan(ctx)

    method = Counting(ratio=0.5, window=8)
    out = kvs.generate(model, tokenizer, "a b c d e f " * 10, ["what?"], method=method, max_new_tokens=20)
    assert out.stats.kv_bytes_after < out.stats.kv_bytes_before
    assert calls.count(1) >= 4 * 19  # every decoding step of the 4 full layers
    with pytest.raises(ValueError, match="DMS already compresses while decoding"):
        kvs.generate(model, tokenizer, "a b c", ["what?"], method=DMS(ratio=0.5), decode_target=10)


def test_other_scorer_and_ratio_zero():
    keys = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(3))
    assert DMS(ratio=0.0, window=4).plan(ctx_for(keys, [list(range(20))] * 2, 20, 20)) is None
    method = DMS(ratio=0.5, window=4, scorer="keydiff")
    assert type(method.scorer).name == "keydiff" and method.scorer.ratio == 0.5
    assert isinstance(DMS(scorer=SnapKV()).scorer, SnapKV)
    assert isinstance(DMS().scorer, KNorm)


@pytest.mark.parametrize(("options", "match"), [
    ({"window": 0}, "window must be an integer >= 1.*0"),
    ({"window": 2.5}, "window.*2.5"),
    ({"scorer": "adakv"}, "scorer must be a scoring method with per-head budgets"),
])  # fmt: skip
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        DMS(ratio=0.5, **options)
