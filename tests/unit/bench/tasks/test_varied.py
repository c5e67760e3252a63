"""The varied needle tasks: reproducible per (seed, index), every source, phrasing and format reachable and
balanced, the needle exactly once, lengths within 5%, options that restrict the draws; the original tasks unchanged."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any

import pytest

from kvsqueeze.bench.metrics import score
from kvsqueeze.bench.tasks import get_task
from kvsqueeze.bench.tasks._common import count_tokens
from kvsqueeze.bench.tasks._sources import SOURCES
from kvsqueeze.bench.tasks.varied import FORMATS, NIAH_PHRASINGS, PASSKEY_PHRASINGS, format_value

VARIED = {"passkey_varied": PASSKEY_PHRASINGS, "niah_varied": NIAH_PHRASINGS}


@pytest.mark.parametrize("name", VARIED)
def test_sample_depends_only_on_seed_and_index(name: str, tokenizer: Any) -> None:
    task = get_task(name)
    six = task.samples(tokenizer, 400, 6, seed=7)
    assert six[:3] == get_task(name).samples(tokenizer, 400, 3, seed=7)
    assert [s.meta for s in six[:3]] == [s.meta for s in get_task(name).samples(tokenizer, 400, 3, seed=7)]
    other = task.samples(tokenizer, 400, 6, seed=8)
    assert [s.context for s in six] != [s.context for s in other]


@pytest.mark.parametrize(("name", "phrasings"), VARIED.items())
def test_every_source_phrasing_and_format_is_reached_and_balanced(name: str, phrasings: dict, tokenizer: Any) -> None:
    samples = get_task(name).samples(tokenizer, 300, 12, seed=0)
    counts = {key: Counter(s.meta[key] for s in samples) for key in ("source", "phrasing", "format")}
    assert counts["source"] == dict.fromkeys(SOURCES, 4)  # 12 samples, 3 sources: each 4 times
    assert counts["phrasing"] == dict.fromkeys(phrasings, 3)
    assert counts["format"] == dict.fromkeys(FORMATS, 4)
    assert len({(s.meta["source"], s.meta["phrasing"]) for s in samples}) >= 6  # not locked together


def test_passkey_needle_and_value_appear_exactly_once(tokenizer: Any) -> None:
    for sample in get_task("passkey_varied").samples(tokenizer, 600, 12, seed=1):
        value = sample.meta["value"]
        assert sample.context.count(sample.meta["needle"]) == 1 and sample.context.count(value) == 1
        assert re.findall(r"\d[\d,\-]*\d", sample.context) == [value]  # no other digit in the haystack
        phrasing = PASSKEY_PHRASINGS[sample.meta["phrasing"]]
        assert (sample.questions, sample.answer_prefix) == ((phrasing.question,), phrasing.prefix)


def test_niah_needles_appear_exactly_once_and_the_first_is_asked(tokenizer: Any) -> None:
    for sample in get_task("niah_varied", num_keys=4).samples(tokenizer, 800, 8, seed=2):
        phrasing = NIAH_PHRASINGS[sample.meta["phrasing"]]
        needles = sample.meta["needles"]
        assert len(needles) == 4 and len({v for _, v in needles}) == 4
        for key, value in needles:
            assert sample.context.count(phrasing.needle.format(key=key, value=value)) == 1
            assert sample.context.count(value) == 1 and sample.context.count(key) == 1
        key, value = needles[0]
        assert sample.questions == (phrasing.question.format(key=key),) and sample.answers[0][0] == value
        assert sample.answer_prefix == phrasing.prefix.format(key=key)


@pytest.mark.parametrize("name", VARIED)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("length", [128, 1000, 3000])
def test_lengths_within_5_percent_for_every_source(name: str, source: str, length: int, tokenizer: Any) -> None:
    for sample in get_task(name, sources=(source,)).samples(tokenizer, length, 2, seed=4):
        assert sample.meta["source"] == source
        assert abs(count_tokens(tokenizer, sample.context) - length) <= 0.05 * length


def test_grouped_and_dashed_answers_count_written_either_way(tokenizer: Any) -> None:
    samples = get_task("passkey_varied", formats="grouped, dashed").samples(tokenizer, 300, 4, seed=0)
    assert {s.meta["format"] for s in samples} == {"grouped", "dashed"}
    for sample in samples:
        shown, plain = sample.answers[0]
        assert re.fullmatch(r"\d{7}", plain) and shown == format_value(plain, sample.meta["format"])
        assert score(f"It is {shown}.", sample.answers[0], sample.metric) == 1.0
        assert score(f"It is {plain}.", sample.answers[0], sample.metric) == 1.0
        assert score(f"It is {plain[:-1]}.", sample.answers[0], sample.metric) == 0.0


def test_format_value_closed_forms() -> None:
    assert [format_value("4817263", f) for f in FORMATS] == ["4817263", "4,817,263", "481-7263"]
    assert format_value("123456789012", "grouped") == "123,456,789,012"


def test_options_restrict_the_draws(tokenizer: Any) -> None:
    task = get_task("niah_varied", sources=["python_docs"], phrasings=("ledger", "assigned"), formats=("digits",))
    samples = task.samples(tokenizer, 300, 4, seed=0)
    assert {s.meta["source"] for s in samples} == {"python_docs"}
    assert {s.meta["phrasing"] for s in samples} == {"ledger", "assigned"}
    assert all(len(s.answers[0]) == 1 for s in samples)  # digits: one reference


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("passkey_varied", {"sources": ("prose", "wiki")}, "sources"),
        ("passkey_varied", {"sources": ()}, "sources"),
        ("passkey_varied", {"sources": 3}, "sources"),
        ("passkey_varied", {"phrasings": ("assigned",)}, "phrasings"),  # a niah phrasing
        ("niah_varied", {"formats": ("roman",)}, "formats"),
        ("niah_varied", {"num_keys": 0}, "num_keys"),
        ("passkey_varied", {"digits": 4}, "digits"),
        ("passkey_varied", {"depth": -0.1}, "depth"),
    ],
)
def test_bad_options_raise_naming_the_option(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_task(name, **options)


def test_too_short_a_context_is_refused(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="length"):
        get_task("passkey_varied").samples(tokenizer, 40, 1)


@pytest.mark.parametrize(
    ("name", "digest"),
    [
        ("passkey", "1024fd2939cf32a5"),
        ("niah_single", "a9bf5efc07ea2f9e"),
        ("niah_multikey", "3aa0b0a008a02176"),
        ("multiturn", "bba5ca2b49404f44"),
    ],
)
def test_the_original_tasks_give_the_samples_they_gave_before_the_varied_ones(
    name: str, digest: str, tokenizer: Any
) -> None:
    """Recorded before the varied tasks were added: their names keep their samples for a seed (tiny tokenizer)."""
    h = hashlib.sha256()
    for s in get_task(name).samples(tokenizer, 600, 2, seed=5):
        h.update(repr((s.context, s.questions, s.answers, s.answer_prefix)).encode())
    assert h.hexdigest()[:16] == digest
