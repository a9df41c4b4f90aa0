"""What the engine hands back to callers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """The state of one request after an engine step (or at the end of `LLM.generate`).

    `text` and `token_ids` hold everything generated so far; `finished` tells whether more will
    come. `finish_reason` is "stop" (EOS, a stop token or a stop string), "length" (max_tokens or
    the context limit), "abort", or "error": the engine failed this request (`error` holds the
    exception; a `HisaError` when the request's input was the cause) and freed its pages.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    error: Exception | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
