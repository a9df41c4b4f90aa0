"""Latency under mixed load, through the real engine: with a per-step token budget, a long prompt's
prefill runs in bounded steps that every decode joins, and a short prompt that arrives meanwhile gets
its first token in the next step."""

from __future__ import annotations

from hisa import SamplingParams
from tests.conftest import long_text

BUDGET = 64


def test_short_request_first_token_one_step_after_arrival(make_llm):
    llm = make_llm(max_num_batched_tokens=BUDGET)
    engine, tok = llm.engine, llm.tokenizer
    engine.add_request(tok.encode("Count: 1, 2,"), SamplingParams(max_tokens=50, ignore_eos=True),
                       request_id="decoding")
    engine.step()  # prefilled: decodes from now on
    long_ids = tok.encode(long_text(900, seed=2))[:1000]
    engine.add_request(long_ids, SamplingParams(max_tokens=1), request_id="long")
    tokens_per_step, decoded = [], 0
    for _ in range(2):  # the long prefill is under way
        outs = {o.request_id for o in engine.step()}
        tokens_per_step.append(engine.last_step_tokens)
        decoded += "decoding" in outs
    engine.add_request(tok.encode("Hi"), SamplingParams(max_tokens=1), request_id="short")
    outs = {o.request_id: o for o in engine.step()}
    tokens_per_step.append(engine.last_step_tokens)
    assert "short" in outs and outs["short"].finished  # its first (and only) token, one step after it arrived
    assert "decoding" in outs and decoded == 2  # the decode ran in every step of the long prefill
    assert "long" not in outs and engine.num_prefilling == 1  # the long prompt is still being prefilled
    assert tokens_per_step == [BUDGET] * 3  # every step bounded by the budget
    engine.abort_request("long")
    engine.abort_request("decoding")
    assert engine.allocator.num_used == 0
