"""The decode loop (`kvsqueeze.generation`): greedy answers unchanged and equal to transformers' own greedy search,
seeded sampling reproducible and independent of the rows beside it, top_p, stop strings, finish reasons, and
streamed deltas that join to the final answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.cache import KVCache
from kvsqueeze.generation import Sampling, TextStream, answer, encode, sample_token, stream
from kvsqueeze.methods import get_method
from kvsqueeze.pipeline import generate, prefill
from kvsqueeze.prompts import encode_prompt
from kvsqueeze.storage import SharedStorage
from tests.tiny import tiny_model, tiny_tokenizer

CONTEXT = "The harbour was quiet in the morning and the old baker sold bread. The code is 4417. " * 3
QUESTIONS = ["What is the code?", "Who sold bread?"]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("llama")


def compressed(model: Any, tokenizer: Any, method: Any = None) -> tuple[KVCache, list[str]]:
    ids, texts = encode_prompt(tokenizer, CONTEXT, QUESTIONS)
    cache, *_ = prefill(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), method)
    return cache, texts


# ---- Sampling's checks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be a number in [0, 100] (0 = greedy), got -0.1"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
        ({"seed": -1}, "seed must be an integer in [0, 9223372036854775807] or None, got -1"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"stop": ("",)}, "stop must be a string or a list of non-empty strings"),
        ({"stop": (3,)}, "stop must be a string or a list of non-empty strings, got (3,)"),
    ],
)
def test_sampling_refuses_bad_values_naming_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        Sampling(**kwargs)
    assert str(err.value).startswith(message)


@given(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3), st.none(), st.booleans()))
def test_any_temperature_is_accepted_or_a_value_error(value: object) -> None:
    try:
        s = Sampling(temperature=value)  # type: ignore[arg-type]
    except ValueError as err:
        assert "temperature must be" in str(err)
        return
    assert isinstance(value, (int, float)) and 0 <= value <= 100 and s.greedy == (value == 0)


def test_a_single_stop_string_becomes_a_tuple() -> None:
    assert Sampling(stop="\n").stop == ("\n",)  # type: ignore[arg-type]


# ---- choosing a token ----------------------------------------------------------------------------------------------


def test_sampling_follows_the_tempered_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(
        torch.tensor([sample_token(logits, Sampling(temperature=1.0), gen) for _ in range(4000)]), minlength=4
    )
    expected = torch.softmax(logits, 0) * 4000
    assert torch.all((counts - expected).abs() < 4 * expected.sqrt() + 5), (counts, expected)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(1)
    picks = {sample_token(logits, Sampling(temperature=1.0, top_p=0.7), gen) for _ in range(500)}
    assert picks == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 covers it
    assert {sample_token(logits, Sampling(temperature=5.0, top_p=1e-9), gen) for _ in range(50)} == {0}
    assert {sample_token(logits, Sampling(temperature=1.0, top_p=1e-60), gen) for _ in range(20)} == {0}  # float32: 0
    assert {sample_token(logits, Sampling(temperature=1e-300), gen) for _ in range(20)} == {0}  # no overflow to NaN


# ---- the loop ------------------------------------------------------------------------------------------------------


def test_greedy_answers_equal_transformers_greedy_search(model: Any, tokenizer: Any) -> None:
    ids, texts = encode_prompt(tokenizer, CONTEXT, QUESTIONS[:1])
    full = torch.tensor([ids + encode(tokenizer, texts[0])])
    reference = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, full.shape[1]:].tolist()  # fmt: skip
    cache, texts = compressed(model, tokenizer)
    out = answer(model, tokenizer, cache, [0], texts[:1], Sampling(max_new_tokens=12))
    eos = tokenizer.eos_token_id
    assert out.tokens[0] == [t for t in reference if t != eos][: len(out.tokens[0])]
    assert len(out.tokens[0]) == 12 or reference[len(out.tokens[0])] == eos


def test_greedy_is_the_default_and_an_int_means_max_new_tokens(model: Any, tokenizer: Any) -> None:
    cache, texts = compressed(model, tokenizer)
    a = answer(model, tokenizer, cache, [0, 0], texts, 6)
    b = answer(model, tokenizer, cache, [0, 0], texts, Sampling(max_new_tokens=6, temperature=0.0, seed=3))
    assert a.tokens == b.tokens and a.texts == b.texts and all(len(t) <= 6 for t in a.tokens)


def test_a_seed_gives_the_same_tokens_whatever_rows_run_beside_it(model: Any, tokenizer: Any) -> None:
    cache, texts = compressed(model, tokenizer)
    hot = Sampling(max_new_tokens=10, temperature=1.5, seed=7)
    alone = answer(model, tokenizer, cache, [0], texts[:1], hot)
    again = answer(model, tokenizer, cache, [0], texts[:1], hot)
    beside = answer(model, tokenizer, cache, [0, 0], texts, [hot, Sampling(max_new_tokens=10, temperature=1.0)])
    assert alone.tokens == again.tokens == beside.tokens[:1]
    seeds = {tuple(answer(model, tokenizer, cache, [0], texts[:1], Sampling(10, 1.5, seed=s)).tokens[0])
             for s in range(6)}  # fmt: skip
    assert len(seeds) > 1  # a random model at temperature 1.5: six seeds do not all pick the same ten tokens


def test_max_new_tokens_and_finish_reasons(model: Any, tokenizer: Any) -> None:
    cache, texts = compressed(model, tokenizer)
    out = answer(model, tokenizer, cache, [0, 0], texts, [Sampling(max_new_tokens=3), Sampling(max_new_tokens=5)])
    assert [len(t) for t in out.tokens] == [3, 5] and out.finish_reasons == ["length", "length"]
    assert out.steps == 8


def test_a_stop_string_cuts_the_answer_before_it(model: Any, tokenizer: Any) -> None:
    cache, texts = compressed(model, tokenizer)
    free = answer(model, tokenizer, cache, [0], texts[:1], Sampling(max_new_tokens=16))
    text = tokenizer.decode(free.tokens[0], skip_special_tokens=True)
    assert len(text) > 6, text
    stop = text[3:6]
    cut = answer(model, tokenizer, cache, [0], texts[:1], Sampling(max_new_tokens=16, stop=(stop, "never seen")))
    assert cut.texts[0] == text[: text.find(stop)].strip() and cut.finish_reasons == ["stop"]
    assert len(cut.tokens[0]) <= len(free.tokens[0]) and free.tokens[0][: len(cut.tokens[0])] == cut.tokens[0]


def test_streamed_deltas_join_to_the_answer(model: Any, tokenizer: Any) -> None:
    cache, texts = compressed(model, tokenizer, get_method("knorm", ratio=0.5))
    sampling = [Sampling(max_new_tokens=9, temperature=0.8, seed=5), Sampling(max_new_tokens=14)]
    kept = [layer.kept.clone() for layer in cache.full_layers()]
    run = stream(model, tokenizer, cache, [0, 0], texts, sampling)
    pieces, finished, steps = ["", ""], [0, 0], [0, 0]
    for deltas in run:
        for d in deltas:
            assert finished[d.row] == 0  # nothing arrives after a row's last delta
            pieces[d.row] += d.text
            finished[d.row] += d.finish_reason is not None
            steps[d.row] = d.steps
    assert finished == [1, 1]
    assert steps == [s.steps for s in run.streams]  # each last delta counts the row's tokens
    full = answer(model, tokenizer, cache, [0, 0], texts, sampling)
    assert [p.strip() for p in pieces] == full.texts
    assert all(torch.equal(a, layer.kept) for a, layer in zip(kept, cache.full_layers(), strict=True))  # untouched


def test_generate_passes_sampling_through(model: Any, tokenizer: Any) -> None:
    greedy = generate(model, tokenizer, CONTEXT, QUESTIONS, max_new_tokens=6)
    assert greedy.finish_reasons == ["length", "length"] or "stop" in greedy.finish_reasons
    a = generate(model, tokenizer, CONTEXT, QUESTIONS, max_new_tokens=6, temperature=1.2, seed=11)
    b = generate(model, tokenizer, CONTEXT, QUESTIONS, max_new_tokens=6, temperature=1.2, seed=11)
    assert a.answers == b.answers
    with pytest.raises(ValueError, match="top_p must be a number in"):
        generate(model, tokenizer, CONTEXT, QUESTIONS, top_p=2.0)
    with pytest.raises(ValueError, match="stop must be a string, a list of strings or None, got 5"):
        generate(model, tokenizer, CONTEXT, QUESTIONS, stop=5)  # type: ignore[arg-type]


def test_rows_and_questions_must_pair(model: Any, tokenizer: Any) -> None:
    cache, texts = compressed(model, tokenizer)
    with pytest.raises(ValueError, match="give one context row per question: 1 rows for 2 questions"):
        stream(model, tokenizer, cache, [0], texts)
    with pytest.raises(ValueError, match="got 3 Sampling objects for 2 rows"):
        stream(model, tokenizer, cache, [0, 0], texts, [Sampling()] * 3)


# ---- the text stream -----------------------------------------------------------------------------------------------

TOKENIZER = tiny_tokenizer()
WORDS = ["the", " baker", " sold", " bread", ".", " \u00e9t\u00e9", "\n", " code", " 4417", " harbour", "!!"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), st.data())
def test_deltas_join_to_the_text_cut_at_the_first_stop(words: list[str], data: st.DataObject) -> None:
    text = "".join(words)
    stops = tuple(data.draw(st.lists(st.text(alphabet="abdehlot .\n4", min_size=1, max_size=4), max_size=2)))
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    s = TextStream(TOKENIZER, {TOKENIZER.eos_token_id}, stops)
    out = ""
    for tok in ids:
        out += s.push(tok)
        assert s.text().startswith(out)  # never hands out text it takes back
        if s.done:
            break
    out += s.end()
    decoded = TOKENIZER.decode(ids, skip_special_tokens=True)
    cuts = [decoded.find(stop) for stop in stops if stop in decoded]
    expected = decoded[: min(cuts)] if cuts else decoded
    # a stop string found in the whole text can straddle the point where the stream stopped early: the stream cuts at
    # the first stop it sees, which is the first in the text
    assert out == s.final == expected
    assert s.finish_reason == ("stop" if cuts else "length")


def test_text_that_may_become_a_stop_string_waits() -> None:
    s = TextStream(TOKENIZER, set(), ("bread.",))
    shown = [s.push(t) for t in TOKENIZER("the baker sold bread", add_special_tokens=False)["input_ids"]]
    assert "".join(shown) == "the baker sold " and not s.done  # "bread" may still be "bread."
    assert s.end() == "bread" and s.finish_reason == "length"


def test_the_end_token_finishes_with_stop() -> None:
    s = TextStream(TOKENIZER, {TOKENIZER.eos_token_id})
    ids = TOKENIZER("the baker", add_special_tokens=False)["input_ids"]
    assert "".join(s.push(t) for t in ids) == "the baker" and not s.done
    assert s.push(TOKENIZER.eos_token_id) == "" and s.finish_reason == "stop" and s.steps == len(ids) + 1
    with pytest.raises(ValueError, match="this answer is finished"):
        s.push(5)


def test_ignore_eos_goes_on_past_the_end_token(model: Any, tokenizer: Any) -> None:
    cache, texts = compressed(model, tokenizer)
    first = answer(model, tokenizer, cache, [0], texts[:1], Sampling(max_new_tokens=1)).tokens[0][0]
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first  # the model's first greedy token now ends the answer
    try:
        stopped = answer(model, tokenizer, cache, [0], texts[:1], Sampling(max_new_tokens=5))
        went_on = answer(model, tokenizer, cache, [0], texts[:1], Sampling(max_new_tokens=5, ignore_eos=True))
    finally:
        model.generation_config.eos_token_id = before
    assert stopped.finish_reasons == ["stop"] and stopped.tokens == [[]] and stopped.steps == 1
    assert went_on.finish_reasons == ["length"] and went_on.steps == 5 and went_on.tokens[0][0] == first
    with pytest.raises(ValueError, match="ignore_eos must be True or False"):
        Sampling(ignore_eos="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", [None, "knorm"])
def test_a_prefilled_context_lends_its_room_to_one_question_at_a_time(model: Any, tokenizer: Any, method,
                                                                       monkeypatch) -> None:  # fmt: skip
    """A one-row context (uncompressed or pruned) gets room after its tokens when first forked; that fork decodes
    there, through one attention call per layer, and answers as a fork reading the context apart does."""
    reads: list[bool] = []
    joined_of = SharedStorage.joined
    monkeypatch.setattr(
        SharedStorage, "joined", lambda self: reads.append(joined_of(self) is not None) or joined_of(self)
    )
    cache, texts = compressed(model, tokenizer, None if method is None else get_method(method, ratio=0.5))
    assert all(layer.storage.spare is None for layer in cache.full_layers())  # type: ignore[union-attr]
    sampling = Sampling(max_new_tokens=8)
    holder = cache.fork([0])  # makes the room and holds it: the next question decodes apart
    for layer in cache.full_layers():
        spare = layer.storage.spare  # type: ignore[union-attr]
        assert spare is not None and spare.capacity == layer.storage.width() + 128  # type: ignore[union-attr]
    apart = answer(model, tokenizer, cache, [0], texts[:1], sampling)
    assert reads and not any(reads)  # its decode steps asked, and read the context and their own tokens apart
    del holder
    reads.clear()
    joined = answer(model, tokenizer, cache, [0], texts[:1], sampling)
    assert reads and all(reads)  # every decode step read one rectangle
    assert joined.tokens == apart.tokens
