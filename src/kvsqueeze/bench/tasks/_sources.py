"""Haystacks from several sources: the invented prose of `_haystack.py`, and real English text that ships with
Python itself (`kvsqueeze.corpus`: the language reference topics, "python_docs", and standard library docstrings,
"docstrings"), read at run time and never fetched.

- "prose": the invented chronicle of towns and people of `_haystack.py`, in paragraphs of 3 to 7 sentences;
- "python_docs", "docstrings": the cleaned prose of `kvsqueeze.corpus` (every digit of a context then belongs to a
  needle).

A passage starts at a paragraph drawn from the sample's generator and runs on in order, wrapping around at the end
of the text (longer contexts repeat text). For every source the length unit is the word, so even short token budgets
are met within 1 to 2%; needles go at the sentence boundary nearest their depth, and the last sentence may be cut
where the budget ends (as RULER cuts its essays).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvsqueeze.bench.tasks._haystack import sentence
from kvsqueeze.corpus import REAL_SOURCES, Paragraphs, paragraphs
from kvsqueeze.validation import check_choice

SOURCES = ("prose", *REAL_SOURCES)


def cycle(text: Paragraphs, start: int) -> Iterator[tuple[str, ...]]:
    """The paragraphs of `text` from paragraph `start` on, in order, wrapping around for ever."""
    return (text[(start + i) % len(text)] for i in itertools.count())


def invented(rng: random.Random) -> Iterator[tuple[str, ...]]:
    """Endless paragraphs of 3 to 7 sentences of invented prose (`_haystack.sentence`) drawn from `rng`."""
    while True:
        yield tuple(sentence(rng) for _ in range(rng.randint(3, 7)))


@dataclass
class Passage:
    """Text read from an endless stream of paragraphs (tuples of sentences).

    `render(k, needles)` writes its first `k` words, with each `(depth, text)` needle at the boundary between whole
    sentences nearest word `depth * k` (0 = before the first word); the last sentence may be cut at word `k`.
    """

    paragraphs: Iterator[tuple[str, ...]]
    _words: list[str] = field(default_factory=list)
    _ends: list[int] = field(default_factory=list)  # after each word: 0 inside a sentence, 1 its end, 2 paragraph end

    def _grow(self, k: int) -> None:
        while len(self._words) < k:
            paragraph = next(self.paragraphs)
            for i, text in enumerate(paragraph):
                words = text.split()
                self._words += words
                self._ends += [0] * (len(words) - 1) + [2 if i == len(paragraph) - 1 else 1]

    def render(self, k: int, needles: Sequence[tuple[float, str]] = ()) -> str:
        self._grow(k)
        boundaries = [0] + [i + 1 for i in range(k) if self._ends[i]]
        at: dict[int, list[str]] = {}
        for depth, text in needles:
            at.setdefault(min(boundaries, key=lambda b: (abs(b - depth * k), b)), []).append(text)
        parts: list[str] = []
        for i in range(k + 1):
            for text in at.get(i, []):
                parts += [text, " "]
            if i < k:
                parts += [self._words[i], "\n\n" if self._ends[i] == 2 else " "]
        return "".join(parts).strip()


def haystack(source: str, rng: random.Random) -> Passage:
    """A haystack of `source` (one of SOURCES) drawn from `rng`: invented paragraphs, or where a passage of real
    text starts."""
    check_choice("source", source, SOURCES)
    if source == "prose":
        return Passage(invented(rng))
    text = paragraphs(source)
    return Passage(cycle(text, rng.randrange(len(text))))
