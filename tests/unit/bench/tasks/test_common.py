"""Shared task helpers: per-sample generators, spread depths, values, and fitting to a token budget."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from kvsqueeze.bench.tasks._common import (
    COMMON_WORDS,
    balanced_choice,
    count_tokens,
    fit,
    make_values,
    sample_rng,
    spread_depth,
)


def test_spread_depths_cover_the_unit_interval_evenly() -> None:
    assert [spread_depth(i) for i in range(5)] == [0.0, 1.0, 0.5, 0.25, 0.75]
    depths = sorted(spread_depth(i) for i in range(9))
    assert depths == [i / 8 for i in range(9)]
    assert all(0.0 <= spread_depth(i) <= 1.0 for i in range(200))


def test_sample_rng_is_reproducible_and_distinct() -> None:
    assert sample_rng("a", 0, 1).random() == sample_rng("a", 0, 1).random()
    draws = {sample_rng(t, s, i).random() for t in ("a", "b") for s in (0, 1) for i in (0, 1)}
    assert len(draws) == 8


def test_balanced_choice_uses_each_option_once_per_block_in_seeded_orders() -> None:
    options = ("a", "b", "c")
    picks = [balanced_choice(options, "t", 0, i, "x") for i in range(30)]
    assert all(sorted(picks[i : i + 3]) == list(options) for i in range(0, 30, 3))
    assert len({tuple(picks[i : i + 3]) for i in range(0, 30, 3)}) > 1  # blocks are shuffled differently
    assert picks == [balanced_choice(options, "t", 0, i, "x") for i in range(30)]
    assert picks != [balanced_choice(options, "t", 1, i, "x") for i in range(30)]  # the seed matters


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("numbers", r"\d{7}"),
        ("words", r"[a-z]+-[a-z]+"),
        ("uuids", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"),
    ],
)
def test_values_have_their_format_and_are_distinct(kind: str, pattern: str) -> None:
    values = make_values(random.Random(0), kind, 50)
    assert len(set(values)) == 50
    assert all(re.fullmatch(pattern, v) for v in values)
    avoid = set(values[:10])
    assert not avoid & set(make_values(random.Random(0), kind, 10, avoid=avoid))


def test_word_pool_is_large_and_distinct() -> None:
    assert len(COMMON_WORDS) == len(set(COMMON_WORDS)) >= 500
    assert all(re.fullmatch(r"[a-z]+", w) for w in COMMON_WORDS)


def test_fit_lands_within_one_percent_or_on_the_closest_count(tokenizer: Any) -> None:
    for length in (50, 300, 1234):
        text, n = fit(tokenizer, length, lambda k: "word " * k, length, "test")
        assert n == count_tokens(tokenizer, text)
        best = min(abs(count_tokens(tokenizer, "word " * k) - length) for k in range(0, 2 * length))
        assert abs(n - length) <= max(best, 0.01 * length)


def test_fit_tokenizes_only_a_few_times(tokenizer: Any) -> None:
    calls = []

    def make(k: int) -> str:
        calls.append(k)
        return "The grass is green. " * k

    fit(tokenizer, 4000, make, 4000 // 5, "test")
    assert len(calls) <= 6


def test_fit_is_not_misled_by_a_bad_guess(tokenizer: Any) -> None:
    for guess in (1, 5000):
        _, n = fit(tokenizer, 500, lambda k: "alpha beta " * k, guess, "test")
        assert abs(n - 500) <= 25


def test_fit_raises_when_the_fixed_part_is_too_long(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"length >= \d+"):
        fit(tokenizer, 10, lambda k: "a long fixed header that does not fit " * 5 + "x" * k, 1, "test")
