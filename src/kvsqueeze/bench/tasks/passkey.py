"""Passkey retrieval (Mohtashami and Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers", arXiv 2305.16300): a short random number hidden in filler text, asked back at the end.

The classic filler is a handful of sentences repeated ("The grass is green. The sky is blue. ..."); `filler="prose"`
uses the invented prose haystack instead. The needle sits at `depth` (None: depths spread over the samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.tasks._common import (
    GeneratedTask,
    check_depth,
    fit,
    sample_rng,
    spread_depth,
)
from kvsqueeze.bench.tasks._haystack import Haystack
from kvsqueeze.bench.tasks.base import Sample, register_task
from kvsqueeze.validation import check_choice, check_int

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
QUESTION = "What is the pass key? Answer with the number only."  # the bare question: 3/5 right at 1k (135M)
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it: I will ask you about it afterwards."
)


def _repeated(k: int, depth: float, needle: str) -> str:
    sentences = [FILLER[i % len(FILLER)] for i in range(k)]
    sentences.insert(round(depth * k), needle)
    return " ".join(sentences)


@register_task("passkey")
@dataclass
class Passkey(GeneratedTask):
    """A pass key (a random number) hidden in filler text; return it."""

    digits: int = 5
    filler: str = "repeat"  # repeat (the classic sentences) | prose (the invented haystack)
    depth: float | None = None  # of the pass key, in [0, 1]; None: spread over samples

    def __post_init__(self) -> None:
        check_int("digits", self.digits, 1, 30)
        check_choice("filler", self.filler, ("repeat", "prose"))
        check_depth(self.depth)

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        rng = sample_rng(self.name, seed, index)
        key = str(rng.randint(10 ** (self.digits - 1), 10**self.digits - 1))
        depth = self.depth if self.depth is not None else spread_depth(index)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        if self.filler == "repeat":
            context, n_tokens = fit(
                tokenizer, length, lambda k: f"{INTRO}\n\n{_repeated(k, depth, needle)}", length // 5, self.name
            )
        else:
            hay = Haystack(rng)
            context, n_tokens = fit(
                tokenizer, length, lambda k: f"{INTRO}\n\n{hay.render(k, [(depth, needle)])}", length // 16, self.name
            )
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(QUESTION,),
            answers=((key,),),
            answer_prefix="The pass key is",
            max_new_tokens=self.digits + 6,
            metric="all",
            meta={"depth": depth, "length": length, "tokens": n_tokens, "key": key},
        )
