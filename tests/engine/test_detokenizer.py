"""Incremental detokenization against the tokenizer's full decode, token by token, on the real
models' tokenizers (SmolLM2's byte-level BPE, Gemma-3's SentencePiece-style vocabulary)."""

from __future__ import annotations

import random

import pytest

from hisa.engine.detokenizer import Detokenizer, DetokState

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Zürich, São Paulo, Kraków — naïve café; 東京タワー and 北京烤鸭 🦊🚀 ok.",
    "  leading spaces,\ttabs,\nnew lines\n\n  and   runs   of spaces  ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "emoji joins: 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and combining é (e + \u0301)",
]


def _check_growing(tok, ids: list[int], *, grows: bool = True) -> None:
    d = Detokenizer(tok)
    state = DetokState()
    last = ""
    for n in range(1, len(ids) + 1):
        full = d.decode(ids[:n])
        text = d.update(state, ids[:n])
        # never ahead of the full decode, never more than an incomplete character's tokens behind it
        assert full.startswith(text), (n, text, full)
        assert text.startswith(last) or not grows  # it only grows: a streaming client's deltas add up
        if not full.endswith("\ufffd"):
            assert text == full, (n, text, full)
        assert d.peek(state, ids[:n]) == full
        last = text


@pytest.fixture(scope="module", params=[None, "gemma3-270m"], ids=["smollm2", "gemma3-270m"])
def tok(request):
    """The tokenizer of the embedded SmolLM2-135M-Instruct (None) or of Gemma-3-270M."""
    from hisa.models.loader import load_tokenizer, resolve_model

    try:  # Gemma-3: the session's model (conftest.gemma3), whose tokenizer took ~40 s to load here
        return request.getfixturevalue("gemma3").tokenizer if request.param else \
            load_tokenizer(resolve_model(request.param))
    except Exception as e:  # noqa: BLE001 — a model not installed here is skipped, not failed
        pytest.skip(f"{request.param} not loadable here: {e}")


def test_incremental_text_equals_the_full_decode_at_every_token(tok):
    for text in TEXTS:
        _check_growing(tok, tok.encode(text, add_special_tokens=False))


def test_random_token_streams_stay_consistent(tok):
    """What a random-weight or confused model emits: any ids, byte tokens that never complete a
    character, special tokens (skipped) in between."""
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(4):
        _check_growing(tok, [rng.randrange(vocab) for _ in range(120)])


def test_a_long_run_of_bytes_that_never_form_a_character_keeps_the_text_a_prefix(tok):
    """25 tokens of lone UTF-8 bytes (a garbled or high-temperature output), then plain text: the
    held-back bytes are given up as "\ufffd" after 24 tokens, as the full decode shows them. Dropping
    them instead made the streamed text differ from the final one and cut a stop string's match at
    the wrong place."""
    hello = tok.encode(" hello world", add_special_tokens=False)
    lone = next(t for t in range(min(len(tok), 4000)) if tok.decode([t]) == "\ufffd"
                and tok.decode([t] * 25 + hello).endswith("\ufffd" + tok.decode(hello)))
    _check_growing(tok, tok.encode("ok", add_special_tokens=False) + [lone] * 25 + hello)


class _SpaceCleanup:
    """A real tokenizer whose decode then removes the space before punctuation, as tokenizers with
    `clean_up_tokenization_spaces` do: decoding more tokens rewrites text decoded before."""

    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids, **kw):
        text = self.inner.decode(ids, **kw)
        for p in (",", ".", "!", "?"):
            text = text.replace(" " + p, p)
        return text


def test_a_tokenizer_that_rewrites_earlier_text_still_gets_the_full_decode(tok):
    ids = tok.encode("Well , this is odd . Is it ? Yes ! Spaces before commas , dots . and so on ." * 3,
                     add_special_tokens=False)
    _check_growing(_SpaceCleanup(tok), ids, grows=False)


def test_engine_streams_growing_text_and_ends_with_the_full_decode(smollm2):
    """Each step's output text extends the previous one, and the finished text is the tokenizer's
    decode of all generated tokens (SmolLM2, sampled at temperature 1 so odd tokens come up)."""
    from hisa import LLM, SamplingParams

    llm = LLM(loaded=smollm2, device="cpu", dtype="float32", progress=False, max_model_len=256)
    e = llm.engine
    rid = e.add_request("Write a short poem with emoji and accents:", SamplingParams(max_tokens=48, temperature=1.0,
                                                                                     seed=3))
    texts = []
    while e.has_unfinished_requests():
        for out in e.step():
            if out.request_id == rid:
                texts.append(out)
    assert all(b.text.startswith(a.text) for a, b in zip(texts, texts[1:]))
    final = texts[-1]
    assert final.finished and final.text == smollm2.tokenizer.decode(final.token_ids, skip_special_tokens=True)
