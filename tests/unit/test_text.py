"""Generic text: deterministic for a seed, varied (sentences rarely repeat), and as long as asked."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from kvsqueeze.text import generic_paragraphs, generic_text


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.])\s+", text) if s]


def test_same_seed_same_text_other_seed_other_text():
    first = list(itertools.islice(generic_paragraphs(3), 20))
    assert first == list(itertools.islice(generic_paragraphs(3), 20))
    assert first != list(itertools.islice(generic_paragraphs(4), 20))


def test_sentences_are_varied():
    text = "\n\n".join(itertools.islice(generic_paragraphs(0), 400))
    found = sentences(text)
    assert len(found) > 2000
    counts = Counter(found)
    assert counts.most_common(1)[0][1] <= 3  # no sentence repeated more than a few times
    assert len(counts) / len(found) > 0.97
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    assert len(words) > 300  # a broad vocabulary, not a handful of words


def test_paragraphs_look_like_prose():
    for paragraph in itertools.islice(generic_paragraphs(1), 50):
        found = sentences(paragraph)
        assert 4 <= len(found) <= 8
        assert all(s[0].isupper() and s[-1] == "." for s in found)
        assert "{" not in paragraph and "  " not in paragraph
        assert not re.search(r"\ba [aeiou]", paragraph)  # "an old", never "a old"


@pytest.mark.parametrize("n", [1, 50, 700])
def test_length_in_tokens(tokenizer, n):
    text = generic_text(tokenizer, n, seed=2)
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in text.split("\n\n"))
    assert n <= count <= n + longest + 2  # whole paragraphs: at most about one paragraph more than needed
    assert text == generic_text(tokenizer, n, seed=2)


def test_length_in_characters_without_tokenizer():
    text = generic_text(None, 5000, seed=0)
    assert 5000 <= len(text) < 5000 + 1500
    assert text.startswith(next(generic_paragraphs(0)))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_length(bad):
    with pytest.raises(ValueError, match=r"n_tokens must be an integer >= 1, got"):
        generic_text(None, bad)
