"""What generated tasks share: per-sample random generators, needle depths, keys and values, and fitting a context
to a token budget of the given tokenizer.

Lengths are counted as `len(tokenizer(context, add_special_tokens=False).input_ids)`: the context alone, without
chat template, question or answer prefix.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvsqueeze.bench.tasks.base import Sample, Task
from kvsqueeze.validation import check_float, check_int


def words(text: str, sep: str | None = None) -> tuple[str, ...]:
    """A tuple of the parts of `text` (vocabularies are written as long strings to stay readable)."""
    return tuple(text.split(sep))


TOLERANCE = 0.05  # a context is within 5% of its target length, or the task raises ValueError
PRECISION = 0.01  # fitting stops once within 1%

ADJECTIVES = words(
    "amber ancient bitter brave bright brisk calm clever cold crimson curious damp dark dusty eager early faint "
    "fierce fragile gentle golden grand hollow humble icy idle jolly keen lively lonely lucky mellow misty narrow "
    "noble odd pale patient plain proud quick quiet rapid rare restless rough rusty scarlet shy silent silver sleepy "
    "slow smooth solemn sour steady stormy sturdy sunny swift tender tidy velvet vivid wary wild windy wise witty"
)
NOUNS = words(
    "anchor apple arrow badger basket beacon beetle bell bison blossom bottle bramble bridge bucket button candle "
    "canyon carpet castle cedar chimney cliff clock comet copper cradle crane crater crow cypress dagger daisy "
    "dolphin dragon drum eagle ember falcon feather fern fiddle flute forest fountain fox garden garnet glacier goblet "
    "harbor harp hawk hazel helmet heron hill honey horizon island ivy jackal jasmine kettle kite ladder lantern "
    "lemon lily lizard locket magnet maple marble meadow mirror moth mountain needle nest oak orchid otter owl "
    "paddle panther parrot pebble pepper pigeon pillow pine planet pond quartz quill rabbit raven reef ribbon river "
    "robin saddle salmon sparrow spider spoon spruce squirrel star stone tiger timber tulip turtle valley violin "
    "walnut whale willow wolf zebra"
)
# A larger pool of common single words (common/uncommon words extraction): nouns, verbs and adjectives.
COMMON_WORDS = tuple(
    dict.fromkeys(
        NOUNS
        + ADJECTIVES
        + words(
            "acre actor album alley altar angle ankle apron arch arena armor atlas attic autumn avenue bacon badge "
            "bakery ballad bamboo banana banner barrel basin beard belt bench berry blade blanket bloom board boat "
            "bone bonnet boot border bowl box bracelet branch bread brick broom brush cabin cable cactus cake camel "
            "camera canal cannon canoe canvas cape captain card cargo carrot cart cattle cave cellar chain chair chalk "
            "cheese cherry chess chest circle circus cloak cloud clover coal coast coat coconut coffee coin collar "
            "compass cookie coral cord cork corn cottage cotton couch cousin crab cream crown crystal cup curtain "
            "cushion daisy desert desk diamond dinner doctor donkey door dove dress drawer duck dune dust engine "
            "fabric factory farmer fence ferry field finger flag flame flask fleet floor flour flower fog folder "
            "fork fossil frame frog fruit furnace gallery gate giant ginger glove goat gown grape grass gravel "
            "guitar hammer handle hat hay hedge hero hinge hood hook horn horse hotel hut igloo inkwell iron jacket "
            "jam jar jelly jewel journal jungle kernel key king kitchen knife knot lace lake lamb lamp lawn leaf "
            "leather lens letter lever library lime linen lion lobster lock log loom lute mango map mask mast meal "
            "melon mill mint mitten monk monkey moon moss mouse mule mushroom music nail napkin net novel nut oar "
            "ocean olive onion orange oven paint palace palm pan paper parade parcel path peach peanut pear pearl "
            "pencil piano picnic pie pillar pilot pipe pirate pitcher plate plum pocket poem pony porch potato pot "
            "powder prince puppet purse puzzle queen quilt radio rail rain raisin ranch razor recipe rice ring road "
            "rock roof rope rose ruby rug sail salad sand sandal satchel scarf school scroll seal shadow shawl shelf "
            "shell shield ship shirt shoe shovel silk singer skate sketch sled slipper snail snow soap sock sofa "
            "soldier soup spade spice sponge spring stable stage stamp statue steam stool storm stove straw stream "
            "string sugar suitcase summer swan sweater sword table tail tailor teacup temple tent thimble thread "
            "throne thunder ticket tile toast tomato tongue tower town toy tractor trail train tray treasure tree "
            "trumpet tunnel umbrella uniform vase vest village vine wagon wallet wand wardrobe water wax wheat wheel "
            "whistle window wine wing winter wire wizard wool yacht yarn yard"
        )
    )
)
VALUE_TYPES = ("numbers", "words", "uuids")
_VALUE_NAMES = {"numbers": "number", "words": "word", "uuids": "UUID"}


def sample_rng(task: str, seed: int, index: int, part: str = "") -> random.Random:
    """The generator of one sample: a string seed is hashed with SHA-512, so it does not depend on PYTHONHASHSEED."""
    return random.Random(f"kvsqueeze/{task}/{seed}/{index}/{part}")


def balanced_choice(options: Sequence[str], task: str, seed: int, index: int, part: str) -> str:
    """One of `options` for sample `index`, drawn so that every block of len(options) consecutive samples uses each
    option once, in an order shuffled per block by a generator seeded with (task, seed, block, part)."""
    order = list(options)
    sample_rng(task, seed, index // len(order), f"{part}-order").shuffle(order)
    return order[index % len(order)]


def spread_depth(index: int) -> float:
    """Depths that cover [0, 1] evenly for any number of samples: 0, 1, 0.5, 0.25, 0.75, 0.125, 0.625, ..."""
    if index < 2:
        return float(index)
    n, depth, base = index - 1, 0.0, 0.5  # van der Corput sequence in base 2 from its second term
    while n:
        depth += base * (n & 1)
        n >>= 1
        base /= 2
    return depth


def check_depth(depth: float | None) -> None:
    check_float("depth", depth, 0.0, 1.0, none_ok=True, note="spread over samples")


def value_name(kind: str) -> str:
    """'numbers' -> 'number' (as in 'the special magic number')."""
    return _VALUE_NAMES[kind]


def make_values(rng: random.Random, kind: str, n: int, avoid: set[str] | None = None) -> list[str]:
    """`n` distinct values: 7-digit numbers, 'adjective-noun' words or UUIDs (never one in `avoid`)."""
    seen = set(avoid or ())
    out: list[str] = []
    while len(out) < n:
        if kind == "numbers":
            value = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "words":
            value = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        else:
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit(tokenizer: Any, length: int, make: Callable[[int], str], guess: int, what: str) -> tuple[str, int]:
    """`make(k)` for a k >= 0 whose token count is within 1% of `length` (else the closest one tried); raises
    ValueError when that is not within 5%.

    Token counts grow about linearly with k: a probe at a quarter of `guess` gives tokens per unit, then secant
    steps converge in one or two more tokenizations of the full text (tokenization is the whole cost).
    """
    counts: dict[int, int] = {}

    def count(k: int) -> int:
        if k not in counts:
            counts[k] = count_tokens(tokenizer, make(k))
        return counts[k]

    base = count(0)
    k = max(1, guess // 4) if base < length else 0
    for _ in range(24):
        c = count(k)
        if abs(c - length) <= max(1.0, PRECISION * length) or (k == 0 and c >= length):
            break
        nxt = max(0, round(k + (length - c) * k / max(c - base, 1))) if k else max(1, guess)
        if nxt in counts:  # converged to a unit boundary: try the neighbour of the best k on the far side
            best = min(counts, key=lambda j: abs(counts[j] - length))
            nxt = best + 1 if counts[best] < length else best - 1
            if nxt in counts or nxt < 0:
                break
        k = nxt
    best = min(counts, key=lambda j: (abs(counts[j] - length), j))
    n_tokens = counts[best]
    if abs(n_tokens - length) > TOLERANCE * length:
        raise ValueError(
            f"cannot build a {what} context of {length} tokens (closest: {n_tokens}, the minimum is about {base}); "
            f"ask for a length >= {int(base / (1 - TOLERANCE)) + 1}"
        )
    return make(best), n_tokens


@dataclass
class GeneratedTask(Task):
    """A task whose samples are made one by one from a per-sample random generator (subclasses define `make`)."""

    def samples(self, tokenizer: Any, length: int, n: int, seed: int = 0) -> list[Sample]:
        check_int("length", length, 16, 10_000_000)
        check_int("n", n, 0, 10_000_000)
        check_int("seed", seed)
        return [self.make(tokenizer, length, i, seed) for i in range(n)]

    def make(self, tokenizer: Any, length: int, index: int, seed: int) -> Sample:
        raise NotImplementedError
