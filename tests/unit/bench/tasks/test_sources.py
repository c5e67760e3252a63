"""Haystack sources: passages that grow word by word with needles at sentence boundaries, one factory for every source
(the real text itself is tested in tests/unit/test_corpus.py)."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from kvsqueeze.bench.tasks._sources import SOURCES, Passage, cycle, haystack, invented


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
