"""Haystacks from several sources: the invented prose of `_haystack.py`, and real English text that ships with
Python itself, read at run time and never fetched:

- "prose": the invented chronicle of towns and people of `_haystack.py`, in paragraphs of 3 to 7 sentences;
- "python_docs": the language reference topics that `help()` shows, from the standard library's `pydoc_data.topics`;
- "docstrings": the docstrings of a fixed list of pure-Python standard library modules, their public classes, the
  classes' public methods and the modules' public functions.

Cleaning keeps prose only: headings, indented blocks (code, grammar rules), tables and doctest lines are dropped,
emphasis markers are removed, and only sentences that start with a capital letter, end with a full stop, hold no
digit (every digit of a context belongs to a needle) and no code characters are kept. A passage starts at a paragraph
drawn from the sample's generator and runs on in order, wrapping around at the end of the text (about 30k tokens of
python_docs and 25k of docstrings for a 4-characters-per-token tokenizer; longer contexts repeat text). For every
source the length unit is the word, so even short token budgets are met within 1 to 2%; needles go at the sentence
boundary nearest their depth, and the last sentence may be cut where the budget ends (as RULER cuts its essays).

The real text is that of the running Python: another Python version may give other text for the same seed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pydoc_data.topics import topics
from types import ModuleType

from kvsqueeze.bench.tasks._haystack import sentence
from kvsqueeze.validation import check_choice

SOURCES = ("prose", "python_docs", "docstrings")
DOCSTRING_MODULES = (
    "argparse", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses", "difflib", "email.message",
    "enum", "fractions", "functools", "heapq", "inspect", "json", "logging", "pathlib", "pickle", "pprint", "queue",
    "random", "sched", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "unittest.case", "urllib.parse", "zipfile",
)  # fmt: skip
_HEADING = re.compile(r"^\s*([*=\-~^#\"'+])\1{2,}\s*$")  # a line of one repeated mark underlines a heading
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_EMPHASIS = re.compile(r"\*+([^*\s][^*]*?)\*+")
_CODE = re.compile(r"::=|>>>|[{}\[\]<>=*@$`|\\]|__\w|\w_\w|\(\)|\.\w+\(|\w\.\w")
Paragraphs = tuple[tuple[str, ...], ...]


def prose_sentences(text: str) -> Iterator[tuple[str, ...]]:
    """The paragraphs of plain documentation text, as tuples of the sentences kept (see the module docstring)."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if any(_HEADING.match(line) for line in lines) or lines[0][:1].isspace():
            continue
        if lines[0].startswith(("+", "|", ">>>", "...")):
            continue
        paragraph = _EMPHASIS.sub(r"\1", re.sub(r"^[*\-] ", "", " ".join(line.strip() for line in lines)))
        kept = tuple(s for s in (" ".join(s.split()) for s in _SENTENCE_END.split(paragraph)) if _is_prose(s))
        if kept:
            yield kept


def _is_prose(sentence: str) -> bool:
    return (
        30 <= len(sentence) <= 400
        and sentence[0].isupper()
        and sentence.endswith(".")
        and not any(c.isdigit() for c in sentence)
        and not _CODE.search(sentence)
    )


def _module_docs(module: ModuleType) -> Iterator[str | None]:
    yield module.__doc__
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        yield obj.__doc__
        if inspect.isclass(obj):
            yield from (m.__doc__ for n, m in sorted(vars(obj).items()) if not n.startswith("_") and callable(m))


def _docstrings() -> Iterator[str]:
    for name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a build without that module: its text is simply absent
            continue
        yield from (inspect.cleandoc(doc) for doc in _module_docs(module) if doc)


def _python_docs() -> Iterator[str]:
    yield from (topics[name] for name in sorted(topics))


@functools.cache
def paragraphs(source: str) -> Paragraphs:
    """The cleaned paragraphs of a real-text source ('python_docs' or 'docstrings'), read once per process."""
    check_choice("source", source, SOURCES[1:])
    texts = _python_docs() if source == "python_docs" else _docstrings()
    found = tuple(p for text in texts for p in prose_sentences(text))
    if not found:
        raise ValueError(f"haystack source {source!r} has no text in this Python (are docstrings stripped by -OO?)")
    return found


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
