"""RULER string-match scoring: fraction of references found ("all"), any reference found ("any")."""

from __future__ import annotations

import pytest

from kvsqueeze.bench.metrics import normalize, question_scores, sample_score, score
from kvsqueeze.bench.tasks import Sample


def test_all_is_the_fraction_of_references_found() -> None:
    refs = ["1234567", "7654321", "1111111", "2222222"]
    assert score("1234567, 7654321 and 1111111", refs, "all") == 0.75
    assert score("1234567 7654321 1111111 2222222", refs, "all") == 1.0
    assert score("none of them", refs, "all") == 0.0


def test_any_is_one_if_a_reference_is_found() -> None:
    assert score("The mayor is Ada Ashby.", ["Ada Ashby", "Ashby"], "any") == 1.0
    assert score("The mayor is Ashby.", ["Ada Ashby", "Ashby"], "any") == 1.0
    assert score("The mayor is Ada.", ["Ada Ashby", "Ashby"], "any") == 0.0


def test_default_metric_is_all() -> None:
    assert score("a b", ["a", "c"]) == 0.5


def test_case_and_whitespace_are_normalized() -> None:
    assert score("the  AMBER\n\tlantern", ["Amber Lantern"], "all") == 1.0
    assert score("Amber Lantern", ["  amber   lantern "], "any") == 1.0
    assert normalize("  A\u00a0B\n\nC ") == "a b c"


def test_unicode_is_normalized() -> None:
    assert score("STRASSE", ["straße"]) == 1.0  # case folding
    assert score("ﬁre", ["fire"]) == 1.0  # NFKC: the ligature is two letters
    assert score("café", ["cafe\u0301"]) == 1.0  # composed and decomposed forms match
    assert score("Zoë", ["zoe"]) == 0.0  # accents are not stripped


def test_empty_prediction_scores_zero() -> None:
    assert score("", ["x"], "all") == 0.0
    assert score("", ["x"], "any") == 0.0
    assert score("   \n", ["x", "y"], "all") == 0.0


def test_substring_match_counts_like_ruler() -> None:
    assert score("12345678", ["1234567"]) == 1.0  # containment, not equality


@pytest.mark.parametrize("refs", [[], ()])
def test_empty_references_raise(refs: list[str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        score("x", refs)


def test_blank_reference_or_bare_string_raise() -> None:
    with pytest.raises(ValueError, match="blank"):
        score("x", ["a", "  "])
    with pytest.raises(ValueError, match="list of strings"):
        score("x", "abc")


def test_unknown_metric_raises() -> None:
    with pytest.raises(ValueError, match="'all', 'any'"):
        score("x", ["x"], "exact")


def test_sample_scores_are_per_question_and_averaged() -> None:
    sample = Sample("t", 0, "ctx", ("q1", "q2"), (("a", "b"), ("c",)), metric="all")
    assert question_scores(sample, ["a", "c"]) == [0.5, 1.0]
    assert sample_score(sample, ["a b", "nothing"]) == 0.5
    with pytest.raises(ValueError, match="2 questions, got 1"):
        question_scores(sample, ["a"])
    with pytest.raises(ValueError, match="2 questions"):
        question_scores(sample, "a c")
