"""Filler text, needle material and length fitting for the synthetic long-context tasks.

Everything here is deterministic given a seed and imports no torch. The filler is our own:
English-like sentences assembled from the small word lists below (no third-party text), a short
repeated noise line (RULER's "repeat" haystack), or distractor needles (RULER's "needle" haystack).

A haystack is a list of *units* (a sentence, a noise line, a needle) that needles are inserted
between, so a needle always sits at a sentence boundary. :func:`fit_to_length` picks how many units
make a prompt land on a token budget with a few dozen ``encode`` calls at most.

Example::

    >>> stream = SentenceStream(seed=3)
    >>> len(stream.take(5))
    5
    >>> stream.take(2) == stream.take(5)[:2]   # a stream is prefix-stable
    True
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable, Sequence
from typing import Any

# Word lists. Adjectives are suffix-free and nouns prefix-free (tests check it), so a needle key
# "adjective-noun" never occurs inside another key.
ADJECTIVES = tuple("""
amber ancient bitter bold brave brief bright broad busy calm careful cheerful clever curious damp
dark distant dusty eager early elegant empty faint fancy fierce fragile gentle giant gloomy golden
graceful grumpy hasty heavy hidden hollow humble hungry idle jolly keen large lazy little lively
lonely loud lucky mellow merry mighty misty modest narrow neat nervous noble odd orange pale patient
plain polite proud purple quick quiet rapid restless rough royal rusty sandy scarlet secret shallow
sharp shiny silent silver simple sleepy slow smooth soft solemn sour sparkling spicy steady stormy
strange sturdy sudden sunny swift tall tender thirsty tidy tiny tranquil vivid wandering warm wild
windy wise wooden young zealous frosty velvet crimson
""".split())

NOUNS = tuple("""
anchor apple arrow badge bakery balloon banner barrel basket beacon bicycle blanket bottle bridge
bucket butter button cabin cactus camera candle canoe canyon carpet castle cathedral cellar chimney
circus cliff clock cloud comet compass cottage crayon crystal cushion dagger desert diamond dolphin
dragon drum eagle elephant engine falcon feather fence ferry fiddle forest fountain fox garden
garlic giraffe glacier goblet harbor harp helmet hammock hedgehog helicopter honey horizon island
jacket jar jungle kettle kingdom kitten ladder lagoon lantern lemon library lighthouse lizard locket
magnet mango marble meadow melon mirror monkey mountain museum needle notebook oasis ocean orchard
otter owl paddle palace panther parrot pebble pencil pepper piano pillow pirate planet pocket potato
puzzle pyramid quilt rabbit raccoon radio rainbow raven ribbon river robot rocket saddle sailor
salmon scarf scooter shadow shovel signal skeleton sled spider sponge squirrel statue stove
sunflower swan sword teapot telescope tiger tomato tornado tower tractor trumpet tulip tunnel
turtle umbrella unicorn valley vase violin volcano wagon walnut whistle window wizard wolf zebra
""".split())

# (base form, past tense)
VERBS = tuple(tuple(pair.split("/")) for pair in """
carry/carried find/found follow/followed paint/painted watch/watched cross/crossed open/opened
visit/visited remember/remembered build/built lift/lifted describe/described admire/admired
borrow/borrowed clean/cleaned count/counted guard/guarded measure/measured notice/noticed
study/studied repair/repaired trade/traded deliver/delivered greet/greeted explore/explored
collect/collected ignore/ignored chase/chased hide/hid share/shared
""".split())

ADVERBS = tuple("""slowly quietly carefully suddenly gladly rarely often eagerly gently boldly
patiently calmly briskly softly proudly""".split())
PREPOSITIONS = tuple("near behind beside under above across beyond toward along around inside".split())
TIMES = tuple("morning evening afternoon winter summer autumn spring night season week".split())
PEOPLE = ("the baker", "the teacher", "a traveler", "the farmer", "my neighbor", "the captain",
          "an old friend", "the mayor", "a student", "the gardener", "the painter", "the child")

# (template, which slots it uses); slots are filled from the lists above.
_SENTENCES = (
    "The {adj} {noun} {prep} the {noun2} was {adj2}.",
    "{person} {past} the {adj} {noun} {prep} the {noun2}.",
    "Every {time}, {person} {past} {a_noun} and {past2} it {adv}.",
    "Nobody knew why the {noun} was so {adj}.",
    "{adv}, {person} decided to {base} the {noun}.",
    "In the {adj} {time}, the {noun} seemed {adj2} and {adj3}.",
    "It is said that {person} once {past} {a_adj} {noun} {prep} the {noun2}.",
    "The story of the {noun} and the {noun2} is {adj} but {adj2}.",
    "{person} wanted to {base} the {noun}, but the {noun2} was too {adj}.",
    "After {a_adj} {time}, everyone {past} the {noun} {adv}.",
    "Who would {base} {a_adj} {noun} {prep} the {noun2}?",
    "There was {a_noun} {prep} the {noun2}, {adj} and {adj2}.",
)

# Our own short noise line for the "repeat" haystack (RULER repeats a line of five tiny sentences).
NOISE_LINE = "The river is wide. The hills are calm. The road goes on. Here we rest. Then we walk again."

# RULER draws needle depths from 40 evenly spaced levels; so do we when no depth is requested.
DEPTH_LEVELS = tuple(i / 39 for i in range(40))


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


class SentenceStream:
    """An endless, seeded, prefix-stable stream of English-like filler sentences (the "essay" haystack).

    ``take(n)`` returns the first n sentences; a larger n extends the same list, so the text for
    n sentences is always a prefix of the text for n + 1. Sentences hold no digits, no hyphens.

    Example::

        >>> SentenceStream(seed=0).take(2) == SentenceStream(seed=0).take(2)
        True
    """

    def __init__(self, seed: int):
        self._rng = random.Random(seed)
        self._sentences: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._sentences) < n:
            self._sentences.append(self._next())
        return self._sentences[:n]

    def _next(self) -> str:
        r = self._rng
        base, past = r.choice(VERBS)
        slots = dict(
            adj=r.choice(ADJECTIVES), adj2=r.choice(ADJECTIVES), adj3=r.choice(ADJECTIVES),
            noun=r.choice(NOUNS), noun2=r.choice(NOUNS), person=r.choice(PEOPLE),
            past=past, past2=r.choice(VERBS)[1], base=base, adv=r.choice(ADVERBS),
            prep=r.choice(PREPOSITIONS), time=r.choice(TIMES),
        )
        slots["a_noun"] = _article(slots["noun"])
        slots["a_adj"] = _article(slots["adj"])
        return _capitalize(r.choice(_SENTENCES).format(**slots))


class LazyList:
    """A prefix-stable list whose items come from ``make(rng)`` on demand (e.g. distractor needles).

    Example::

        >>> nums = LazyList(lambda rng: rng.randint(0, 9), seed=1)
        >>> nums.take(3) == nums.take(4)[:3]
        True
    """

    def __init__(self, make: Callable[[random.Random], Any], *, seed: int):
        self._make = make
        self._rng = random.Random(seed)
        self._items: list[Any] = []

    def take(self, n: int) -> list[Any]:
        while len(self._items) < n:
            self._items.append(self._make(self._rng))
        return self._items[:n]


class UniqueDraw:
    """Draws values from ``draw(rng)`` that were never drawn before (keys and values stay unique).

    Raises ValueError after ``max_tries`` consecutive repeats: the value space is exhausted.

    Example::

        >>> u = UniqueDraw(random_number, seed=0)
        >>> len({u(), u(), u()})
        3
    """

    def __init__(self, draw: Callable[[random.Random], str], *, seed: int, max_tries: int = 1000):
        self._draw = draw
        self._rng = random.Random(seed)
        self._seen: set[str] = set()
        self._max_tries = max_tries

    def __call__(self, _rng: random.Random | None = None) -> str:
        for _ in range(self._max_tries):
            value = self._draw(self._rng)
            if value not in self._seen:
                self._seen.add(value)
                return value
        raise ValueError(f"ran out of unique values after {len(self._seen)} draws of {self._draw.__name__}; "
                         "ask for a shorter target_tokens")


def random_word_key(rng: random.Random) -> str:
    """A needle key like ``"sleepy-lantern"`` (RULER uses adjective-noun keys)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_uuid(rng: random.Random) -> str:
    """A seeded version-4 UUID string."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A number with exactly ``digits`` digits (no leading zero), as a string."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_var_name(rng: random.Random, length: int = 5) -> str:
    """An upper-case variable name like ``"QZKTA"`` (variable tracking)."""
    return "".join(rng.choices(string.ascii_uppercase, k=length))


def random_coded_word(rng: random.Random, length: int = 6) -> str:
    """A lower-case coded word like ``"xkqpwe"`` (frequent words extraction)."""
    return "".join(rng.choices(string.ascii_lowercase, k=length))


KEY_DRAWS = {"words": random_word_key, "uuids": random_uuid}
VALUE_DRAWS = {"numbers": random_number, "uuids": random_uuid}


def word_pool(rng: random.Random, count: int, *, avoid: Sequence[str] = ()) -> list[str]:
    """``count`` distinct lower-case words: our real words first (shuffled), then pronounceable
    consonant-vowel pseudo-words once those run out. No word contains a word of ``avoid`` or is
    contained in one, and the real words do not contain each other, so substring scoring never
    confuses them. Prefix-stable: the words for ``count`` are a prefix of those for a larger count.

    Example::

        >>> words = word_pool(random.Random(0), 500)
        >>> len(set(words)) == 500
        True
    """
    real = sorted(set(ADJECTIVES) | set(NOUNS) | {p for _, p in VERBS} | set(ADVERBS))
    rng.shuffle(real)

    def clashes(word: str) -> bool:
        return any(a in word or word in a for a in avoid)

    out: list[str] = []
    for word in real:   # real words that do not contain one another either
        if len(out) == count:
            break
        if not clashes(word) and not any(word in o or o in word for o in out):
            out.append(word)
    seen = set(out) | set(real)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    misses = 0
    while len(out) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2)) + rng.choice(consonants)
        if word in seen or clashes(word):
            misses += 1
            if misses > 100 * count:
                raise ValueError(f"cannot draw {count} distinct words; ask for a shorter target_tokens")
            continue
        seen.add(word)
        out.append(word)
    return out


def insert_at_depths(units: Sequence[str], needles: Sequence[tuple[float, str]]) -> tuple[list[str], list[int]]:
    """Insert each ``(depth, text)`` needle between units: depth 0.0 before the first unit, 1.0
    after the last. Needles at the same depth keep their given order. Returns the new list and each
    needle's index in it.

    Example::

        >>> insert_at_depths(["a", "b", "c", "d"], [(0.5, "N"), (1.0, "M")])
        (['a', 'b', 'N', 'c', 'd', 'M'], [2, 5])
    """
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    slots = [round(depth * len(units)) for depth, _ in needles]
    order = sorted(range(len(needles)), key=lambda i: (slots[i], i))
    out: list[str] = []
    where = [0] * len(needles)
    cursor = 0
    for i in order:
        out.extend(units[cursor:slots[i]])
        cursor = max(cursor, slots[i])
        where[i] = len(out)
        out.append(needles[i][1])
    out.extend(units[cursor:])
    return out, where


def fit_to_length(build: Callable[[int], tuple[str, Any]], encode: Callable[[str], Sequence[int]], *,
                  target: int, tolerance: int, n_min: int = 0, n_max: int = 1 << 22,
                  max_calls: int = 32) -> tuple[int, str, int, Any]:
    """Find a filler size n whose prompt ``build(n)[0]`` has ``target - tolerance <= tokens <= target``.

    ``build(n)`` returns ``(prompt, extra)`` and its token count must grow (roughly linearly) with n.
    The first guess comes from the chars-per-token ratio of the empty prompt; it is then corrected
    by secant steps inside a shrinking bracket (bisection when a step stalls). When no n lands in
    the window, the closest n within ``tolerance`` of ``target`` on either side is accepted.
    Returns ``(n, prompt, num_tokens, extra)``.

    Example::

        >>> n, prompt, t, _ = fit_to_length(lambda n: ("x " * (10 + n), None), str.split,
        ...                                 target=500, tolerance=25)
        >>> 475 <= t <= 500
        True
    """
    measured: dict[int, tuple[str, int, Any]] = {}

    def measure(n: int) -> int:
        if n not in measured:
            if len(measured) >= max_calls:
                raise RuntimeError(f"fit_to_length: no filler size reached {target}±{tolerance} tokens "
                                   f"within {max_calls} encode calls")
            prompt, extra = build(n)
            measured[n] = (prompt, len(encode(prompt)), extra)
        return measured[n][1]

    def result(n: int) -> tuple[int, str, int, Any]:
        prompt, tokens, extra = measured[n]
        return n, prompt, tokens, extra

    low, high = target - tolerance, target
    lo = n_min
    t_lo = measure(lo)
    if t_lo > target + tolerance:
        raise ValueError(f"the prompt without filler is already {t_lo} tokens; target_tokens={target} is too "
                         "small for this task")
    if t_lo >= low:
        return result(lo)
    # First guess: chars per filler unit (no encode) over chars per token of the bare prompt.
    probe = 16
    chars_per_unit = max(1.0, (len(build(lo + probe)[0]) - len(measured[lo][0])) / probe)
    chars_per_token = len(measured[lo][0]) / max(t_lo, 1)
    aim = (low + high) / 2
    guess = lo + (aim - t_lo) * chars_per_token / chars_per_unit
    hi, t_hi = None, None
    prev = (lo, t_lo)
    while True:
        upper = n_max if hi is None else hi - 1
        n = min(max(round(guess), lo + 1), upper)
        if n <= lo:
            break
        t = measure(n)
        if low <= t <= high:
            return result(n)
        if t < low:
            lo, t_lo = n, t
        else:
            hi, t_hi = n, t
        if hi is not None and hi - lo <= 1:
            break
        if hi is None:      # extrapolate with the slope of the last two points
            slope = max((t - prev[1]) / (n - prev[0]), 1e-6) if n != prev[0] else 1.0
            guess = n + (aim - t) / slope
        else:
            guess = lo + (aim - t_lo) * (hi - lo) / max(t_hi - t_lo, 1)
            if not lo < round(guess) < hi or (hi - lo) > 8 and len(measured) % 3 == 0:
                guess = (lo + hi) / 2   # bisect now and then so a bad secant cannot stall
        prev = (n, t)
    near = [n for n, (_, t, _) in measured.items() if abs(t - target) <= tolerance]
    if near:
        return result(min(near, key=lambda n: (measured[n][1] > target, abs(measured[n][1] - target))))
    raise ValueError(f"cannot fit the prompt to {target}±{tolerance} tokens: one filler unit adds more than "
                     f"the tolerance (got {t_lo} and {t_hi} tokens)")
