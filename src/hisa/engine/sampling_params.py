"""Per-request sampling settings, validated once when the request arrives.

Every value is checked against what the sampler can do, so nothing a caller sends can fail a step
later: the sampler works in fp32, so a positive temperature must be a normal fp32 number (>= 1.2e-38;
0 means greedy), and a seed must fit a torch generator (0 <= seed < 2**64). Token ids (in
`logit_bias` and `stop_token_ids`) are checked against the vocabulary by `LLMEngine.add_request`,
which knows it (`check_vocab`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hisa.errors import InvalidRequestError, is_finite_number, is_int

FP32_TINY = 1.1754943508222875e-38  # smallest normal fp32: a temperature below it cannot be applied in fp32
FP32_MAX = 3.4028234663852886e38
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 1024  # stop strings are matched against the output text after every token
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence_penalty and frequency_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's range for logit_bias values


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 (or -1), top_p 1.0 and min_p 0 disable those filters.
    `seed` makes a sampled request reproducible regardless of what else is in the batch.
    presence_penalty / frequency_penalty (OpenAI's, in [-2, 2]) lower the logits of tokens already
    generated (once / per occurrence); logit_bias adds a bias in [-100, 100] to given token ids.
    Penalties and biases apply to greedy requests too. keep_alive (not about sampling: a turn of an
    agent session): once the request finishes, its KV pages stay cached ahead of other cached pages
    for the engine's `keep_alive_s`, so the session's next turn finds them after other requests ran.

    Example::

        SamplingParams(max_tokens=64)                                  # greedy
        SamplingParams(temperature=0.8, top_p=0.95, seed=1, stop=["\\n\\n"])
        SamplingParams(temperature=0.7, min_p=0.05, frequency_penalty=0.5, logit_bias={198: -100})
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    keep_alive: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if not is_finite_number(t) or t < 0:
            raise InvalidRequestError(f"temperature must be >= 0 (0 = greedy) and finite, got {t!r}")
        if 0 < t < FP32_TINY or t > FP32_MAX:
            raise InvalidRequestError(f"temperature {t!r} cannot be applied in fp32: use 0 (greedy) or a value "
                                      f"between {FP32_TINY:.2g} and {FP32_MAX:.2g}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        if not is_finite_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_finite_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} "
                                      "characters each")
        if not isinstance(self.stop_token_ids, list) or not all(is_int(t) for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be a list of integers")
        for name in ("ignore_eos", "keep_alive"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value) or not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}")
        if self.logit_bias is not None:
            self.logit_bias = check_logit_bias(self.logit_bias)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """True when penalties or a logit bias change the logits before the token is picked."""
        return self.penalizes or bool(self.logit_bias)

    @property
    def penalizes(self) -> bool:
        """True when presence or frequency penalties read the tokens generated so far."""
        return bool(self.presence_penalty or self.frequency_penalty)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise InvalidRequestError if a token id (logit_bias, stop_token_ids) is outside [0, vocab_size)."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def check_logit_bias(bias) -> dict[int, float]:
    """{token id: bias}; keys may be ints or decimal strings (JSON object keys are strings)."""
    if not isinstance(bias, dict):
        raise InvalidRequestError("logit_bias must map token ids to numbers")
    out = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str):
            token = int(key) if re.fullmatch(r"-?[0-9]{1,18}", key) else None
        if not is_int(token):
            raise InvalidRequestError(f"logit_bias keys must be token ids (integers), got {key!r}")
        if not is_finite_number(value) or not LOGIT_BIAS_RANGE[0] <= value <= LOGIT_BIAS_RANGE[1]:
            raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {value!r} for token {key}")
        out[token] = float(value)
    return out
