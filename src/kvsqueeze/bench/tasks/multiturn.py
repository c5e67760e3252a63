"""Several questions about one long context, asked in turn over the same (compressed) cache: the reuse setting,
where compression cannot know the question. `num_questions` needles with different keys (as in niah), one
question per needle, each scored on its own.

All questions share one answer prefix (a call to `generate` takes one), so the prefix names no key. The first
needle sits at `depth` (None: spread over samples), the others at random depths.
"""

from __future__ import annotations

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
from kvsqueeze.bench.tasks.niah import TOKENS_PER_VALUE, intro, needle_text
from kvsqueeze.validation import check_choice, check_int


@register_task("multiturn")
@dataclass
class MultiTurn(GeneratedTask):
    """Several needles in one context, one question each, asked in turn over the same cache."""

    num_questions: int = 4
    values: str = "numbers"  # numbers | words | uuids
    depth: float | None = None  # of the first needle, in [0, 1]; None: spread over samples

    def __post_init__(self) -> None:
        check_int("num_questions", self.num_questions, 1, 64)
        check_choice("values", self.values, VALUE_TYPES)
        check_depth(self.depth)

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        rng = sample_rng(self.name, seed, index)
        keys = make_values(rng, "words", self.num_questions)
        values = make_values(rng, self.values, self.num_questions, avoid=set(keys))
        depth = self.depth if self.depth is not None else spread_depth(index)
        placed = [
            (depth if i == 0 else rng.random(), needle_text(self.values, k, v))
            for i, (k, v) in enumerate(zip(keys, values, strict=True))
        ]
        context, n_tokens = fill(tokenizer, length, rng, intro(self.values), placed, self.name)
        name = value_name(self.values)
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=tuple(f"What is the special magic {name} for {k} mentioned in the provided text?" for k in keys),
            answers=tuple((v,) for v in values),
            answer_prefix=f"The special magic {name} mentioned in the provided text is",
            max_new_tokens=8 + TOKENS_PER_VALUE[self.values],
            metric="all",
            meta={
                "depth": depth,
                "length": length,
                "tokens": n_tokens,
                "needles": list(zip(keys, values, strict=True)),
            },
        )
