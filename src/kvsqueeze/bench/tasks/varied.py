"""Needle tasks whose text varies from sample to sample, so that a score says how a method does on text written in
different ways rather than on one generator's habits:

- passkey_varied: one number hidden in the haystack, asked back (the passkey task, varied);
- niah_varied: a number stored under a key, among `num_keys - 1` distractors with other keys (niah_single /
  niah_multikey, varied).

Per sample, from generators seeded by (task, seed, index): the haystack source (`_sources.SOURCES`: invented prose,
Python's language reference, standard library docstrings), the needle's phrasing with its matching question and
answer prefix, and the value format (digits "4817263", grouped "4,817,263" or dashed "481-7263"). Each choice is
balanced: every block of as many samples as there are options uses each option once. `sample.meta` records
`source`, `phrasing` and `format`, and the report breaks scores down by them.

The options `sources`, `phrasings` and `formats` restrict the draws, e.g. to choose a method's settings on some
sources or phrasings and report on the others. A grouped or dashed answer counts written either way ("any" metric
over the formatted and the plain digits). There is no instruction before the text: the haystack starts at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from kvsqueeze.bench.tasks._common import (
    GeneratedTask,
    balanced_choice,
    check_depth,
    fit,
    make_values,
    sample_rng,
    spread_depth,
)
from kvsqueeze.bench.tasks._sources import SOURCES, haystack
from kvsqueeze.bench.tasks.base import Sample, register_task
from kvsqueeze.validation import check_choice, check_int


@dataclass(frozen=True)
class Phrasing:
    """How a needle is written and asked about: `needle` holds {value} (and {key} in keyed tasks)."""

    needle: str
    question: str
    prefix: str  # the answer prefix


PASSKEY_PHRASINGS = {
    "pass_key": Phrasing("The pass key is {value}. Remember it.", "What is the pass key?", "The pass key is"),
    "magic_number": Phrasing(
        "The special magic number is {value}.",
        "What is the special magic number mentioned in the text above?",
        "The special magic number is",
    ),
    "remember_code": Phrasing(
        "Remember this code: {value}.", "What is the code you were asked to remember?", "The code to remember is"
    ),
    "access_code": Phrasing(
        "Note that the access code for the archive is {value}.",
        "What is the access code for the archive?",
        "The access code for the archive is",
    ),
}
NIAH_PHRASINGS = {
    "magic_for": Phrasing(
        "One of the special magic numbers for {key} is: {value}.",
        "What is the special magic number for {key} mentioned in the provided text?",
        "The special magic number for {key} mentioned in the provided text is",
    ),
    "assigned": Phrasing(
        "The number assigned to {key} is {value}.",
        "Which number is assigned to {key}?",
        "The number assigned to {key} is",
    ),
    "ledger": Phrasing(
        "In the ledger, the entry for {key} reads {value}.",
        "What does the ledger entry for {key} read?",
        "The ledger entry for {key} reads",
    ),
    "code_for": Phrasing(
        "Remember that the code for {key} is {value}.", "What is the code for {key}?", "The code for {key} is"
    ),
}
FORMATS = ("digits", "grouped", "dashed")
MIN_LENGTH = 64  # tokens: below that a haystack hides nothing


def format_value(digits: str, fmt: str) -> str:
    """'4817263' as digits ('4817263'), grouped by thousands ('4,817,263') or dashed before the last four
    ('481-7263')."""
    check_choice("format", fmt, FORMATS)
    if fmt == "grouped":
        return f"{int(digits):,}"
    return f"{digits[:-4]}-{digits[-4:]}" if fmt == "dashed" else digits


def _names(option: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A tuple of names from a tuple, list or comma-separated string, each one of `allowed`, at least one."""
    if not isinstance(value, str | tuple | list):
        raise ValueError(f"{option} must be a tuple of names (of {', '.join(allowed)}), got {value!r}")
    names = tuple(n.strip() for n in value.split(",")) if isinstance(value, str) else tuple(value)
    if not names:
        raise ValueError(f"{option} must name at least one of {', '.join(allowed)}")
    for name in names:
        check_choice(option, name, allowed)
    return names


@dataclass
class VariedTask(GeneratedTask):
    """Base of the varied needle tasks: per-sample source, phrasing and value format (see the module docstring)."""

    PHRASINGS: ClassVar[dict[str, Phrasing]] = {}
    sources: tuple[str, ...] = SOURCES
    phrasings: tuple[str, ...] = ()  # () = all of the task's phrasings
    formats: tuple[str, ...] = FORMATS
    digits: int = 7  # of the number, 5 to 12
    depth: float | None = None  # of the asked needle, in [0, 1]; None: spread over samples

    def __post_init__(self) -> None:
        self.sources = _names("sources", self.sources, SOURCES)
        self.phrasings = _names("phrasings", self.phrasings or tuple(self.PHRASINGS), tuple(self.PHRASINGS))
        self.formats = _names("formats", self.formats, FORMATS)
        check_int("digits", self.digits, 5, 12)
        check_depth(self.depth)

    def samples(self, tokenizer: Any, length: int, n: int, seed: int = 0) -> list[Sample]:
        check_int("length", length, MIN_LENGTH, 10_000_000, note="tokens of context")
        return super().samples(tokenizer, length, n, seed)

    def choose(self, seed: int, index: int) -> tuple[str, str, str]:
        """(source, phrasing name, format) of sample `index`."""
        return (
            balanced_choice(self.sources, self.name, seed, index, "source"),
            balanced_choice(self.phrasings, self.name, seed, index, "phrasing"),
            balanced_choice(self.formats, self.name, seed, index, "format"),
        )

    def number(self, rng: random.Random) -> str:
        return str(rng.randint(10 ** (self.digits - 1), 10**self.digits - 1))

    def meta(self, length: int, tokens: int, depth: float, source: str, phrasing: str, fmt: str) -> dict[str, Any]:
        """What every varied sample records (the report breaks scores down by source, phrasing and format)."""
        return {
            "depth": depth,
            "length": length,
            "tokens": tokens,
            "source": source,
            "phrasing": phrasing,
            "format": fmt,
        }

    def build(
        self, tokenizer: Any, length: int, index: int, seed: int, needles: list[tuple[float, str]], source: str
    ) -> tuple[str, int]:
        """The context: `needles` in a haystack of `source`, fitted to `length` tokens."""
        hay = haystack(source, sample_rng(self.name, seed, index, "text"))
        return fit(tokenizer, length, lambda k: hay.render(k, needles), max(1, length // 2), self.name)  # k: words


def _references(digits: str, shown: str) -> tuple[str, ...]:
    return (shown,) if shown == digits else (shown, digits)


@register_task("passkey_varied")
@dataclass
class PasskeyVaried(VariedTask):
    """A number hidden in varied text (prose, Python docs, docstrings), phrased several ways; return it."""

    PHRASINGS: ClassVar[dict[str, Phrasing]] = PASSKEY_PHRASINGS

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        source, name, fmt = self.choose(seed, index)
        phrasing, rng = self.PHRASINGS[name], sample_rng(self.name, seed, index)
        digits = self.number(rng)
        shown = format_value(digits, fmt)
        depth = self.depth if self.depth is not None else spread_depth(index)
        needle = phrasing.needle.format(value=shown)
        context, n_tokens = self.build(tokenizer, length, index, seed, [(depth, needle)], source)
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(phrasing.question,),
            answers=(_references(digits, shown),),
            answer_prefix=phrasing.prefix,
            max_new_tokens=len(shown) + 6,
            metric="any",
            meta={**self.meta(length, n_tokens, depth, source, name, fmt), "needle": needle, "value": shown},
        )


@register_task("niah_varied")
@dataclass
class NiahVaried(VariedTask):
    """A number stored under a key, among distractor keys, in varied text and phrasings; return the key's value."""

    PHRASINGS: ClassVar[dict[str, Phrasing]] = NIAH_PHRASINGS
    num_keys: int = 1  # needles in the context, the asked one included (same phrasing, other keys)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_keys", self.num_keys, 1, 64)

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        source, name, fmt = self.choose(seed, index)
        phrasing, rng = self.PHRASINGS[name], sample_rng(self.name, seed, index)
        keys = make_values(rng, "words", self.num_keys)
        numbers: list[str] = []
        while len(numbers) < self.num_keys:
            number = self.number(rng)
            numbers += [] if number in numbers else [number]
        depth = self.depth if self.depth is not None else spread_depth(index)
        shown = [format_value(d, fmt) for d in numbers]
        needles = [
            (depth if i == 0 else rng.random(), phrasing.needle.format(key=k, value=v))
            for i, (k, v) in enumerate(zip(keys, shown, strict=True))
        ]
        context, n_tokens = self.build(tokenizer, length, index, seed, needles, source)
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(phrasing.question.format(key=keys[0]),),
            answers=(_references(numbers[0], shown[0]),),
            answer_prefix=phrasing.prefix.format(key=keys[0]),
            max_new_tokens=len(shown[0]) + 6,
            metric="any",
            meta={
                **self.meta(length, n_tokens, depth, source, name, fmt),
                "needles": list(zip(keys, shown, strict=True)),
            },
        )
