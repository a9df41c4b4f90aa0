"""The Python API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from typing import Sequence as Seq

from tqdm.auto import tqdm

from hisa.config import EngineConfig
from hisa.engine.llm_engine import LLMEngine
from hisa.engine.outputs import RequestOutput
from hisa.engine.sampling_params import SamplingParams
from hisa.errors import InvalidRequestError


class LLM:
    """Offline batched generation.

    Example::

        from hisa import LLM, SamplingParams
        llm = LLM()                                   # embedded SmolLM2-135M-Instruct, CPU
        out = llm.chat([{"role": "user", "content": "Name a planet."}], SamplingParams(max_tokens=16))
        print(out[0].text, out[0].finish_reason)

    Keyword arguments are :class:`hisa.config.EngineConfig` fields (device, dtype, page_size, ...).
    """

    def __init__(self, model: str | None = None, *, loaded=None, **engine_kwargs):
        """`loaded` (a `hisa.models.factory.LoadedModel`) reuses weights already in memory."""
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), loaded=loaded)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        results: dict[str, RequestOutput] = {}
        # Progress in tokens computed: prompt tokens prefilled plus tokens generated.
        total = sum(self.engine.num_prompt_tokens(i) + sp.max_tokens for i, sp in zip(ids, params))
        max_tokens = dict(zip(ids, (sp.max_tokens for sp in params)))
        bar = tqdm(total=total, desc="prefill", unit="tok", disable=not use_tqdm, leave=False)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.total -= max_tokens[out.request_id] - out.num_output_tokens  # stopped early
                bar.set_description("prefill" if self.engine.num_prefilling else "decode")
                bar.update(self.engine.last_step_tokens)
        except BaseException:
            for rid in ids:  # nothing is left behind in the engine if the caller interrupts
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c) for c in convs], sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use generate() with a plain prompt")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
