"""Needle in a haystack, after RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654): needles "One of the special magic numbers for {key} is: {value}." hidden in
invented prose, in four variants registered separately:

- niah_single: one needle, one question.
- niah_multikey: the needle plus `num_keys - 1` distractor needles with other keys; only one key is asked.
- niah_multivalue: `num_values` needles share one key; every value must be returned.
- niah_multiquery: `num_queries` needles with different keys, all asked in one question.

The first needle (the asked one) sits at `depth` (None: depths spread over the samples); the others at random
depths. Values are 7-digit numbers, 'adjective-noun' words or UUIDs; keys are words, numbers or UUIDs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.tasks._common import (
    VALUE_TYPES,
    GeneratedTask,
    check_depth,
    make_values,
    sample_rng,
    spread_depth,
    value_name,
)
from kvsqueeze.bench.tasks._haystack import fill
from kvsqueeze.bench.tasks.base import Sample, register_task
from kvsqueeze.validation import check_choice, check_int

TOKENS_PER_VALUE = {"numbers": 10, "words": 10, "uuids": 40}  # answer tokens to allow per value


def join_keys(keys: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"


def needle_text(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {value_name(kind)}s for {key} is: {value}."


def intro(kind: str) -> str:
    name = value_name(kind)
    return (
        f"Some special magic {name}s are hidden in the text below. Read it carefully and remember them: "
        f"you will be asked about the {name}s afterwards."
    )


@dataclass
class _Niah(GeneratedTask):
    values: str = "numbers"  # numbers | words | uuids
    keys: str = "words"  # numbers | words | uuids
    depth: float | None = None  # of the asked needle, in [0, 1]; None: spread over samples

    def __post_init__(self) -> None:
        check_choice("values", self.values, VALUE_TYPES)
        check_choice("keys", self.keys, VALUE_TYPES)
        check_depth(self.depth)

    def plan(self, rng: random.Random) -> tuple[list[tuple[str, str]], list[str], list[str]]:
        """(needles as (key, value), asked keys, expected values): the first needle is placed at `depth`."""
        raise NotImplementedError

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        rng = sample_rng(self.name, seed, index)
        pairs, asked, expected = self.plan(rng)
        depth = self.depth if self.depth is not None else spread_depth(index)
        placed = [(depth if i == 0 else rng.random(), needle_text(self.values, k, v)) for i, (k, v) in enumerate(pairs)]
        context, n_tokens = fill(tokenizer, length, rng, intro(self.values), placed, self.name)
        name = value_name(self.values)
        keys = join_keys(asked)
        if len(expected) == 1:
            question = f"What is the special magic {name} for {keys} mentioned in the provided text?"
            prefix = f"The special magic {name} for {keys} mentioned in the provided text is"
        else:
            question = f"What are all the special magic {name}s for {keys} mentioned in the provided text?"
            prefix = f"The special magic {name}s for {keys} mentioned in the provided text are"
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(question,),
            answers=(tuple(expected),),
            answer_prefix=prefix,
            max_new_tokens=8 + TOKENS_PER_VALUE[self.values] * len(expected),
            metric="all",
            meta={"depth": depth, "length": length, "tokens": n_tokens, "needles": pairs},
        )

    def _keys(self, rng: random.Random, n: int) -> list[str]:
        return make_values(rng, self.keys, n)


@register_task("niah_single")
@dataclass
class NiahSingle(_Niah):
    """One needle hidden in invented prose; return its value (RULER NIAH single)."""

    def plan(self, rng: random.Random) -> tuple[list[tuple[str, str]], list[str], list[str]]:
        key = self._keys(rng, 1)[0]
        value = make_values(rng, self.values, 1, avoid={key})[0]
        return [(key, value)], [key], [value]


@register_task("niah_multikey")
@dataclass
class NiahMultiKey(_Niah):
    """The needle among distractor needles with other keys; return the asked key's value (RULER multikey)."""

    num_keys: int = 4  # needles in the context, the asked one included

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_keys", self.num_keys, 1, 64)

    def plan(self, rng: random.Random) -> tuple[list[tuple[str, str]], list[str], list[str]]:
        keys = self._keys(rng, self.num_keys)
        values = make_values(rng, self.values, self.num_keys, avoid=set(keys))
        return list(zip(keys, values, strict=True)), keys[:1], values[:1]


@register_task("niah_multivalue")
@dataclass
class NiahMultiValue(_Niah):
    """One key with several needles (values); return all of them (RULER multivalue)."""

    num_values: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_values", self.num_values, 1, 64)

    def plan(self, rng: random.Random) -> tuple[list[tuple[str, str]], list[str], list[str]]:
        key = self._keys(rng, 1)[0]
        values = make_values(rng, self.values, self.num_values, avoid={key})
        return [(key, v) for v in values], [key], values


@register_task("niah_multiquery")
@dataclass
class NiahMultiQuery(_Niah):
    """Several needles with different keys, all asked in one question; return every value (RULER multiquery)."""

    num_queries: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_queries", self.num_queries, 1, 64)

    def plan(self, rng: random.Random) -> tuple[list[tuple[str, str]], list[str], list[str]]:
        keys = self._keys(rng, self.num_queries)
        values = make_values(rng, self.values, self.num_queries, avoid=set(keys))
        return list(zip(keys, values, strict=True)), keys, values
