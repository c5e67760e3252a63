"""Frequent words extraction, after RULER (Hsieh et al. 2024, arXiv 2404.06654): a text of invented "coded" words
whose frequencies follow Zipf's law (the word of rank r appears about c / r**alpha times); return the three most
frequent words. The total number of words sets the length.

Counts are the rounded Zipf expectations rather than random draws, so the top three are always strictly more
frequent than the fourth (RULER draws them, which can tie).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.tasks._common import GeneratedTask, fit, sample_rng
from kvsqueeze.bench.tasks.base import Sample, register_task
from kvsqueeze.validation import check_float

INTRO = "Read the coded text below and keep track of how often each coded word appears in it."
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
TOP = 3


def coded_words(rng: random.Random, n: int) -> list[str]:
    """`n` distinct pronounceable invented words of two or three syllables."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def zipf_counts(total: int, alpha: float) -> list[int]:
    """Counts by rank summing to `total`: round(c / r**alpha) while >= 1, the rest as words seen once."""
    norm = sum(r**-alpha for r in range(1, total + 1))
    counts: list[int] = []
    for r in range(1, total + 1):
        c = round(total / norm * r**-alpha)
        if c < 2 or sum(counts) + c > total:
            break
        counts.append(c)
    return counts + [1] * (total - sum(counts))


@register_task("fwe")
@dataclass
class FrequentWords(GeneratedTask):
    """Coded words with Zipf frequencies; return the three most frequent (RULER FWE)."""

    alpha: float = 2.0

    def __post_init__(self) -> None:
        check_float("alpha", self.alpha, 1.0, 4.0)

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        vocab = coded_words(sample_rng(self.name, seed, index), 4000)

        def text(total: int) -> str:
            counts = zipf_counts(total, self.alpha)
            if len(counts) > len(vocab):
                raise ValueError(f"fwe: {total} words need more than {len(vocab)} coded words; ask a shorter length")
            words = [vocab[r] for r, c in enumerate(counts) for _ in range(c)]
            sample_rng(self.name, seed, index, f"order{total}").shuffle(words)
            lines = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
            return f"{INTRO}\n\n" + "\n".join(lines)

        context, n_tokens = fit(tokenizer, length, text, max(1, length // 3), self.name)
        total = len(context.split()) - len(INTRO.split())
        counts = zipf_counts(total, self.alpha)
        if len(counts) <= TOP or counts[TOP - 1] <= counts[TOP]:
            raise ValueError(f"fwe: a length of {length} tokens is too short to separate the top {TOP} words")
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(f"What are the {TOP} most frequent coded words in the text above?",),
            answers=(tuple(vocab[:TOP]),),
            answer_prefix=f"Answer: The {TOP} most frequent coded words in the text are:",
            max_new_tokens=8 + 6 * TOP,
            metric="all",
            meta={"length": length, "tokens": n_tokens, "counts": counts[: TOP + 1]},
        )
