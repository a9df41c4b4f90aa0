"""Hypothesis strategies for random requests to `hisa serve`, and the checks every answer must pass.

Used by tests/server/test_fuzz.py (a bounded run in CI) and bench/fuzz_server.py (the long run). A
request is valid or invalid in every way a client can get it wrong: valid and out-of-range values,
unicode (lone surrogates included), huge and negative numbers, NaN and infinities, wrong types, extra
fields, malformed JSON, invalid UTF-8, deep nesting. Valid requests generate few tokens (a small
max_tokens, or the small context of the fuzzed server), so thousands of examples run in minutes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import httpx
from hypothesis import strategies as st

ABSENT = object()  # a field strategy drew "leave the field out"

# any code point, lone surrogates (which JSON can carry as \ud800 escapes) drawn often
TEXT = st.text(st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"])), max_size=24)
SMALL_TEXT = st.text(max_size=8)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), SMALL_TEXT)
JSON = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(SMALL_TEXT, c, max_size=3),
                    max_leaves=6)


def _field(*strategies):
    """A field's value: one of `strategies`, any JSON value, or absent."""
    return st.one_of(*strategies, JSON, st.just(ABSENT))


SMALL_MAX_TOKENS = st.integers(1, 2)
TEMPERATURES = st.sampled_from([0, 0.0, 1e-40, 1e-38, 1.1754943508222875e-38, 1e-5, 0.7, 2.0, 1e30, 1e39, -1.0,
                                float("inf"), float("nan")])
TOKEN_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=8)

FIELDS = {
    "model": _field(st.just("hisa-test"), SMALL_TEXT),
    "max_tokens": _field(SMALL_MAX_TOKENS, SMALL_MAX_TOKENS, SMALL_MAX_TOKENS, st.integers(-3, 10**30)),
    "max_completion_tokens": _field(SMALL_MAX_TOKENS, st.integers(-3, 2**65)),
    "temperature": _field(TEMPERATURES, st.floats()),
    "top_p": _field(st.floats(0, 1), st.floats()),
    "top_k": _field(st.integers(-2, 60), st.integers()),
    "min_p": _field(st.floats(-0.5, 1.5)),
    "seed": _field(st.integers(0, 2**64 + 5), st.integers(-2**65, 2**70)),
    "stop": _field(TEXT, st.lists(TEXT, max_size=4)),
    "stop_token_ids": _field(st.lists(st.integers(-5, 60000), max_size=3)),
    "n": _field(st.integers(-1, 3)),
    "presence_penalty": _field(st.floats(-3, 3)),
    "frequency_penalty": _field(st.floats(-3, 3)),
    "logit_bias": _field(st.dictionaries(st.one_of(st.integers(-5, 60000).map(str), SMALL_TEXT),
                                         st.one_of(st.floats(-150, 150), JSON), max_size=3)),
    "stream": _field(st.booleans(), st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": _field(st.booleans()),
    "logprobs": _field(st.booleans(), st.integers(0, 5)),
    "echo": _field(st.booleans()),
    "best_of": _field(st.integers(0, 3)),
    "suffix": _field(TEXT),
    "repetition_penalty": _field(st.just(1.0), st.floats(0, 2)),
    "response_format": _field(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
    "tools": _field(st.lists(JSON, max_size=1)),
}
PROMPT = st.one_of(TEXT, TEXT, TOKEN_IDS, st.lists(st.integers(-5, 10**6), max_size=5), st.lists(TEXT, max_size=2),
                   st.lists(TOKEN_IDS, max_size=2), JSON)
CONTENT = st.one_of(TEXT, st.none(), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]), "text": st.one_of(TEXT, JSON)}), max_size=2), JSON)
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer",
                                                                    "tool", "wizard"]), JSON),
                                 "content": CONTENT})
MESSAGES = st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), st.lists(MESSAGE, max_size=3), JSON)
EXTRA_FIELDS = st.dictionaries(st.text(min_size=1, max_size=10), JSON, max_size=2)


def _body(required: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A body where every field may be anything (mostly invalid)."""
    def build(extra, fields):
        return {**extra, **{k: v for k, v in fields.items() if v is not ABSENT}}

    return st.builds(build, EXTRA_FIELDS, st.fixed_dictionaries({**required, **FIELDS}))


PRINTABLE = st.text(min_size=1, max_size=24)
VALID_FIELDS = {  # values the server must accept
    "model": st.just("hisa-test"),
    "max_tokens": SMALL_MAX_TOKENS,
    "temperature": st.one_of(st.just(0), st.floats(0, 2), st.sampled_from([1.1754943508222875e-38, 1e-30, 1e30])),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**64 - 1), "stop": st.lists(PRINTABLE, max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=2), "n": st.just(1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3),
    "stream": st.booleans(), "ignore_eos": st.booleans(), "user": PRINTABLE,
}
MUTATIONS = st.lists(st.sampled_from(sorted(FIELDS)).flatmap(lambda name: st.tuples(st.just(name), FIELDS[name])),
                     max_size=2)


def _mostly_valid(required: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A valid body (a small max_tokens always) with up to two fields replaced by anything (or removed)."""
    def build(fields, mutations, include_usage):
        body = dict(fields)
        if body.get("stream") is True and include_usage is not None:
            body["stream_options"] = {"include_usage": include_usage}
        for name, value in mutations:
            if value is ABSENT:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    optional = {k: v for k, v in VALID_FIELDS.items() if k != "max_tokens"}
    return st.builds(build, st.fixed_dictionaries({**required, "max_tokens": SMALL_MAX_TOKENS}, optional=optional),
                     MUTATIONS, st.one_of(st.none(), st.booleans()))


@dataclass(frozen=True)
class FuzzRequest:
    """What to send: a JSON body (json_body) or raw bytes (raw), to one path."""

    path: str
    json_body: object = None
    raw: bytes | None = None
    content_type: str = "application/json"

    def payload(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.json_body).encode()  # NaN/Infinity as Python's json writes them

    def wants_stream(self) -> bool:
        return isinstance(self.json_body, dict) and self.json_body.get("stream") is True


RAW_BYTES = st.one_of(
    st.binary(max_size=48),
    st.builds(lambda d: b'{"prompt": "a", "max_tokens": ' + b"9" * d + b"}", st.integers(4000, 6000)),
    st.builds(lambda d: b"[" * d + b"]" * d, st.integers(1000, 100_000)),
    st.builds(lambda s, cut: json.dumps({"prompt": s, "max_tokens": 2}).encode()[:cut], TEXT, st.integers(0, 30)),
    st.builds(lambda s: b'{"prompt": "' + s + b'", "max_tokens": 2}', st.binary(min_size=1, max_size=8)),
)
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions"])

VALID_PROMPT = st.one_of(PRINTABLE, TOKEN_IDS)
VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]),
                                                 "content": PRINTABLE}), min_size=1, max_size=2)
REQUESTS = st.one_of(
    st.builds(FuzzRequest, st.just("/v1/completions"), _mostly_valid({"prompt": VALID_PROMPT})),
    st.builds(FuzzRequest, st.just("/v1/completions"), _mostly_valid({"prompt": PROMPT})),
    st.builds(FuzzRequest, st.just("/v1/chat/completions"), _mostly_valid({"messages": VALID_MESSAGES})),
    st.builds(FuzzRequest, st.just("/v1/chat/completions"), _mostly_valid({"messages": MESSAGES})),
    st.builds(FuzzRequest, st.just("/v1/completions"), _body({"prompt": PROMPT})),
    st.builds(FuzzRequest, st.just("/v1/chat/completions"), _body({"messages": MESSAGES})),
    st.builds(FuzzRequest, PATHS, JSON),
    st.builds(FuzzRequest, PATHS, raw=RAW_BYTES),
    st.builds(FuzzRequest, PATHS, raw=RAW_BYTES,
              content_type=st.sampled_from(["text/plain", "application/x-www-form-urlencoded", ""])),
)


@dataclass
class FuzzTally:
    """What the fuzzed server answered: HTTP statuses, streams, and generated tokens (thread-safe)."""

    examples: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    streams: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, status: int, *, tokens: int = 0, stream: bool = False) -> None:
        with self._lock:
            self.examples += 1
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            self.completion_tokens += tokens
            self.streams += stream


def send_and_check(http: httpx.Client, req: FuzzRequest, tally: FuzzTally) -> None:
    """Send `req`; assert the answer is a 2xx/4xx in OpenAI's shape (never a 5xx, never an error event)."""
    headers = {"Content-Type": req.content_type} if req.content_type else {}
    if req.wants_stream():
        with http.stream("POST", req.path, content=req.payload(), headers=headers) as resp:
            if resp.status_code == 200:
                events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
                assert events and events[-1] == "[DONE]", events[-3:]
                tokens = 0
                for e in events[:-1]:
                    chunk = json.loads(e)
                    assert "error" not in chunk, chunk
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                tally.count(200, tokens=tokens, stream=True)
                return
            resp.read()
    else:
        resp = http.post(req.path, content=req.payload(), headers=headers)
    body = resp.json() if resp.status_code < 500 else None
    tally.count(resp.status_code, tokens=body["usage"]["completion_tokens"] if resp.status_code == 200 else 0)
    assert resp.status_code < 500, resp.text
    if resp.status_code == 200:
        assert body["choices"] and body["usage"]["completion_tokens"] >= 1, body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body
