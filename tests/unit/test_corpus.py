"""The real text that ships with Python (its language reference and docstrings, cleaned to digit-free prose) and the
calibration texts built from it: deterministic per seed, as long as asked, every source reachable."""

from __future__ import annotations

import inspect
import re

import pytest
from transformers import AutoTokenizer

from kvsqueeze.corpus import CALIBRATION_TEXTS, calibration_text, paragraphs, prose_sentences
from kvsqueeze.text import generic_text

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


def test_docstrings_do_not_depend_on_what_the_process_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    before = paragraphs("docstrings")

    def getfile(obj: object) -> str:
        """A replacement with other text, as torch installs one when torch.package is imported."""
        return "elsewhere"

    monkeypatch.setattr(inspect, "getfile", getfile)
    paragraphs.cache_clear()
    try:
        assert paragraphs("docstrings") == before  # read from the modules' source, not from the live modules
    finally:
        paragraphs.cache_clear()


def test_generic_calibration_text_is_the_generic_prose() -> None:
    assert calibration_text(None, 2000, seed=3) == generic_text(None, 2000, seed=3)


@pytest.mark.parametrize("text", CALIBRATION_TEXTS)
def test_calibration_text_is_deterministic_long_enough_and_seeded(text: str) -> None:
    first = calibration_text(None, 5000, seed=1, text=text)  # tokenizer None: characters are counted
    assert first == calibration_text(None, 5000, seed=1, text=text)
    assert first != calibration_text(None, 5000, seed=2, text=text)
    parts = first.split("\n\n")
    assert len(first) >= 5000
    # at most one paragraph more than needed, as counted while adding them (a paragraph and one separator each)
    assert sum(len(p) + 1 for p in parts[:-1]) < 5000


def test_calibration_text_counts_tokens_of_the_tokenizer(tokenizer: AutoTokenizer) -> None:
    text = calibration_text(tokenizer, 700, seed=0, text="python_docs")
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 700


def test_mixed_text_takes_paragraphs_from_every_source_in_turn() -> None:
    mixed = calibration_text(None, 20_000, seed=0, text="mixed").split("\n\n")
    real = {name: {" ".join(p) for p in paragraphs(name)} for name in ("python_docs", "docstrings")}
    assert mixed[0] in real["python_docs"] and mixed[1] in real["docstrings"]
    assert mixed[2] not in real["python_docs"] | real["docstrings"]  # the generic prose
    assert mixed[3] in real["python_docs"] and mixed[5] not in real["python_docs"] | real["docstrings"]


def test_unknown_calibration_text_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"text must be one of 'generic'.*'mixed', got 'essays'"):
        calibration_text(None, 100, text="essays")
    with pytest.raises(ValueError, match="n_tokens"):
        calibration_text(None, 0, text="mixed")
