"""OpenAI-compatible request and response models (pydantic), and their mapping to SamplingParams.

Requests are validated here, at the boundary, against what the engine can do: ranges (temperature 0
or a normal fp32 number, 0 < top_p <= 1, 0 <= seed < 2**64, penalties in [-2, 2], logit_bias values
in [-100, 100], ...; no inf or NaN anywhere) and unsupported features (n > 1, logprobs, echo, tools,
vLLM's beam search, guided decoding, ...) fail with a message that names the field, and the app turns
the failure into an OpenAI error body with HTTP 400. Token ids are checked against the vocabulary by
the engine (also a 400). Unknown extra fields are ignored, as OpenAI clients send fields this server
has no use for (user, metadata, ...).

Example::

    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "max_tokens": 8})
    params = req.sampling_params(max_tokens=req.max_tokens)   # SamplingParams(max_tokens=8, temperature=1.0, ...)
    # (the server resolves max_tokens first: unset, it is what the context leaves after the prompt)
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationInfo, field_validator,
                      model_validator)

from hisa.engine.sampling_params import (
    FP32_MAX, FP32_TINY, MAX_SEED, MAX_STOP_CHARS, MAX_STOP_STRINGS, PENALTY_RANGE, SamplingParams,
    check_logit_bias,
)
from hisa.errors import InvalidRequestError

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _finite(**kw):
    return Field(default=None, allow_inf_nan=False, strict=True, **kw)


def _strict(default=None, **kw):
    """A scalar field taken as the JSON type it is (OpenAI's API refuses "5" or true for an integer, 1 for a
    boolean): strict, where pydantic would coerce. (A strict float still takes an integer.)"""
    return Field(default=default, strict=True, **kw)



class StreamOptions(_Request):
    include_usage: bool = _strict(False)


# vLLM's extra sampling fields this engine does not implement: refused by name unless left at the default
_UNSUPPORTED_EXTRAS = {
    "repetition_penalty": (None, 1, 1.0), "length_penalty": (None, 1, 1.0), "min_tokens": (None, 0),
    "use_beam_search": (None, False), "include_stop_str_in_output": (None, False), "prompt_logprobs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "truncate_prompt_tokens": (None,), "functions": (None,),
    "function_call": (None, "none"), "tool_choice": (None, "none"), "bad_words": (None, []),
}


def _is_default(value: Any, defaults: tuple) -> bool:
    return any(value == d and type(value) is type(d) for d in defaults)


class _SamplingFields(_Request):
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = _strict(ge=1)
    temperature: float | None = _finite(ge=0.0, le=FP32_MAX)
    top_p: float | None = _finite(gt=0.0, le=1.0)
    top_k: int | None = _strict(ge=-1)  # extra: 0 or -1 = off
    min_p: float | None = _finite(ge=0.0, le=1.0)  # extra (vLLM): drop tokens below min_p x the top probability
    seed: int | None = _strict(ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None  # extra (vLLM)
    n: int | None = _strict(1)
    stream: bool | None = _strict(False)
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = _strict(False)  # extra: generate exactly max_tokens tokens
    keep_alive: bool | None = _strict(False)  # extra: a turn of an agent session: its KV pages stay cached (--keep-alive)
    presence_penalty: float | None = _finite(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    frequency_penalty: float | None = _finite(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    logit_bias: dict[str, StrictFloat] | None = None   # (a strict float still takes an integer)
    # refused unless left at their defaults (_UNSUPPORTED_EXTRAS)
    repetition_penalty: Any = None
    length_penalty: Any = None
    min_tokens: Any = None
    use_beam_search: Any = None
    include_stop_str_in_output: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    truncate_prompt_tokens: Any = None
    functions: Any = None
    function_call: Any = None
    tool_choice: Any = None
    bad_words: Any = None

    @field_validator(*_UNSUPPORTED_EXTRAS)
    @classmethod
    def _unsupported_extra(cls, value: Any, info: ValidationInfo) -> Any:
        if not _is_default(value, _UNSUPPORTED_EXTRAS[info.field_name]):
            raise ValueError(f"{info.field_name} is not supported; leave it out")
        return value

    @field_validator("temperature")
    @classmethod
    def _fp32_temperature(cls, t: float | None) -> float | None:
        if t is not None and 0 < t < FP32_TINY:
            raise ValueError(f"temperature {t!r} is below fp32's smallest normal number ({FP32_TINY:.2g}) and "
                             "cannot be applied; use 0 for greedy")
        return t

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported; send one request per completion")
        return 1

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict | None) -> dict | None:
        if value is None:
            return None
        try:
            return check_logit_bias(value)
        except InvalidRequestError as e:
            raise ValueError(str(e).removeprefix("logit_bias ")) from None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Engine sampling settings; `max_tokens` is resolved by the caller (it may depend on the prompt).
        Raises InvalidRequestError for values SamplingParams rejects."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else float(self.top_p),
            min_p=float(self.min_p or 0.0), seed=self.seed, stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=bool(self.ignore_eos),
            keep_alive=bool(self.keep_alive),
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0), logit_bias=self.logit_bias or None)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt` is a string or a list of token ids (one prompt per request)."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    echo: bool | None = _strict(False)
    logprobs: int | None = _strict()
    best_of: int | None = _strict()
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("batched prompts are not supported; send one request per prompt")
            prompt = prompt[0]
        if (isinstance(prompt, str) and not prompt) or (isinstance(prompt, list) and not prompt):
            raise ValueError("the prompt is empty")
        if isinstance(prompt, str):
            _check_unicode(prompt, "the prompt")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    def requested_max_tokens(self) -> int:
        return DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as one string; text parts are joined, other part types are rejected."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)

    @field_validator("content")
    @classmethod
    def _unicode_content(cls, content):
        texts = [content] if isinstance(content, str) else [p.get("text") for p in content or []]
        for text in texts:
            if isinstance(text, str):
                _check_unicode(text, "the content")
        return content


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = _strict(ge=1)
    logprobs: bool | None = _strict(False)
    top_logprobs: int | None = _strict()
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _text_only(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for i, m in enumerate(messages):
            try:
                m.text()
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from None
        return messages

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them ("developer" is OpenAI's newer name of "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


# -- responses ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the full response and a stream chunk (OpenAI uses object "text_completion" for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "hisa"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def _check_unicode(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, which JSON can carry as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate at character {e.start}") from None


def new_id(prefix: str) -> str:
    """A request id in OpenAI's style: "cmpl-…" or "chatcmpl-…"."""
    return f"{prefix}-{uuid.uuid4().hex}"
