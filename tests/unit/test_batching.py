"""`BatchDecoder`: rows over different compressed contexts join and leave a running batch between steps, and each row
gets the answer `generation.answer` gives it alone (greedy: the same text; seeded sampling: the same draws)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import torch

from kvsqueeze.batching import BatchDecoder
from kvsqueeze.cache import KVCache
from kvsqueeze.generation import Delta, Sampling, answer
from kvsqueeze.methods import get_method
from kvsqueeze.methods.base import Method
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.pipeline import prefill
from kvsqueeze.prompts import encode_prompt
from kvsqueeze.quantization import QuantSpec
from kvsqueeze.storage import SharedStorage
from tests.tiny import tiny_model

DOCS = [
    "The harbour was quiet in the morning and the old baker sold bread. The code is 4417. " * 3,
    "The lighthouse keeper counted a box of apples after the storm. " * 2,
]
QUESTIONS = ["What is the code?", "Who sold bread?", "What did the keeper count?", "When was it?"]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("llama")


def context(model: Any, tokenizer: Any, doc: str, method: Method | None, quant: QuantSpec | None = None) -> KVCache:
    ids, _ = encode_prompt(tokenizer, doc, QUESTIONS[:1])
    return prefill(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), method, quant=quant)[0]


def question(tokenizer: Any, doc: str, text: str) -> str:
    return encode_prompt(tokenizer, doc, [text])[1][0]


@pytest.fixture(scope="module")
def contexts(model: Any, tokenizer: Any) -> list[KVCache]:
    """Two documents of different lengths, compressed differently: rectangular (knorm) and ragged (Ada-KV)."""
    caches = [
        context(model, tokenizer, DOCS[0], get_method("knorm", ratio=0.5)),
        context(model, tokenizer, DOCS[1], get_method("adakv", ratio=0.4, scorer=KNorm())),
    ]
    assert any(layer.is_ragged for layer in caches[1].full_layers())
    return caches


def run(decoder: BatchDecoder, schedule: dict[int, list[tuple[KVCache, str, Sampling]]]) -> dict[int, list[Delta]]:
    """Step the decoder to the end, adding rows before the steps the schedule names; each row id's deltas."""
    out: dict[int, list[Delta]] = defaultdict(list)
    step = 0
    while decoder or any(s >= step for s in schedule):
        for cache, text, sampling in schedule.get(step, []):
            decoder.add(cache, text, sampling)
        for delta in decoder.step():
            out[delta.row].append(delta)
        step += 1
    return out


def test_rows_joining_at_different_steps_get_the_answers_they_get_alone(model, tokenizer, contexts):
    rows = [  # (document, question, sampling, the step it joins at)
        (0, 0, Sampling(max_new_tokens=9), 0),
        (1, 2, Sampling(max_new_tokens=6), 0),
        (0, 1, Sampling(max_new_tokens=12), 3),
        (1, 3, Sampling(max_new_tokens=4, stop=(" the",)), 3),
        (0, 3, Sampling(max_new_tokens=1), 5),  # finishes at its question forward: never joins the batch
        (1, 0, Sampling(max_new_tokens=10, temperature=1.3, seed=11), 6),  # sampled, seeded
    ]
    schedule: dict[int, list[tuple[KVCache, str, Sampling]]] = defaultdict(list)
    for d, q, sampling, at in rows:
        schedule[at].append((contexts[d], question(tokenizer, DOCS[d], QUESTIONS[q]), sampling))
    decoder = BatchDecoder(model, tokenizer)
    deltas = run(decoder, schedule)
    assert sorted(deltas) == list(range(len(rows))) and len(decoder) == 0 and decoder.cache is None
    for i, (d, q, sampling, _) in enumerate(rows):
        want = answer(model, tokenizer, contexts[d], [0], [question(tokenizer, DOCS[d], QUESTIONS[q])], sampling)
        got = deltas[i]
        assert "".join(x.text for x in got).strip() == want.texts[0], f"row {i}"
        assert [x.finish_reason for x in got[:-1]] == [None] * (len(got) - 1)
        assert got[-1].finish_reason == want.finish_reasons[0] and got[-1].steps == want.steps, f"row {i}"


def test_the_batch_holds_rows_of_both_contexts_side_by_side(model, tokenizer, contexts):
    decoder = BatchDecoder(model, tokenizer)
    for d in (0, 1, 0):
        decoder.add(contexts[d], question(tokenizer, DOCS[d], QUESTIONS[d]), 8)
    assert decoder.cache is None and decoder.rows == [0, 1, 2]  # they start at the next step
    decoder.step()
    assert decoder.cache is not None and decoder.cache.batch_size == 3
    seen = decoder.cache.real_tokens_seen()
    assert seen is not None and seen[0] == seen[2] != seen[1]  # each row at its own length
    assert contexts[0].batch_size == 1  # the contexts are left as they were
    for layer, *context_layers in zip(decoder.cache.kv_layers(), *(c.kv_layers() for c in contexts), strict=True):
        storage = layer.storage  # the rows read their contexts in place: each context once, however many rows
        assert isinstance(storage, SharedStorage) and storage.owner.tolist() == [0, 1, 0]
        assert [p is c.storage for p, c in zip(storage.prefixes, context_layers, strict=True)] == [True, True]
    own = sum(layer.storage.suffix.nbytes() for layer in decoder.cache.kv_layers())  # type: ignore[union-attr]
    assert decoder.cache.tracker.current == sum(c.tracker.current for c in contexts) + own  # each context counted once


def test_a_removed_row_stops_and_leaves_while_the_others_go_on(model, tokenizer, contexts):
    texts = [question(tokenizer, DOCS[d], QUESTIONS[d]) for d in (0, 1)]
    decoder = BatchDecoder(model, tokenizer)
    kept, dropped = decoder.add(contexts[0], texts[0], 10), decoder.add(contexts[1], texts[1], 10)
    decoder.step()
    decoder.step()
    decoder.remove(dropped)
    assert decoder.rows == [kept]
    later: dict[int, list[Delta]] = defaultdict(list)
    while decoder:
        for delta in decoder.step():
            later[delta.row].append(delta)
        assert decoder.cache is None or decoder.cache.batch_size == 1
    assert dropped not in later and later[kept][-1].finish_reason is not None
    with pytest.raises(ValueError, match=f"no row {dropped} is running or waiting"):
        decoder.remove(dropped)
    waiting = decoder.add(contexts[0], texts[0], 3)
    decoder.remove(waiting)  # before it started
    assert not decoder and decoder.step() == []


def test_a_decoding_time_method_applies_to_every_row_as_alone(model, tokenizer):
    h2o = get_method("h2o", budget_tokens=24)
    caches = [context(model, tokenizer, doc, h2o) for doc in DOCS]
    texts = [question(tokenizer, doc, QUESTIONS[0]) for doc in DOCS]
    decoder = BatchDecoder(model, tokenizer, decode=h2o)
    deltas = run(decoder, {0: [(caches[0], texts[0], Sampling(10))], 2: [(caches[1], texts[1], Sampling(10))]})
    for i in range(2):
        want = answer(model, tokenizer, caches[i], [0], [texts[i]], Sampling(10), decode=h2o)
        assert "".join(x.text for x in deltas[i]).strip() == want.texts[0]


def test_what_cannot_be_added_is_refused(model, tokenizer, contexts):
    decoder = BatchDecoder(model, tokenizer)
    text = question(tokenizer, DOCS[0], QUESTIONS[0])
    with pytest.raises(ValueError, match="has no tokens"):
        decoder.add(contexts[0], "", 4)
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 0\]"):
        decoder.add(contexts[0], text, 4, row=1)
    with pytest.raises(ValueError, match="sampling must be a Sampling or max_new_tokens"):
        decoder.add(contexts[0], text, "greedy")  # type: ignore[arg-type]
    decoder.add(contexts[0], text, 4)
    quantized = context(model, tokenizer, DOCS[1], None, QuantSpec(bits=4, group_size=8, residual=4))
    assert decoder.problem(quantized) is not None and decoder.problem(contexts[1]) is None
    with pytest.raises(ValueError, match="cannot join the batch: layer 0: one layer is quantized"):
        decoder.add(quantized, text, 4)
