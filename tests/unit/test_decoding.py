"""DecodingCompression on tiny models: the cache stays within [target, target + every) over long generations, a
target above the total length changes nothing, positions stay absolute, query scorers see the recent decoded
tokens at their own positions, and generate/CLI wire it in."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.methods.base import ScoreContext
from kvsqueeze.methods.decoding import DecodingCompression
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.methods.snapkv import SnapKV
from kvsqueeze.methods.streaming_llm import StreamingLLM
from kvsqueeze.recording import record
from tests.helpers import ids_of

N_CTX = 40


@torch.no_grad()
def greedy(model, ids: torch.Tensor, steps: int, method: kvs.Method | None, on_step=None) -> list[int]:
    """Greedy tokens after `ids`, compressing with `method` after every forward; `on_step(cache)` after each."""
    cache = kvs.KVCache(model.config)
    out: list[int] = []
    with kvs.compress(model, method):
        logits = model(ids, past_key_values=cache).logits
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1)
            out.append(int(nxt))
            logits = model(nxt[:, None], past_key_values=cache).logits
            if on_step is not None:
                on_step(cache)
    return out


SCORERS = {
    "knorm": lambda: KNorm(),
    "streaming_llm": lambda: StreamingLLM(),
    "snapkv": lambda: SnapKV(window=8),
}


@pytest.mark.parametrize(
    ("scorer", "family"), [("knorm", "llama"), ("streaming_llm", "llama"), ("snapkv", "llama"), ("snapkv", "gemma3")]
)
def test_cache_stays_within_target_and_target_plus_every(scorer, family, make_model):
    model = make_model(family)
    target, every = 24, 8
    method = DecodingCompression(scorer=SCORERS[scorer](), target_tokens=target, every=every)
    sizes: list[int] = []
    compressions = 0

    def check(cache: kvs.KVCache) -> None:
        nonlocal compressions
        seen = int(cache.real_tokens_seen()[0])
        for layer in cache.full_layers():
            kept = layer.kept
            assert int(kept.min()) == int(kept.max()), "every head keeps the same number"
            assert target <= int(kept.max()) < target + every
            assert layer.keys.shape[-2] == int(kept.max()), "the storage holds only the kept slots"
            pos = layer.positions[0]
            assert int(pos.min()) >= 0 and int(pos.max()) <= seen - 1  # absolute positions of kept tokens
            if scorer != "knorm":  # these keep the most recent token, at its absolute position
                assert int(pos.max()) == seen - 1
            assert all(p.unique().numel() == p.numel() for p in pos)
        size = int(cache.full_layers()[0].kept.max())
        if sizes and size < sizes[-1]:
            compressions += 1
        sizes.append(size)

    greedy(model, ids_of(N_CTX), 200, method, check)
    assert sizes[0] == target + 1  # the prefill was compressed to the target, then one token was appended
    assert compressions == 200 // every  # once every `every` steps
    assert set(sizes) == set(range(target, target + every))


def test_ratio_target_grows_with_the_tokens_seen(make_model):
    model = make_model("llama")
    ratio, every = 0.5, 6
    method = DecodingCompression(scorer=KNorm(), ratio=ratio, every=every)

    def check(cache: kvs.KVCache) -> None:
        seen = int(cache.real_tokens_seen()[0])
        target = int(seen * (1 - ratio))
        for layer in cache.full_layers():
            assert target <= int(layer.kept.max()) < target + every

    greedy(model, ids_of(N_CTX), 60, method, check)


@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_target_above_the_total_length_equals_no_compression(scorer, make_model):
    model = make_model("qwen2")
    steps = 50
    expected = greedy(model, ids_of(N_CTX), steps, None)
    method = DecodingCompression(scorer=SCORERS[scorer](), target_tokens=N_CTX + steps, every=1)
    assert greedy(model, ids_of(N_CTX), steps, method) == expected
    assert len(set(expected)) > 3, "a degenerate generation would make this test vacuous"
    squeezed = DecodingCompression(scorer=SCORERS[scorer](), target_tokens=16, every=4)
    assert greedy(model, ids_of(N_CTX), steps, squeezed) != expected  # the comparison can fail


def test_positions_continue_from_the_uncompressed_length(make_model):
    model = make_model("llama")
    calls: list[torch.Tensor] = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        greedy(model, ids_of(N_CTX), 30, DecodingCompression(scorer=KNorm(), target_tokens=10, every=4))
    finally:
        handle.remove()
    assert calls[0].tolist() == [list(range(N_CTX))]
    assert [c.tolist() for c in calls[1:]] == [[[N_CTX + i]] for i in range(30)]


@dataclass
class SpySnapKV(SnapKV):
    """SnapKV that records the contexts it scores (not registered)."""

    seen_contexts: list[ScoreContext] = field(default_factory=list, repr=False, compare=False)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        self.seen_contexts.append(ctx)
        return super().score(ctx)


def test_query_scorers_see_the_recent_decoded_tokens_at_their_own_positions(make_model):
    model = make_model("llama")
    window, steps = 6, 12
    spy = SpySnapKV(window=window)
    # the first compression happens after step 12 (the cache reaches 40 + 12 = 52 = 44 + 8): nothing was evicted
    # before it, so the remembered layer inputs must equal those of one uncompressed forward over the whole sequence
    method = DecodingCompression(scorer=spy, target_tokens=44, every=8)
    tokens = greedy(model, ids_of(N_CTX), steps, method)
    full = torch.cat([ids_of(N_CTX), torch.tensor([tokens[:-1]])], dim=1)  # all tokens fed in: 40 + 11 + the last
    last = torch.tensor([[tokens[-1]]])
    with torch.no_grad(), record(model, kvs.KVCache(model.config)) as rec:
        model(torch.cat([full, last], dim=1), past_key_values=rec.cache)
    assert len(spy.seen_contexts) == 4  # one compression, 4 full layers
    n = full.shape[1] + 1
    for ctx in spy.seen_contexts:
        ref = rec.inputs[ctx.layer_idx]
        assert ctx.query_positions.tolist() == [list(range(n - window, n))]
        torch.testing.assert_close(ctx.hidden_states, ref.hidden_states[:, -window:], rtol=1e-4, atol=1e-4)
        cos, sin = ctx.adapter.rope_at(ctx.layer_idx, ctx.query_positions, ctx.hidden_states)
        torch.testing.assert_close(ctx.position_embeddings[0], cos)
        torch.testing.assert_close(ctx.position_embeddings[1], sin)
        assert ctx.queries().shape[2] == window


def test_remembered_tokens_reset_on_a_new_sequence(make_model):
    model = make_model("llama")
    method = DecodingCompression(scorer=SnapKV(window=4), target_tokens=20, every=4, query_window=48)
    first = greedy(model, ids_of(N_CTX), 10, method)
    assert method._recent[0].query_positions.tolist() == [list(range(N_CTX + 10 - 48, N_CTX + 10))]
    greedy(model, ids_of(N_CTX), 0, method)  # the same instance on a fresh cache: only the new prefill is remembered
    assert method._recent[0].query_positions.tolist() == [list(range(N_CTX))]
    assert greedy(model, ids_of(N_CTX), 10, method) == first
    assert DecodingCompression(scorer=KNorm()).remembered == 0  # query-free scorers remember nothing


def test_protected_tokens_above_the_target_raise(make_model):
    model = make_model("llama")
    method = DecodingCompression(scorer=SnapKV(window=16), target_tokens=8, every=4)
    with pytest.raises(ValueError, match=r"target of 8 tokens cannot hold the 16 protected"):
        greedy(model, ids_of(N_CTX), 2, method)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"target_tokens": 0}, "target_tokens must be an integer >= 1 or None, got 0"),
        ({"target_tokens": 1.5}, "target_tokens must be an integer"),
        ({"target_tokens": 10, "ratio": 0.5}, r"either target_tokens \(10\) or ratio \(0.5\)"),
        ({"query_window": 0}, "query_window must be an integer >= 1 or None, got 0"),
        ({"scorer": "knorm"}, "scorer must be a scoring method"),
        ({"ratio": 1.0}, r"ratio must be a number in \[0, 1\)"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        DecodingCompression(**options)


def test_registered_and_rebuilt_from_repr():
    method = kvs.get_method("decoding", target_tokens=128, every=16, scorer=SnapKV(window=8))
    assert isinstance(method, DecodingCompression)
    assert eval(repr(method), {"DecodingCompression": DecodingCompression, "SnapKV": SnapKV}) == method
    assert method.remembered == 8


# --- generate and the CLI ---------------------------------------------------------------------------------------------

CONTEXT = (
    "The harbour master walked to the market in the morning because it was raining. The old baker sold a box of "
    "apples after the storm. The lighthouse keeper counted the boats at night and nobody knows why."
)


def test_generate_with_decode_target(make_model, tokenizer):
    model = make_model("llama")
    knorm = kvs.get_method("knorm", ratio=0.5)
    plain = kvs.generate(model, tokenizer, CONTEXT, ["Who?"], method=knorm, max_new_tokens=40)
    same = kvs.generate(model, tokenizer, CONTEXT, ["Who?"], method=knorm, max_new_tokens=40, decode_target=1000)
    assert same.answers == plain.answers
    peaks: list[int] = []
    original = DecodingCompression.plan

    def spy(self, ctx):
        peaks.append(int(ctx.valid.sum(-1).max()))
        return original(self, ctx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodingCompression, "plan", spy)
        kvs.generate(model, tokenizer, CONTEXT, ["Who?"], method=knorm, max_new_tokens=40, decode_target=20,
                     decode_every=5)  # fmt: skip
    assert len(peaks) == 4 * 40  # 4 layers, the question forward and 39 decoding steps
    assert min(peaks[:4]) > 20  # the question forward went over the target, and was compressed to it at once
    assert 20 < max(peaks[4:]) <= 20 + 5  # then at most target + every before each compression
    with pytest.raises(ValueError, match="already compresses while decoding"):
        kvs.generate(model, tokenizer, CONTEXT, ["Who?"], method=DecodingCompression(), decode_target=5)


def test_benchmark_runs_decoding_compression_for_real():
    from kvsqueeze.methods.decoding import DecodingCompression

    assert DecodingCompression.shared_prefill is False  # a recorded prefill would skip the decoding-time part
