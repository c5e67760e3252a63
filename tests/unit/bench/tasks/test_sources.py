"""Haystack sources: Python's own documentation and docstrings cleaned to digit-free prose, passages that grow word
by word with needles at sentence boundaries, one factory for every source."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from kvsqueeze.bench.tasks._sources import SOURCES, Passage, cycle, haystack, invented, paragraphs, prose_sentences

DOC = """The "frob" statement
********************

Frobbing is done with the frob statement. It takes *one* argument and returns nothing. It is short.

   frob_stmt ::= "frob" expression

>>> frob(3)

Since version 3.9 it is faster. Each call is logged in the manual. See also
the section on twiddling, which explains more.

+------+------+
| a    | b    |
+------+------+
"""


def test_cleaning_keeps_prose_sentences_only() -> None:
    assert list(prose_sentences(DOC)) == [
        ("Frobbing is done with the frob statement.", "It takes one argument and returns nothing."),  # no emphasis
        ("Each call is logged in the manual.", "See also the section on twiddling, which explains more."),
    ]  # heading, grammar rule, doctest, table, a sentence with a digit and one too short to hide anything are gone


@pytest.mark.parametrize("source", ["python_docs", "docstrings"])
def test_real_text_is_large_digit_free_and_made_of_sentences(source: str) -> None:
    text = paragraphs(source)
    sentences = [s for p in text for s in p]
    assert len(sentences) > 500 and sum(map(len, sentences)) > 50_000  # several thousand tokens before repeating
    assert not any(re.search(r"\d", s) for s in sentences)  # every digit of a context belongs to a needle
    assert all(s[0].isupper() and s.endswith(".") and ">>>" not in s and "::=" not in s for s in sentences)
    assert paragraphs(source) is text  # read once per process


def test_passage_grows_word_by_word_and_wraps_around() -> None:
    text = (("One two three.", "Four five."), ("Six seven eight nine.",))
    passage = Passage(cycle(text, 1))
    assert passage.render(3) == "Six seven eight"  # the last sentence may be cut
    assert passage.render(9) == "Six seven eight nine.\n\nOne two three. Four five."
    assert Passage(cycle(text, 0)).render(9) == "One two three. Four five.\n\nSix seven eight nine."
    assert Passage(cycle(text, 0)).render(14).endswith("nine.\n\nOne two three. Four five.")  # round again


def test_passage_needles_sit_between_whole_sentences() -> None:
    text = (("One two three.", "Four five."), ("Six seven eight nine.",))
    passage = Passage(cycle(text, 0))
    assert passage.render(9, [(0.0, "FIRST.")]).startswith("FIRST. One two")
    assert passage.render(9, [(1.0, "LAST.")]).endswith("nine.\n\nLAST.")
    assert "three. MID. Four" in passage.render(9, [(0.3, "MID.")])  # word 2.7: the boundary after word 3
    assert passage.render(7, [(1.0, "END.")]) == "One two three. Four five.\n\nEND. Six seven"  # not after a cut


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_is_reproducible_from_its_generator(source: str) -> None:
    first = haystack(source, random.Random(1)).render(200)
    assert first == haystack(source, random.Random(1)).render(200)
    assert first != haystack(source, random.Random(2)).render(200)


def test_invented_prose_comes_in_paragraphs_of_three_to_seven_sentences() -> None:
    paragraphs = list(itertools.islice(invented(random.Random(0)), 50))
    assert {len(p) for p in paragraphs} <= set(range(3, 8)) and len({len(p) for p in paragraphs}) > 2
    assert all(s.endswith(".") and not re.search(r"\d", s) for p in paragraphs for s in p)
    assert haystack("prose", random.Random(5)).render(300).count("\n\n") >= 3


def test_unknown_source_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="python_docs"):
        haystack("wikipedia", random.Random(0))
