"""Real English text that ships with Python itself, read at run time and never fetched, and the calibration texts
built from it:

- "python_docs": the language reference topics that `help()` shows, from the standard library's `pydoc_data.topics`;
- "docstrings": the docstrings of a fixed list of pure-Python standard library modules, their public classes, the
  classes' public methods and the modules' public functions, read from the modules' source files (never from the
  imported modules, which other libraries may have patched).

Cleaning keeps prose only: headings, indented blocks (code, grammar rules), tables and doctest lines are dropped,
emphasis markers are removed, and only sentences that start with a capital letter, end with a full stop, hold no
digit and no code characters are kept (about 30k tokens of python_docs and 25k of docstrings for a
4-characters-per-token tokenizer). The benchmark's haystacks (`bench.tasks._sources`) and the calibration of the
calibrated methods (`calibration_text`, their `text` option) read it from here.

The real text is that of the running Python: another Python version may give other text for the same seed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import itertools
import random
import re
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from kvsqueeze.text import generic_paragraphs, generic_text, joined_paragraphs
from kvsqueeze.validation import check_choice, check_int

REAL_SOURCES = ("python_docs", "docstrings")
CALIBRATION_TEXTS = ("generic", *REAL_SOURCES, "mixed")
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


def _source_docs(source: str) -> Iterator[str | None]:
    """The docstrings of a module's source: the module's, then those of its public classes and functions by name,
    each class followed by its public methods' by name. Read from the source, not from the imported module, so that
    the text never depends on what else the process imported (torch, for one, replaces `inspect.getfile`)."""
    tree = ast.parse(source)
    yield ast.get_docstring(tree, clean=False)
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for name, node in sorted({n.name: n for n in tree.body if isinstance(n, kinds)}.items()):
        if name.startswith("_"):
            continue
        yield ast.get_docstring(node, clean=False)
        if isinstance(node, ast.ClassDef):
            methods = {m.name: m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
            yield from (ast.get_docstring(m, clean=False) for n, m in sorted(methods.items()) if not n.startswith("_"))


def _docstrings() -> Iterator[str]:
    for name in DOCSTRING_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # a build without that module (or without its source): its text is simply absent
        source = Path(spec.origin).read_text(encoding="utf-8")
        yield from (inspect.cleandoc(doc) for doc in _source_docs(source) if doc)


def _python_docs() -> Iterator[str]:
    yield from (topics[name] for name in sorted(topics))


@functools.cache
def paragraphs(source: str) -> Paragraphs:
    """The cleaned paragraphs of a real-text source ('python_docs' or 'docstrings'), read once per process."""
    check_choice("source", source, REAL_SOURCES)
    texts = _python_docs() if source == "python_docs" else _docstrings()
    found = tuple(p for text in texts for p in prose_sentences(text))
    if not found:
        raise ValueError(f"text source {source!r} has no text in this Python (no standard-library source?)")
    return found


def calibration_text(tokenizer: Any, n_tokens: int, seed: int = 0, text: str = "generic") -> str:
    """At least `n_tokens` tokens of `tokenizer` (special tokens not counted) of calibration text, whole paragraphs
    joined by blank lines, at most one paragraph more than needed:

    - "generic": the invented prose of `kvsqueeze.text.generic_text` (what every calibrated method read before this
      option existed);
    - "python_docs" / "docstrings": the real text, from a paragraph drawn from `seed` on, wrapping around at its end;
    - "mixed": paragraphs taken in turn from python_docs, docstrings and the generic prose (each from its own start).
    """
    check_choice("text", text, CALIBRATION_TEXTS)
    check_int("n_tokens", n_tokens, 1)
    if text == "generic":
        return generic_text(tokenizer, n_tokens, seed)
    rng = random.Random(f"calibration:{seed}")
    streams = {name: _from(paragraphs(name), rng) for name in REAL_SOURCES}
    if text == "mixed":
        generic = generic_paragraphs(seed)
        chosen: Iterator[str] = (next(s) for s in itertools.cycle([*streams.values(), generic]))
    else:
        chosen = streams[text]
    return joined_paragraphs(tokenizer, n_tokens, chosen)


def _from(text: tuple[tuple[str, ...], ...], rng: random.Random) -> Iterator[str]:
    """The paragraphs of `text` as strings, from one drawn from `rng` on, wrapping around for ever."""
    start = rng.randrange(len(text))
    return (" ".join(text[(start + i) % len(text)]) for i in itertools.count())
