"""Question answering over generated documents: short chronicles of invented towns (mayor, river, best-known
product, festival month), one of which answers the question while the others are distractors about other towns.
The facts are invented, so the answer cannot come from the model's memory, and no distractor shares the answer.

Scored with the "any" metric (RULER's QA scoring): a person's answer counts with the full name or the surname,
surnames being unique within a sample. The answering document sits at `depth` (None: spread over samples).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.tasks._common import (
    GeneratedTask,
    check_depth,
    fit,
    sample_rng,
    spread_depth,
    words,
)
from kvsqueeze.bench.tasks._haystack import FIRST_NAMES, MONTHS, RIVERS, SURNAMES, TOWNS, TRADES, sentence
from kvsqueeze.bench.tasks.base import Sample, register_task
from kvsqueeze.validation import check_choice

PRODUCTS = words(
    "copper kettle|glass bead|wool blanket|clay pipe|smoked eel|rope ladder|brass bell|goat cheese|honey cake|wicker "
    "basket|linen sail|oak barrel|silver buckle|paper lantern|tin whistle|salted herring|plum tart|felt hat|leather "
    "saddle|beeswax candle|iron nail|stone mortar|willow chair|painted tile|cork float|rye biscuit|wooden clog|lace "
    "collar|walnut cake|pewter mug",
    "|",
)
FACTS = ("mayor", "river", "product", "month")
INTRO = "Answer the question using the documents below. Give only the answer, without any other words."


@dataclass
class Town:
    name: str
    mayor: str
    river: str
    product: str
    month: str
    extra: list[str]  # filler sentences after the facts

    def sentences(self, rng: random.Random) -> list[str]:
        return [
            f"{self.name} is a small town on the River {self.river}.",
            f"Its mayor is {self.mayor}, who worked as a {rng.choice(TRADES)} before being elected.",
            f"{self.name} is best known for its {self.product}s, which traders carry all over the valley.",
            f"Every year in {self.month}, the people of {self.name} hold their town festival.",
            *self.extra,
        ]


def _town(rng: random.Random, name: str, surname: str, gold: Town | None) -> Town:
    def pick(options: tuple[str, ...], gold_value: str | None) -> str:
        return rng.choice([o for o in options if o != gold_value])

    return Town(
        name=name,
        mayor=f"{rng.choice(FIRST_NAMES)} {surname}",
        river=pick(RIVERS, gold.river if gold else None),
        product=pick(PRODUCTS, gold.product if gold else None),
        month=pick(MONTHS, gold.month if gold else None),
        extra=[sentence(rng) for _ in range(rng.randint(1, 4))],
    )


def _question(fact: str, town: Town) -> tuple[str, str, tuple[str, ...]]:
    """(question, answer prefix, references)."""
    t = town.name
    if fact == "mayor":
        return f"Who is the mayor of {t}?", f"The mayor of {t} is", (town.mayor, town.mayor.split()[-1])
    if fact == "river":
        return f"On which river is {t}?", f"{t} is on the River", (town.river,)
    if fact == "product":
        return f"What is {t} best known for?", f"{t} is best known for its", (town.product,)
    return f"In which month do the people of {t} hold their town festival?", "They hold it in", (town.month,)


@register_task("qa")
@dataclass
class DocumentQA(GeneratedTask):
    """Documents about invented towns; answer a question about one of them (distractors about the others)."""

    fact: str = "mixed"  # mixed (one drawn per sample) | mayor | river | product | month
    depth: float | None = None  # of the answering document, in [0, 1]; None: spread over samples

    def __post_init__(self) -> None:
        check_choice("fact", self.fact, ("mixed", *FACTS))
        check_depth(self.depth)

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        rng = sample_rng(self.name, seed, index)
        names = rng.sample(TOWNS, len(TOWNS))
        surnames = rng.sample(SURNAMES, len(SURNAMES))
        gold = _town(rng, names[0], surnames[0], None)
        gold_sentences = gold.sentences(rng)
        fact = self.fact if self.fact != "mixed" else rng.choice(FACTS)
        depth = self.depth if self.depth is not None else spread_depth(index)
        docs: list[list[str]] = []  # distractor documents, made on demand

        def render(k: int) -> str:
            """The first k distractor sentences (whole documents but maybe the last) and the answering document."""
            kept: list[list[str]] = []
            while k > 0:
                if len(kept) == len(docs):
                    if len(docs) + 1 >= min(len(names), len(surnames)):
                        raise ValueError(
                            f"qa: ran out of invented towns at {len(docs)} documents; ask a shorter length"
                        )
                    docs.append(_town(rng, names[len(docs) + 1], surnames[len(docs) + 1], gold).sentences(rng))
                kept.append(docs[len(kept)][:k])
                k -= len(kept[-1])
            kept.insert(round(depth * len(kept)), gold_sentences)
            body = "\n\n".join(f"Document {i + 1}:\n{' '.join(d)}" for i, d in enumerate(kept))
            return f"{INTRO}\n\n{body}"

        context, n_tokens = fit(tokenizer, length, render, max(1, length // 18), self.name)
        question, prefix, refs = _question(fact, gold)
        return Sample(
            task=self.name,
            index=index,
            context=context,
            questions=(question,),
            answers=(refs,),
            answer_prefix=prefix,
            max_new_tokens=12,
            metric="any",
            meta={"depth": depth, "length": length, "tokens": n_tokens, "fact": fact, "town": gold.name},
        )
