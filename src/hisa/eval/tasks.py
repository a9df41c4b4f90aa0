"""Seeded RULER-style synthetic long-context tasks, generated offline to a token budget.

Each generator has the signature ``(tokenizer, *, target_tokens, depth=None, seed=0, **knobs)`` and
returns a :class:`TaskSample` whose prompt (context + question) measures within
``max(5 %, 64)`` tokens below ``target_tokens`` with ``tokenizer.encode`` when some filler size lands
there; otherwise the closest size within that tolerance on either side (at small targets the task's
own text may leave no size below: e.g. ~150 tokens for niah_multiquery at 84), and a ValueError when
even no filler is over the target by more. The chat template adds its tokens on top. The model's reply is
meant to start with ``sample.answer_prefix`` (RULER appends it after the prompt); a reply scores by
how many of ``sample.expected`` it contains (see :mod:`hisa.eval.scoring`).

Tasks (RULER's synthetic set, plus passkey retrieval):

====================  ==========================================================================
niah_single_1         one number needle in repeated noise
niah_single_2         one number needle in essay-like filler
niah_single_3         one UUID needle in essay-like filler
niah_multikey_1       four keys in essay filler, one asked
niah_multikey_2       the haystack is itself distractor number needles, one asked
niah_multikey_3       as multikey_2 with UUID keys and UUID values
niah_multivalue       one key with four values, all four expected
niah_multiquery       four keys, all four asked
vt                    variable tracking: ``VAR A = 12345``, ``VAR B = VAR A``, ... in noise
cwe                   common words extraction: the 10 most repeated words of a numbered list
fwe                   frequent words extraction: the 3 most frequent coded words (Zipf counts)
passkey               "The pass key is 71432. Remember it. 71432 is the pass key." in noise
====================  ==========================================================================

Example::

    >>> class Words:                                    # any object with encode(text) -> ids
    ...     def encode(self, text): return text.split()
    >>> s = niah_single_2(Words(), target_tokens=2000, depth=0.5, seed=1)
    >>> s.expected[0] in s.prompt and 1900 <= s.num_tokens <= 2000
    True
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from hisa.eval.haystack import (DEPTH_LEVELS, KEY_DRAWS, NOISE_LINE, VALUE_DRAWS, LazyList, SentenceStream,
                                UniqueDraw, fit_to_length, insert_at_depths, random_coded_word, random_number,
                                random_var_name, word_pool)


class Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...


@dataclass(frozen=True, slots=True)
class TaskSample:
    """One prompt with its expected answers.

    task: registry name, e.g. "niah_single_2".
    prompt: the full user message (context + question).
    answer_prefix: the text the model's answer starts with (put at the start of the assistant turn).
    expected: strings that must all appear in the model's output (case-insensitive).
    num_tokens: ``len(tokenizer.encode(prompt))``.
    seed: the seed this sample was generated from; the same seed gives the same prompt.
    depth: fraction of the haystack before the (first) answer needle, requested or drawn from the
        seed; None for tasks without a needle (cwe, fwe).
    metadata: task details: ``target_tokens``, ``context_span`` (char offsets of the context in
        prompt), needle positions, knob values.
    """

    task: str
    prompt: str
    answer_prefix: str
    expected: list[str]
    num_tokens: int
    seed: int
    depth: float | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def _tolerance(target_tokens: int) -> int:
    return max(64, int(0.05 * target_tokens))


def _check_args(tokenizer: Any, target_tokens: int, depth: float | None, seed: int) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have encode(text) -> list[int], got {type(tokenizer).__name__}")
    if not isinstance(target_tokens, int) or target_tokens <= 0:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] or None, got {depth}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def _fit(tokenizer: Tokenizer, build: Callable[[int], tuple[str, Any]], target_tokens: int, *, n_min: int = 0):
    return fit_to_length(build, tokenizer.encode, target=target_tokens, tolerance=_tolerance(target_tokens),
                         n_min=n_min)


def _assemble(head: str, units: list[str], sep: str, tail: str) -> tuple[str, tuple[int, int]]:
    context = sep.join(units)
    start = len(head) + 1
    return f"{head}\n{context}\n{tail}", (start, start + len(context))


def _join_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


# --------------------------------------------------------------------------- needle in a haystack

@dataclass(frozen=True, slots=True)
class NiahSpec:
    """What a needle-in-a-haystack variant looks like (RULER's niah knobs).

    haystack: "noise" (a repeated noise line), "essay" (varied filler sentences) or "needle"
        (distractor needles of the same form). key_type: "words" or "uuids". value_type:
        "numbers" (7 digits) or "uuids". num_keys: needles with distinct keys; num_values: values
        per key; num_queries: keys asked about (each asked key's values are all expected).
    """

    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    def __post_init__(self):
        if self.haystack not in ("noise", "essay", "needle"):
            raise ValueError(f"haystack must be 'noise', 'essay' or 'needle', got {self.haystack!r}")
        if self.key_type not in KEY_DRAWS or self.value_type not in VALUE_DRAWS:
            raise ValueError(f"key_type must be one of {sorted(KEY_DRAWS)} and value_type one of "
                             f"{sorted(VALUE_DRAWS)}, got {self.key_type!r}, {self.value_type!r}")
        if not 1 <= self.num_queries <= self.num_keys or self.num_values < 1:
            raise ValueError(f"need 1 <= num_queries <= num_keys and num_values >= 1, got {self}")


def niah(tokenizer: Tokenizer, *, target_tokens: int, depth: float | None = None, seed: int = 0,
         spec: NiahSpec = NiahSpec(), task: str = "niah") -> TaskSample:
    """Needle in a haystack: needles "One of the special magic numbers for KEY is: VALUE." hidden in
    filler; the question asks for the values of ``spec.num_queries`` keys.

    With ``depth`` given, the asked needles sit together at that depth and the other keys' needles
    at seeded random depths; with None every needle gets a random depth from 40 levels (as RULER).

    Example::

        >>> class Words:
        ...     def encode(self, text): return text.split()
        >>> s = niah(Words(), target_tokens=1000, depth=0.0, seed=0, spec=NiahSpec(num_keys=4))
        >>> len(s.expected), s.prompt.count(s.expected[0])
        (1, 1)
    """
    _check_args(tokenizer, target_tokens, depth, seed)
    rng = random.Random(seed)
    draw_key = UniqueDraw(KEY_DRAWS[spec.key_type], seed=rng.getrandbits(64))
    draw_value = UniqueDraw(VALUE_DRAWS[spec.value_type], seed=rng.getrandbits(64))
    keys = [draw_key() for _ in range(spec.num_keys)]
    values = [[draw_value() for _ in range(spec.num_values)] for _ in keys]
    asked = sorted(rng.sample(range(spec.num_keys), spec.num_queries))
    plural = spec.num_queries * spec.num_values > 1
    kind = spec.value_type if plural else spec.value_type[:-1]

    def needle(key: str, value: str) -> str:
        return f"One of the special magic {spec.value_type} for {key} is: {value}."

    # Asked needles go at the requested depth; the rest (all, when depth is None) at distinct random levels.
    count = spec.num_keys * spec.num_values
    levels = rng.sample(DEPTH_LEVELS, count) if count <= len(DEPTH_LEVELS) else rng.choices(DEPTH_LEVELS, k=count)
    needles = []      # (depth, text, key index)
    for i, key in enumerate(keys):
        for value in values[i]:
            d = depth if depth is not None and i in asked else levels[len(needles)]
            needles.append((d, needle(key, value), i))
    answer_depth = next(d for d, _, i in needles if i in asked)
    if spec.haystack == "essay":
        filler, sep = SentenceStream(rng.getrandbits(64)), " "
    elif spec.haystack == "noise":
        filler, sep = LazyList(lambda _: NOISE_LINE, seed=0), "\n"
    else:  # distractor needles drawing keys and values from the same unique pools
        filler, sep = LazyList(lambda _: needle(draw_key(), draw_value()), seed=0), "\n"

    query = _join_list([keys[i] for i in asked])
    head = (f"Some special magic {spec.value_type} are hidden within the following text. Make sure to memorize "
            f"it. I will quiz you about the {spec.value_type} afterwards.")
    if plural:
        tail = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
        answer_prefix = f"The special magic {kind} for {query} mentioned in the provided text are"
    else:
        tail = f"What is the special magic {kind} for {query} mentioned in the provided text?"
        answer_prefix = f"The special magic {kind} for {query} mentioned in the provided text is"

    def build(n: int):
        units = filler.take(n)
        placed, where = insert_at_depths(units, [(d, text) for d, text, _ in needles])
        prompt, span = _assemble(head, placed, sep, tail)
        return prompt, (span, [w / max(len(placed) - 1, 1) for w in where])

    n, prompt, num_tokens, (span, positions) = _fit(tokenizer, build, target_tokens)
    return TaskSample(
        task=task, prompt=prompt, answer_prefix=answer_prefix,
        expected=[v for i in asked for v in values[i]], num_tokens=num_tokens, seed=seed, depth=answer_depth,
        metadata=dict(target_tokens=target_tokens, context_span=span, haystack_units=n, spec=asdict(spec),
                      needles=[dict(key=keys[k], text=t, depth=d, position=p, asked=k in asked)
                               for (d, t, k), p in zip(needles, positions)]))


# --------------------------------------------------------------------------- variable tracking

def variable_tracking(tokenizer: Tokenizer, *, target_tokens: int, depth: float | None = None, seed: int = 0,
                      num_chains: int = 1, num_hops: int = 4, task: str = "vt") -> TaskSample:
    """Variable tracking: chains ``VAR QZKTA = 12345``, ``VAR HBRUE = VAR QZKTA``, ... spread (in
    order) through noise lines; the question asks for every variable holding the first chain's value.
    Other chains are distractors with other values. ``depth`` places the first assignment of the
    asked chain; its later hops fall at random points after it (None: all random, as RULER).

    Example::

        >>> class Words:
        ...     def encode(self, text): return text.split()
        >>> s = variable_tracking(Words(), target_tokens=1000, seed=0)
        >>> len(s.expected)
        5
    """
    _check_args(tokenizer, target_tokens, depth, seed)
    if num_chains < 1 or num_hops < 1:
        raise ValueError(f"num_chains and num_hops must be >= 1, got {num_chains}, {num_hops}")
    rng = random.Random(seed)
    draw_var = UniqueDraw(random_var_name, seed=rng.getrandbits(64))
    draw_value = UniqueDraw(lambda r: random_number(r, 5), seed=rng.getrandbits(64))
    chains, statements = [], []        # statements: (depth, text)
    for c in range(num_chains):
        names = [draw_var() for _ in range(num_hops + 1)]
        value = draw_value()
        chains.append((names, value))
        lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(num_hops)]
        first = depth if (c == 0 and depth is not None) else rng.random()
        rest = sorted(first + (1.0 - first) * rng.random() for _ in range(num_hops))
        statements.extend(zip([first] + rest, lines))
    names, value = chains[0]
    answer_depth = statements[0][0]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    tail = f"Question: Find all variables that are assigned the value {value} in the text above."
    answer_prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} "
                     f"variables are assigned the value {value}, they are:")

    def build(n: int):
        placed, _ = insert_at_depths([NOISE_LINE] * n, statements)
        return _assemble(head, placed, "\n", tail)

    n, prompt, num_tokens, span = _fit(tokenizer, build, target_tokens)
    return TaskSample(task=task, prompt=prompt, answer_prefix=answer_prefix, expected=list(names),
                      num_tokens=num_tokens, seed=seed, depth=answer_depth,
                      metadata=dict(target_tokens=target_tokens, context_span=span, haystack_units=n,
                                    value=value, chains=[dict(names=v, value=x) for v, x in chains]))


# --------------------------------------------------------------------------- aggregation tasks

def _no_depth(task: str, depth: float | None) -> None:
    if depth is not None:
        raise ValueError(f"{task} has no needle, so depth must be None (got {depth})")


def common_words(tokenizer: Tokenizer, *, target_tokens: int, depth: float | None = None, seed: int = 0,
                 num_common: int = 10, freq_common: int | None = None, freq_uncommon: int | None = None,
                 task: str = "cwe") -> TaskSample:
    """Common words extraction: a numbered list "1. word 2. word ..." where ``num_common`` words
    repeat ``freq_common`` times and the rest ``freq_uncommon`` times; expected = the common words.
    Frequencies default to RULER's: 30 and 3, or 6 and 1 below 4096 target tokens.

    Example::

        >>> class Words:
        ...     def encode(self, text): return text.split()
        >>> s = common_words(Words(), target_tokens=1000, seed=0)
        >>> len(s.expected), s.metadata["freq_common"]
        (10, 6)
    """
    _check_args(tokenizer, target_tokens, depth, seed)
    _no_depth(task, depth)
    small = target_tokens < 4096
    freq_common = freq_common if freq_common is not None else (6 if small else 30)
    freq_uncommon = freq_uncommon if freq_uncommon is not None else (1 if small else 3)
    if not freq_common > freq_uncommon >= 1:
        raise ValueError(f"need freq_common > freq_uncommon >= 1, got {freq_common}, {freq_uncommon}")
    rng = random.Random(seed)
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.")
    tail = f"Question: What are the {num_common} most common words in the above list?"
    answer_prefix = f"Answer: The top {num_common} words that appear most often in the list are:"
    # no answer word inside the question's own words ("often" was one): a reply echoing them scores nothing
    asked = sorted({w for w in re.findall(r"[a-z]+", f"{head} {tail} {answer_prefix}".lower()) if len(w) >= 3})
    common = word_pool(rng, num_common, avoid=asked)
    uncommon: list[str] = []
    shuffle_seed = rng.getrandbits(64)
    pool_seed = rng.getrandbits(64)

    def build(n: int):
        if len(uncommon) < n:   # regrow with the same seed: word_pool(k) is a prefix of word_pool(m > k)
            uncommon[:] = word_pool(random.Random(pool_seed), max(n, 2 * len(uncommon)), avoid=common)
        words = common * freq_common + uncommon[:n] * freq_uncommon
        random.Random(shuffle_seed).shuffle(words)
        return _assemble(head, [f"{i + 1}. {w}" for i, w in enumerate(words)], " ", tail)

    n, prompt, num_tokens, span = _fit(tokenizer, build, target_tokens)
    return TaskSample(task=task, prompt=prompt, answer_prefix=answer_prefix, expected=common,
                      num_tokens=num_tokens, seed=seed, depth=None,
                      metadata=dict(target_tokens=target_tokens, context_span=span, num_uncommon=n,
                                    freq_common=freq_common, freq_uncommon=freq_uncommon))


def frequent_words(tokenizer: Tokenizer, *, target_tokens: int, depth: float | None = None, seed: int = 0,
                   alpha: float = 2.0, vocab_size: int = 2000, word_length: int = 6,
                   task: str = "fwe") -> TaskSample:
    """Frequent words extraction: coded words with Zipf counts ``n * k**-alpha / zeta(alpha)``
    (rank 1 is the noise token "...", as RULER); expected = the coded words of ranks 2, 3, 4.

    Example::

        >>> class Words:
        ...     def encode(self, text): return text.split()
        >>> s = frequent_words(Words(), target_tokens=1000, seed=0)
        >>> [s.prompt.count(w) for w in s.expected] == sorted((s.prompt.count(w) for w in s.expected), reverse=True)
        True
    """
    _check_args(tokenizer, target_tokens, depth, seed)
    _no_depth(task, depth)
    if alpha <= 1.0:
        raise ValueError(f"alpha must be > 1 for a Zipf law, got {alpha}")
    rng = random.Random(seed)
    draw = UniqueDraw(lambda r: random_coded_word(r, word_length), seed=rng.getrandbits(64))
    vocab = ["..."] + [draw() for _ in range(vocab_size - 1)]
    zeta = sum(k ** -alpha for k in range(1, 10_000)) + 10_000 ** (1 - alpha) / (alpha - 1)
    shuffle_seed = rng.getrandbits(64)
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words.")
    tail = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?")
    answer_prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"

    def counts(n: int) -> list[int]:
        return [int(n * k ** -alpha / zeta) for k in range(1, len(vocab) + 1)]

    def build(n: int):
        words = [w for w, c in zip(vocab, counts(n)) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(words)
        return _assemble(head, words, " ", tail)

    n_min = 0
    while len(set(counts(n_min)[1:5])) < 4 or counts(n_min)[4] == 0:    # ranks 2..5 strictly apart
        n_min += 16
    n, prompt, num_tokens, span = _fit(tokenizer, build, target_tokens, n_min=n_min)
    if not counts(n)[1] > counts(n)[2] > counts(n)[3] > counts(n)[4]:
        raise ValueError(f"fwe: target_tokens={target_tokens} is too small for a clear top 3")
    return TaskSample(task=task, prompt=prompt, answer_prefix=answer_prefix, expected=vocab[1:4],
                      num_tokens=num_tokens, seed=seed, depth=None,
                      metadata=dict(target_tokens=target_tokens, context_span=span, num_words=n, alpha=alpha,
                                    counts=counts(n)[:5]))


# --------------------------------------------------------------------------- passkey

def passkey(tokenizer: Tokenizer, *, target_tokens: int, depth: float | None = None, seed: int = 0,
            digits: int = 5, task: str = "passkey") -> TaskSample:
    """Passkey retrieval: "The pass key is 71432. Remember it. 71432 is the pass key." at ``depth``
    of repeated noise; expected = [passkey].

    Example::

        >>> class Words:
        ...     def encode(self, text): return text.split()
        >>> s = passkey(Words(), target_tokens=1000, depth=0.25, seed=7)
        >>> s.prompt.count(s.expected[0])
        2
    """
    _check_args(tokenizer, target_tokens, depth, seed)
    rng = random.Random(seed)
    key = random_number(rng, digits)
    answer_depth = depth if depth is not None else rng.choice(DEPTH_LEVELS)
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.")
    tail = "What is the pass key?"

    def build(n: int):
        placed, _ = insert_at_depths([NOISE_LINE] * n, [(answer_depth, info)])
        return _assemble(head, placed, " ", tail)

    n, prompt, num_tokens, span = _fit(tokenizer, build, target_tokens)
    return TaskSample(task=task, prompt=prompt, answer_prefix="The pass key is", expected=[key],
                      num_tokens=num_tokens, seed=seed, depth=answer_depth,
                      metadata=dict(target_tokens=target_tokens, context_span=span, haystack_units=n))


# --------------------------------------------------------------------------- registry and suites

def _niah_task(name: str, **spec: Any) -> Callable[..., TaskSample]:
    fn = functools.partial(niah, spec=NiahSpec(**spec), task=name)
    functools.update_wrapper(fn, niah)
    fn.__name__ = fn.__qualname__ = name
    return fn


niah_single_1 = _niah_task("niah_single_1", haystack="noise")
niah_single_2 = _niah_task("niah_single_2")
niah_single_3 = _niah_task("niah_single_3", value_type="uuids")

TASKS: dict[str, Callable[..., TaskSample]] = {
    "niah_single_1": niah_single_1,
    "niah_single_2": niah_single_2,
    "niah_single_3": niah_single_3,
    "niah_multikey_1": _niah_task("niah_multikey_1", num_keys=4),
    "niah_multikey_2": _niah_task("niah_multikey_2", haystack="needle"),
    "niah_multikey_3": _niah_task("niah_multikey_3", haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": _niah_task("niah_multivalue", num_values=4),
    "niah_multiquery": _niah_task("niah_multiquery", num_keys=4, num_queries=4),
    "vt": variable_tracking,
    "cwe": common_words,
    "fwe": frequent_words,
    "passkey": passkey,
}
"""Task name -> generator ``(tokenizer, *, target_tokens, depth=None, seed=0) -> TaskSample``."""

DEPTHLESS_TASKS = frozenset({"cwe", "fwe"})
"""Tasks without a needle: they take no depth."""


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and the parts (stable across runs and Python versions).

    Example::

        >>> derive_seed(0, "vt", 4096, 0) == derive_seed(0, "vt", 4096, 0) != derive_seed(0, "vt", 4096, 1)
        True
    """
    text = ":".join(repr(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def generate_suite(tokenizer: Tokenizer, *, tasks: Sequence[str], lengths: Sequence[int], samples_per_task: int,
                   seed: int = 0, depths: Sequence[float] | None = None) -> list[TaskSample]:
    """Every sample of a task x length (x depth) grid, in that order, each from its own derived seed.

    With ``depths`` None each needle task draws its depth from the sample seed; with a list, needle
    tasks get ``samples_per_task`` samples per depth (a depth heatmap) and cwe/fwe one set.
    The same arguments give byte-identical samples.

    Example::

        >>> class Words:
        ...     def encode(self, text): return text.split()
        >>> suite = generate_suite(Words(), tasks=["passkey", "cwe"], lengths=[1000], samples_per_task=2, seed=0)
        >>> [(s.task, s.metadata["target_tokens"]) for s in suite]
        [('passkey', 1000), ('passkey', 1000), ('cwe', 1000), ('cwe', 1000)]
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if samples_per_task < 1:
        raise ValueError(f"samples_per_task must be >= 1, got {samples_per_task}")
    samples = []
    for task in tasks:
        task_depths: Sequence[float | None] = [None] if depths is None or task in DEPTHLESS_TASKS else depths
        for length in lengths:
            for depth in task_depths:
                for index in range(samples_per_task):
                    parts = (task, length, index) if depth is None else (task, length, depth, index)
                    samples.append(TASKS[task](tokenizer, target_tokens=length, depth=depth,
                                               seed=derive_seed(seed, *parts)))
    return samples


__all__ = ["TaskSample", "NiahSpec", "TASKS", "DEPTHLESS_TASKS", "niah", "niah_single_1", "niah_single_2",
           "niah_single_3", "variable_tracking", "common_words", "frequent_words", "passkey", "generate_suite",
           "derive_seed"]
