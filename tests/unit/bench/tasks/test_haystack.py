"""The invented prose haystack: varied, digit-free, reproducible, needles at their depths."""

from __future__ import annotations

import random
import re

from kvsqueeze.bench.tasks._haystack import ANIMALS, OBJECTS, PLACES, WEATHER, Haystack, sentence
from kvsqueeze.bench.tasks.qa import PRODUCTS


def test_prose_is_varied_and_has_no_digits() -> None:
    rng = random.Random(0)
    sentences = [sentence(rng) for _ in range(500)]
    assert len(set(sentences)) > 490  # not one sentence repeated
    assert not any(re.search(r"\d", s) for s in sentences)  # digits in a context always belong to a needle
    assert all(s[0].isupper() and s.endswith(".") for s in sentences)


def test_same_seed_same_text() -> None:
    assert Haystack(random.Random(3)).render(50) == Haystack(random.Random(3)).render(50)
    assert Haystack(random.Random(3)).render(50) != Haystack(random.Random(4)).render(50)


def test_text_grows_by_prefix() -> None:
    hay = Haystack(random.Random(1))
    longer = hay.render(40)
    assert longer.startswith(hay.render(20).rstrip("."))
    assert "\n\n" in longer  # paragraphs


def test_needles_sit_at_their_depths() -> None:
    hay = Haystack(random.Random(2))
    text = hay.render(100, [(0.0, "FIRST."), (1.0, "LAST."), (0.5, "MIDDLE.")])
    assert text.startswith("FIRST.") and text.endswith("LAST.")
    middle = text.index("MIDDLE.") / len(text)
    assert 0.4 < middle < 0.6
    assert text.count("MIDDLE.") == 1


def test_phrase_vocabularies_are_split_into_phrases() -> None:
    assert all(p.startswith("the ") for p in PLACES)
    assert all(" " in phrase for phrase in (*WEATHER, *OBJECTS, *ANIMALS, *PRODUCTS))
