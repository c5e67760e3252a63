"""Generic English prose, generated locally and deterministically: calibration text and benchmark haystacks.

No download and no data file: paragraphs are drawn from a few dozen sentence templates filled from small vocabularies
(people, places, occupations, nouns, adjectives, verbs, times) by a seeded `random.Random`, so the same seed always
gives the same text on every machine. Each paragraph follows one person in one place, which keeps it loosely coherent.

    generic_paragraphs(seed)             endless iterator of paragraphs
    generic_text(tokenizer, n, seed)     about n tokens of paragraphs (at least n), joined by blank lines
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from kvsqueeze.validation import check_int

PEOPLE = (
    "Amara", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kalinda", "Luca",
    "Mei", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tove", "Umar", "Vera", "Wendell", "Ximena",
    "Yusuf", "Zofia", "Arthur", "Beatrix", "Cormac", "Delphine", "Emil", "Fatima", "Gideon", "Hannah", "Ivo",
    "Juno", "Kofi", "Lena", "Matteo", "Noor",
)  # fmt: skip
OCCUPATIONS = (
    "baker", "carpenter", "teacher", "nurse", "engineer", "fisherman", "librarian", "painter", "surveyor", "gardener",
    "pilot", "tailor", "chemist", "shepherd", "architect", "clockmaker", "translator", "potter", "sailor", "doctor",
    "journalist", "beekeeper", "cartographer", "violinist", "stonemason",
)  # fmt: skip
PLACES = (
    "the harbour", "the old market", "the library", "the mountain village", "the river delta", "the railway station",
    "the orchard", "the university", "the lighthouse", "the bakery on the corner", "the city hall", "the museum",
    "the monastery", "the vineyard", "the factory", "the botanical garden", "the island", "the copper mine",
    "the northern valley", "the coastal road", "the observatory", "the village square", "the hospital",
    "the bookshop", "the concert hall", "the farm", "the abandoned mill", "the ferry terminal", "the desert town",
    "the frozen lake",
)  # fmt: skip
NOUNS = (
    "letter", "map", "lantern", "bicycle", "garden", "notebook", "bridge", "violin", "clock", "boat", "recipe",
    "painting", "window", "key", "basket", "telescope", "blanket", "kettle", "umbrella", "ladder", "compass",
    "photograph", "engine", "carpet", "mirror", "radio", "bell", "fountain", "chair", "suitcase", "candle", "fence",
    "well", "tractor", "quilt", "drum", "kite", "coat", "staircase", "barrel", "microscope", "diary", "hammer",
    "parcel", "typewriter", "greenhouse", "bench", "sculpture", "chessboard", "mosaic",
)  # fmt: skip
ADJECTIVES = (
    "old", "quiet", "bright", "heavy", "narrow", "wooden", "careful", "forgotten", "enormous", "tiny", "golden",
    "broken", "familiar", "strange", "patient", "crowded", "distant", "gentle", "rusty", "polished", "modest",
    "curious", "noisy", "fragile", "ancient", "clever", "muddy", "silver", "cheerful", "stubborn", "hidden", "humble",
    "elegant", "weathered", "peculiar",
)  # fmt: skip
VERBS = (
    "repaired", "painted", "carried", "found", "sold", "borrowed", "described", "cleaned", "measured", "opened",
    "studied", "photographed", "rebuilt", "hid", "examined", "polished", "delivered", "returned", "admired",
    "packed", "collected", "sketched", "tested", "moved", "guarded", "replaced", "counted", "wrapped", "inspected",
    "designed",
)  # fmt: skip
TIMES = (
    "in the morning", "at dawn", "late in the evening", "on Sunday", "after the storm", "before the winter",
    "during the festival", "at noon", "on a rainy Tuesday", "in early spring", "after lunch", "at midnight",
    "the following week", "in the autumn", "on the first day of summer", "one cold night", "last year", "every Friday",
)  # fmt: skip
FEELINGS = (
    "happy", "tired", "surprised", "proud", "worried", "calm", "grateful", "restless", "amused", "hopeful",
    "nervous", "content",
)  # fmt: skip
WEATHER = (
    "The wind was cold", "Rain fell softly", "The sun was warm", "A thick fog covered the streets",
    "Snow had begun to settle", "The air smelled of salt", "Thunder rolled in the distance", "The sky was clear",
)  # fmt: skip

# A paragraph opens with an introduction, then mixes body sentences. {p} is the paragraph's person, {pl} its place.
OPENINGS = (
    "{p} was a {occ} who lived near {pl}.",
    "Everyone at {pl} knew {p}, the {adj} {occ}.",
    "{time}, {p} arrived at {pl} with a {adj} {n}.",
    "For many years {p} worked as a {occ} at {pl}.",
    "The story begins at {pl}, where {p} kept a {adj} {n}.",
    "{p} had never been to {pl} before {time2}.",
)
BODY = (
    "{time}, {p} {v} the {adj} {n}.",
    "{p} {v} a {n} that belonged to {other}.",
    "{weather}, so {p} stayed inside and {v} the {n}.",
    "{other} said that the {n} was {adj}, but {p} did not agree.",
    "It took {num} hours to reach {pl2}, and {p} was {feel} when it was over.",
    "On the way to {pl2}, {p} met a {adj} {occ2} named {other}.",
    "The {n} was {adj} and the {n2} was even more {adj2}.",
    "{p} remembered that {other} had {v} the same {n} {time2}.",
    "Nobody could explain why the {n} at {pl} was so {adj}.",
    "{p} wrote {num} pages about the {n} in a {adj} {n2}.",
    "{weather} {time2}, and the {n} by the {n2} looked {adj}.",
    "When {other} asked about the {n}, {p} only smiled.",
    "{p} and {other} {v} {num} {n}s before dinner.",
    "A {adj} {occ2} from {pl2} offered {p} a {n} for {num} coins.",
    "{p} felt {feel} after {other} {v} the {n2}.",
    "The people of {pl} still talk about the {adj} {n} {p} {v}.",
    "Later, {p} {v} the {n2} and put it next to the {adj} {n}.",
    "{p} asked {other} whether the {n} could be {v} {time2}.",
    "In the end the {n} was {v} by {other}, who was a {occ2}.",
    "{weather}; {p} walked to {pl2} and back.",
    "There were {num} {adj} {n}s in the room, and one {n2}.",
    "{other} wanted to know how {p} had {v} the {n} so quickly.",
    "{p} kept the {n} in a {adj} {n2} near the window.",
    "Somebody at {pl2} had {v} the {adj} {n2} {time}.",
)


def _sentence(template: str, rng: random.Random, person: str, place: str) -> str:
    others = [name for name in PEOPLE if name != person]
    places = [name for name in PLACES if name != place]
    n, n2 = rng.sample(NOUNS, 2)
    adj, adj2 = rng.sample(ADJECTIVES, 2)
    time, time2 = rng.sample(TIMES, 2)
    occ, occ2 = rng.sample(OCCUPATIONS, 2)
    text = template.format(
        p=person, pl=place, other=rng.choice(others), pl2=rng.choice(places), n=n, n2=n2, adj=adj, adj2=adj2,
        v=rng.choice(VERBS), time=time, time2=time2, occ=occ, occ2=occ2, num=rng.randint(2, 97),
        feel=rng.choice(FEELINGS), weather=rng.choice(WEATHER),
    )  # fmt: skip
    text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)  # "a old lantern" -> "an old lantern"
    return text[0].upper() + text[1:]


def generic_paragraphs(seed: int = 0) -> Iterator[str]:
    """An endless, deterministic stream of paragraphs of 4 to 8 sentences about one person in one place."""
    rng = random.Random(seed)
    while True:
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        sentences = [_sentence(rng.choice(OPENINGS), rng, person, place)]
        for template in rng.sample(BODY, rng.randint(3, 7)):
            sentences.append(_sentence(template, rng, person, place))
        yield " ".join(sentences)


def generic_text(tokenizer: Any, n_tokens: int, seed: int = 0) -> str:
    """Whole paragraphs (joined by blank lines) holding at least `n_tokens` tokens of `tokenizer` (special tokens not
    counted); at most one paragraph more than needed. `tokenizer=None` counts characters instead of tokens."""
    return joined_paragraphs(tokenizer, n_tokens, generic_paragraphs(seed))


def joined_paragraphs(tokenizer: Any, n_tokens: int, stream: Iterator[str]) -> str:
    """The first paragraphs of `stream`, joined by blank lines, that hold at least `n_tokens` tokens of `tokenizer`
    (special tokens not counted; `tokenizer=None` counts characters): at most one paragraph more than needed."""
    check_int("n_tokens", n_tokens, 1)

    def count(text: str) -> int:
        if tokenizer is None:
            return len(text)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    paragraphs: list[str] = []
    estimate = 0
    while True:  # per-paragraph counts are cheap; the joined text is counted again to be exact
        while estimate < n_tokens:
            paragraphs.append(next(stream))
            estimate += count(paragraphs[-1]) + 1
        text = "\n\n".join(paragraphs)
        exact = count(text)
        if exact >= n_tokens:
            return text
        estimate = exact
