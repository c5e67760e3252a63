"""Variable tracking, after RULER (Hsieh et al. 2024, arXiv 2404.06654): chains of assignments "VAR B = VAR A."
starting from "VAR A = 12345." are hidden in invented prose; return every variable bound to the asked value.

`num_chains` chains (the first one asked, the others distractors with other values) of `num_hops` hops each.
The first assignment of the asked chain sits at `depth` (None: spread over samples), its later hops at random
depths after it, in order; distractor chains at random depths, in order.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.tasks._common import GeneratedTask, check_depth, sample_rng, spread_depth
from kvsqueeze.bench.tasks._haystack import fill
from kvsqueeze.bench.tasks.base import Sample, register_task
from kvsqueeze.validation import check_int

INTRO = "Memorize and follow the chains of variable assignments hidden in the text below."


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


@register_task("vt")
@dataclass
class VariableTracking(GeneratedTask):
    """Chains of variable assignments in prose; return every variable bound to a value (RULER VT)."""

    num_chains: int = 1
    num_hops: int = 4
    depth: float | None = None  # of the asked chain's first assignment, in [0, 1]; None: spread over samples

    def __post_init__(self) -> None:
        check_int("num_chains", self.num_chains, 1, 16)
        check_int("num_hops", self.num_hops, 1, 32)
        check_depth(self.depth)

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        rng = sample_rng(self.name, seed, index)
        names = _names(rng, self.num_chains * (self.num_hops + 1))
        values: list[str] = []
        while len(values) < self.num_chains:
            value = str(rng.randint(10_000, 99_999))
            if value not in values:
                values.append(value)
        depth = self.depth if self.depth is not None else spread_depth(index)
        placed: list[tuple[float, str]] = []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)]
            start = depth if c == 0 else rng.random()
            depths = [start, *sorted(start + (1 - start) * rng.random() for _ in range(self.num_hops))]
            texts = [f"VAR {chain[0]} = {values[c]}."]
            texts += [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, len(chain))]
            placed += list(zip(depths, texts, strict=True))
        placed.sort(key=lambda p: p[0])  # stable: hops of one chain keep their order at equal depths
        context, n_tokens = fill(tokenizer, length, rng, INTRO, placed, self.name)
        asked = names[: self.num_hops + 1]
        n = len(asked)
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(
                f"Find every variable that is assigned the value {values[0]}, directly or through other "
                "variables, in the text above.",
            ),
            answers=(tuple(asked),),
            answer_prefix=f"Answer: Following the chains of assignments, {n} variables are assigned the value "
            f"{values[0]}. They are:",
            max_new_tokens=8 + 5 * n,
            metric="all",
            meta={"depth": depth, "length": length, "tokens": n_tokens, "value": values[0]},
        )
