"""What each task family promises beyond the shared checks: needle counts, chains, word frequencies, distractors,
depths and options."""

from __future__ import annotations

import collections
import re
from typing import Any

import pytest

from kvsqueeze.bench.tasks import get_task
from kvsqueeze.bench.tasks.cwe import INTRO as CWE_INTRO
from kvsqueeze.bench.tasks.fwe import INTRO as FWE_INTRO
from kvsqueeze.bench.tasks.fwe import zipf_counts


def _needles(context: str) -> list[tuple[str, str]]:
    return re.findall(r"One of the special magic \w+s for (\S+) is: (\S+)\.", context)


@pytest.mark.parametrize("values", ["numbers", "words", "uuids"])
def test_niah_single_has_one_needle_of_the_asked_type(values: str, tokenizer: Any) -> None:
    sample = get_task("niah_single", values=values).samples(tokenizer, 1000, 2)[1]
    needles = _needles(sample.context)
    assert len(needles) == 1 and sample.answers == ((needles[0][1],),)
    assert needles[0][0] in sample.questions[0] and needles[0][0] in sample.answer_prefix
    assert sample.max_new_tokens >= 8 + (40 if values == "uuids" else 10)


def test_niah_keys_option(tokenizer: Any) -> None:
    sample = get_task("niah_single", keys="uuids").samples(tokenizer, 1000, 1)[0]
    assert re.fullmatch(r"[0-9a-f-]{36}", _needles(sample.context)[0][0])


def test_niah_multikey_asks_one_of_several_keys(tokenizer: Any) -> None:
    sample = get_task("niah_multikey", num_keys=5).samples(tokenizer, 1500, 1)[0]
    needles = _needles(sample.context)
    assert len(needles) == 5 and len({k for k, _ in needles}) == 5
    asked = [(k, v) for k, v in needles if k in sample.questions[0]]
    assert len(asked) == 1 and sample.answers == ((asked[0][1],),)


def test_niah_multivalue_asks_every_value_of_one_key(tokenizer: Any) -> None:
    sample = get_task("niah_multivalue", num_values=3).samples(tokenizer, 1500, 1)[0]
    needles = _needles(sample.context)
    assert len({k for k, _ in needles}) == 1 and len(needles) == 3
    assert sorted(sample.answers[0]) == sorted(v for _, v in needles)


def test_niah_multiquery_asks_every_key_in_one_question(tokenizer: Any) -> None:
    sample = get_task("niah_multiquery", num_queries=3).samples(tokenizer, 1500, 1)[0]
    needles = _needles(sample.context)
    assert len(sample.questions) == 1 and all(k in sample.questions[0] for k, _ in needles)
    assert sorted(sample.answers[0]) == sorted(v for _, v in needles)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_depth_option_places_the_needle(depth: float, tokenizer: Any) -> None:
    for name in ("niah_single", "passkey"):
        for sample in get_task(name, depth=depth).samples(tokenizer, 2000, 2):
            answer = sample.answers[0][0]
            first = sample.context.index(answer) / len(sample.context)
            assert abs(first - depth) < 0.1, (name, depth, first)
            assert sample.meta["depth"] == depth
    for sample in get_task("qa", depth=depth).samples(tokenizer, 3000, 2):
        docs = sample.context.split("Document ")[1:]
        gold = [i for i, d in enumerate(docs) if f"of {sample.meta['town']} hold" in d]
        assert len(gold) == 1 and abs(gold[0] / (len(docs) - 1) - depth) < 0.1, (gold, len(docs))


def test_depths_spread_over_samples_by_default(tokenizer: Any) -> None:
    samples = get_task("niah_single").samples(tokenizer, 1000, 5)
    assert [s.meta["depth"] for s in samples] == [0.0, 1.0, 0.5, 0.25, 0.75]


def test_vt_chain_is_complete_and_in_order(tokenizer: Any) -> None:
    sample = get_task("vt", num_chains=2, num_hops=3).samples(tokenizer, 1500, 1)[0]
    value = sample.meta["value"]
    bound = {m[0]: m[1] for m in re.findall(r"VAR (\w+) = (\d+|VAR \w+)\.", sample.context)}
    assert len(bound) == 8  # 2 chains of 4 variables
    resolved = {}
    for name in bound:
        target = name
        while bound[target].startswith("VAR "):
            target = bound[target][4:]
        resolved[name] = bound[target]
    assert sorted(n for n, v in resolved.items() if v == value) == sorted(sample.answers[0])
    positions = [sample.context.index(f"VAR {n} =") for n in sample.answers[0]]
    assert positions == sorted(positions)  # each assignment comes after the one it copies


def _entries(context: str, intro: str) -> list[str]:
    return context.removeprefix(intro).split()


def test_cwe_common_words_are_the_most_frequent(tokenizer: Any) -> None:
    sample = get_task("cwe", num_common=4, freq_common=12, freq_uncommon=2).samples(tokenizer, 1500, 1)[0]
    words = [line.split(". ", 1)[1] for line in sample.context.removeprefix(CWE_INTRO).strip().splitlines()]
    counts = collections.Counter(words)
    assert all(counts[w] == 12 for w in sample.answers[0])
    assert max(c for w, c in counts.items() if w not in sample.answers[0]) <= 2
    assert [line.split(". ")[0] for line in sample.context.removeprefix(CWE_INTRO).strip().splitlines()][:3] == [
        "1", "2", "3",
    ]  # fmt: skip


def test_fwe_top_three_are_strictly_most_frequent(tokenizer: Any) -> None:
    sample = get_task("fwe").samples(tokenizer, 1500, 1)[0]
    counts = collections.Counter(_entries(sample.context, FWE_INTRO)).most_common()
    assert tuple(w for w, _ in counts[:3]) == sample.answers[0]
    assert counts[2][1] > counts[3][1]


def test_zipf_counts_sum_and_decrease() -> None:
    counts = zipf_counts(1000, 2.0)
    assert sum(counts) == 1000 and counts == sorted(counts, reverse=True)
    assert 550 < counts[0] < 660  # 1000 / zeta(2) ~ 608


@pytest.mark.parametrize("fact", ["mayor", "river", "product", "month"])
def test_qa_answer_is_only_in_the_answering_document(fact: str, tokenizer: Any) -> None:
    sample = get_task("qa", fact=fact).samples(tokenizer, 2500, 2)[1]
    docs = sample.context.split("Document ")[1:]
    assert len(docs) >= 5
    town = sample.meta["town"]
    gold = [d for d in docs if f"of {town} hold" in d]
    assert len(gold) == 1
    full = sample.answers[0][0]
    assert full in gold[0]
    fact_lines = [s for d in docs if d is not gold[0] for s in d.split(". ")[:4]]
    assert not any(full in s for s in fact_lines)  # no distractor document states the answer as its own fact


def test_multiturn_asks_each_needle_once(tokenizer: Any) -> None:
    sample = get_task("multiturn", num_questions=3).samples(tokenizer, 1500, 1)[0]
    needles = _needles(sample.context)
    assert len(sample.questions) == 3 == len(needles)
    assert sorted(needles) == sorted(sample.meta["needles"])
    for (key, value), question, refs in zip(sample.meta["needles"], sample.questions, sample.answers, strict=True):
        assert key in question and refs == (value,)
    assert not any(k in sample.answer_prefix for k, _ in needles)  # one prefix serves every question


@pytest.mark.parametrize("filler", ["repeat", "prose"])
def test_passkey_fillers(filler: str, tokenizer: Any) -> None:
    sample = get_task("passkey", filler=filler, digits=6).samples(tokenizer, 1000, 1)[0]
    key = sample.answers[0][0]
    assert re.fullmatch(r"\d{6}", key)
    assert f"The pass key is {key}." in sample.context
    assert ("The grass is green." in sample.context) == (filler == "repeat")
