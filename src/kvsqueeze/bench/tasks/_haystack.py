"""Invented, varied English prose to hide needles in (the haystack), and the vocabularies the tasks share.

Sentences come from about thirty templates filled from small vocabularies of invented towns and people, trades,
weather, months and events, so the text reads like a local chronicle without being one sentence repeated, and no
fact in it can be known from pretraining. Numbers are written as words, so every digit of a context belongs to a
needle. All draws come from a `random.Random` the caller seeds: same seed, same text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsqueeze.bench.tasks._common import fit, words

FIRST_NAMES = words(
    "Abel Ada Agnes Alma Anselm Arlo Astrid Bastian Beatrix Bertram Briony Cara Casimir Cecily Cedric Clement Corin "
    "Cosima Dara Delphine Dorian Edda Edric Elspeth Emeric Enid Esme Ewan Fenna Florian Freya Gideon Greta Gwen "
    "Hallam Hedda Hollis Ida Imre Isolde Ivo Jasper Juno Kester Linnea Lorcan Mabel Magnus Maren Marius Maud Milo "
    "Mira Nell Nils Odile Orla Osric Perrin Rhea Rowan Ruth Saskia Silas Solveig Sorrel Tamsin Teodor Thea Tobin "
    "Ulla Vesna Viggo Wren Yara Yorick Zora"
)
_SURNAME_HEADS = "Ash Black Bram Brook Carr Dun Fen Gale Hawk Hollow Iron Kettle Marl Moss Nettle Oak Pike Rook Salt "
_SURNAME_HEADS += "Thorn Wither Yew Birch Cobble"
_SURNAME_TAILS = "by combe dale field ford hurst ley mere more ridge stone well worth"
SURNAMES = tuple(h + t for h in words(_SURNAME_HEADS) for t in words(_SURNAME_TAILS))
_TOWN_HEADS = "Amber Bar Bel Cold Crane Dry Elder Fair Frost Glen Gold Green Harrow High Kings Low Mill North Raven "
_TOWN_HEADS += "Red Shep Silver Stan Swan Tarn Wolf"
_TOWN_TAILS = "bridge bury cliff cross end gate haven holm hythe mouth stead thorpe ton vale wick"
TOWNS = tuple(h + t for h in words(_TOWN_HEADS) for t in words(_TOWN_TAILS))
RIVERS = words(
    "Ollen Varra Tessel Brune Idle Teverin Corrow Lisk Amble Severn Fennick Dapple Orrin Wendle Calder Hesk Tamber "
    "Quill Rothe Sallow Ember Yarrow Glissen Morrow Kest Loddon Ombre Wyre Tane Ivel Nethe Pell Sorrow Brisk"
)
TRADES = words(
    "baker blacksmith cooper weaver miller potter tanner glassblower chandler cartwright ferryman beekeeper "
    "bookbinder clockmaker dyer fishmonger herbalist innkeeper lamplighter mason saddler shepherd stonecutter "
    "tailor thatcher wheelwright carpenter brewer cheesemaker"
)
PLACES = words(
    "the old bridge|the market square|the harbour|the chapel|the mill pond|the orchard|the north road|the village "
    "green|the lighthouse|the granary|the town hall|the ferry landing|the schoolhouse|the tannery yard|the east "
    "meadow|the stone well|the cattle market|the inn by the ford|the south gate|the ruined tower",
    "|",
)
MONTHS = words("January February March April May June July August September October November December")
DAYS = words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
SEASONS = ("spring", "summer", "autumn", "winter")
TIMES = ("at dawn", "by midday", "in the late afternoon", "after dusk", "before the bells rang", "at first light")
WEATHER = words(
    "a cold rain fell all morning|the fog lay thick over the fields|a warm wind came up from the south|the first "
    "snow settled on the rooftops|the sky stayed clear and pale|thunder rolled over the hills|a light drizzle came "
    "and went|frost covered every window|the heat made the roads dusty|heavy clouds gathered in the west",
    "|",
)
STORMS = ("the storm", "the heavy rain", "the flood", "the great snowfall", "the gales", "the hailstorm")
EVENTS = words(
    "spring fair|harvest festival|lantern procession|horse market|boat race|wool auction|council meeting|midsummer "
    "dance|apple pressing|travelling theatre|bell ringing contest|cheese fair|sheep shearing|winter market",
    "|",
)
OBJECTS = words(
    "a copper kettle|a bolt of blue linen|a crate of pears|an old map|a wooden chest|a set of brass scales|a bundle "
    "of letters|a cracked lantern|a pair of boots|a basket of eggs|a fiddle|a sack of barley|a painted sign|a silver "
    "spoon|a heavy ledger|a fishing net|a clay jug|a woollen blanket",
    "|",
)
ANIMALS = words(
    "a grey heron|the miller's dog|a flock of geese|an old mare|a pair of ravens|a stray cat|a herd of goats|a red "
    "fox|a swarm of bees|a family of otters|a lame donkey|a white owl",
    "|",
)
GOODS_LIST = ("wool", "salt", "timber", "honey", "lamp oil", "flour", "apples", "rope", "candles", "cheese", "cider")
FEELINGS = ("pleased", "worried", "tired", "curious", "cheerful", "restless", "proud", "annoyed", "hopeful", "quiet")
COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty", "forty")
TOPICS = words(
    "the new tax|the price of grain|the broken dam|the coming winter|the lost ferry|the council election|the well "
    "that ran dry|the wolves in the hills|the road to the coast|the new schoolteacher",
    "|",
)
COLOURS = ("red", "ochre", "green", "blue", "grey", "white", "yellow", "violet", "brown")
PASTIMES = (
    "mended nets",
    "went over the accounts",
    "baked bread",
    "read old letters",
    "sharpened tools",
    "played cards",
)
FRUIT = ("apples", "pears", "plums", "cherries", "quinces", "damsons")
ACTIONS = ("repaired", "sold", "found", "carried", "painted", "lost", "bought", "mended", "delivered", "polished")

_TEMPLATES = (
    "In {month}, {weather} in {town}.",
    "{person}, the {trade} of {town}, {action} {object} near {place}.",
    "The {event} in {town} drew {count} visitors from the neighbouring villages.",
    "{person} was {feeling} when {weather}.",
    "Every {day}, {person} walked to {place} to meet {person2}.",
    "{animal} was seen near {place} {time}.",
    "The road between {town} and {town2} was closed for {count} days after {storm}.",
    "At {place}, {person} argued with {person2} about the price of {goods}.",
    "{time}, the bells of {town} rang {count} times.",
    "{person} wrote to a cousin in {town} that {weather}.",
    "Most people in {town} agreed that the {goods} from {town2} was the best in the valley.",
    "{person} opened a small shop selling {goods} beside {place}.",
    "During the {event}, {animal} wandered into {place} and made everyone laugh.",
    "The council of {town} decided to repair {place} before {month}.",
    "{person} taught {count} children to read at {place}.",
    "It is said that {person} once walked from {town} to {town2} in a single day.",
    "The {trade}s of {town} met at {place} {time} to talk about {topic}.",
    "{weather} on the day of the {event}, but nobody went home early.",
    "{person} traded {object} for {object2} with a traveller from {town}.",
    "By {month}, the orchards around {town} were heavy with {fruit}.",
    "{person} and {person2} were married at {place} in {month}.",
    "A traveller from {town} told stories about {topic} at the inn.",
    "The children of {town} spent the {season} playing by {place}.",
    "{person} painted {place} in shades of {colour} and {colour2}.",
    "When {weather}, the {trade} {person} stayed indoors and {pastime}.",
    "The old barn near {place} had stood empty for {count} years.",
    "{person} lost {object} on the way to the {event} and never found it.",
    "Some say the River {river} floods every {season}, but the people of {town} disagree.",
    "Nobody in {town} was surprised when {person} won the prize at the {event}.",
    "In the {season}, {person} sold {goods} at {place} every {day}.",
)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"


def sentence(rng: random.Random) -> str:
    """One sentence of invented chronicle prose."""
    template = rng.choice(_TEMPLATES)
    colours = rng.sample(COLOURS, 2)
    slots = {
        "month": rng.choice(MONTHS),
        "weather": rng.choice(WEATHER),
        "town": rng.choice(TOWNS),
        "town2": rng.choice(TOWNS),
        "person": person(rng),
        "person2": person(rng),
        "trade": rng.choice(TRADES),
        "action": rng.choice(ACTIONS),
        "object": rng.choice(OBJECTS),
        "object2": rng.choice(OBJECTS),
        "place": rng.choice(PLACES),
        "event": rng.choice(EVENTS),
        "count": rng.choice(COUNTS),
        "feeling": rng.choice(FEELINGS),
        "day": rng.choice(DAYS),
        "animal": rng.choice(ANIMALS),
        "time": rng.choice(TIMES),
        "storm": rng.choice(STORMS),
        "goods": rng.choice(GOODS_LIST),
        "topic": rng.choice(TOPICS),
        "fruit": rng.choice(FRUIT),
        "season": rng.choice(SEASONS),
        "colour": colours[0],
        "colour2": colours[1],
        "pastime": rng.choice(PASTIMES),
        "river": rng.choice(RIVERS),
    }
    return _capitalize(template.format(**slots))


@dataclass
class Haystack:
    """An endless stream of prose sentences drawn from `rng`, grouped into paragraphs of 3 to 7 sentences.

    `render(k, needles)` writes the first `k` sentences with each needle inserted at the sentence boundary nearest
    its depth (0 = before the first sentence, 1 = after the last), so the text grows smoothly with `k`.
    """

    rng: random.Random
    _sentences: list[str] = field(default_factory=list)
    _breaks: list[bool] = field(default_factory=list)  # True: a paragraph ends after this sentence
    _left: int = 0

    def _grow(self, k: int) -> None:
        while len(self._sentences) < k:
            if self._left == 0:
                self._left = self.rng.randint(3, 7)
            self._left -= 1
            self._sentences.append(sentence(self.rng))
            self._breaks.append(self._left == 0)

    def render(self, k: int, needles: Sequence[tuple[float, str]] = ()) -> str:
        """The first `k` sentences with `(depth, text)` needles inserted at their depths, in the given order."""
        self._grow(k)
        at: dict[int, list[str]] = {}
        for depth, text in needles:
            at.setdefault(round(depth * k), []).append(text)
        parts: list[str] = []
        for i in range(k + 1):
            for text in at.get(i, []):
                parts.append(text)
                parts.append(" ")
            if i < k:
                parts.append(self._sentences[i])
                parts.append("\n\n" if self._breaks[i] else " ")
        return "".join(parts).strip()


def fill(
    tokenizer: Any, length: int, rng: random.Random, head: str, needles: Sequence[tuple[float, str]], what: str
) -> tuple[str, int]:
    """`head`, a blank line, then prose with `(depth, text)` needles at their depths, fitted to `length` tokens.

    Returns (context, its token count). Raises ValueError when `length` cannot be met within 5%.
    """
    hay = Haystack(rng)
    return fit(tokenizer, length, lambda k: f"{head}\n\n{hay.render(k, needles)}", max(1, length // 16), what)
