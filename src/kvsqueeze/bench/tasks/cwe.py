"""Common words extraction, after RULER (Hsieh et al. 2024, arXiv 2404.06654): a numbered list of words where
`num_common` words appear `freq_common` times each and many other words `freq_uncommon` times each; return the
common words. The number of uncommon words sets the length.

RULER uses 10 common words seen 30 times and uncommon words seen 3 times; the defaults here (5 words seen 20 times)
suit small models. When the word pool runs out (very long contexts), uncommon words repeat more often, always
fewer times than the common ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.tasks._common import COMMON_WORDS, GeneratedTask, fit, sample_rng
from kvsqueeze.bench.tasks.base import Sample, register_task
from kvsqueeze.validation import check_int

INTRO = "Below is a numbered list of words. Some words appear in it much more often than the others."


@register_task("cwe")
@dataclass
class CommonWords(GeneratedTask):
    """A numbered word list; return the words that appear most often (RULER CWE)."""

    num_common: int = 5
    freq_common: int = 20
    freq_uncommon: int = 3

    def __post_init__(self) -> None:
        check_int("num_common", self.num_common, 1, 50)
        check_int("freq_uncommon", self.freq_uncommon, 1, 100)
        check_int("freq_common", self.freq_common, self.freq_uncommon + 1, 1000)

    def _entries(self, words: list[str], k: int, index: int, seed: int) -> list[str]:
        """The list with `k` uncommon entries, shuffled by a generator of its own (so each k is reproducible)."""
        common, pool = words[: self.num_common], words[self.num_common :]
        n_words = min(len(pool), math.ceil(k / self.freq_uncommon))
        if n_words and math.ceil(k / n_words) >= self.freq_common:
            raise ValueError(
                f"cwe: {k} uncommon entries do not fit {len(pool)} words below freq_common={self.freq_common}; "
                "ask for a shorter length or a larger freq_common"
            )
        entries = [w for w in common for _ in range(self.freq_common)]
        entries += [pool[i % n_words] for i in range(k)] if n_words else []
        sample_rng(self.name, seed, index, f"order{k}").shuffle(entries)
        return entries

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        words = list(COMMON_WORDS)
        sample_rng(self.name, seed, index).shuffle(words)

        def render(k: int) -> str:
            body = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(self._entries(words, k, index, seed)))
            return f"{INTRO}\n\n{body}"

        context, n_tokens = fit(tokenizer, length, render, max(1, length // 6), self.name)
        common = words[: self.num_common]
        n = self.num_common
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(f"What are the {n} most common words in the list above?",),
            answers=(tuple(common),),
            answer_prefix=f"Answer: The {n} words that appear most often in the list are:",
            max_new_tokens=8 + 5 * n,
            metric="all",
            meta={"length": length, "tokens": n_tokens},
        )
