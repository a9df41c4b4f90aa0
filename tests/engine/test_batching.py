"""Continuous batching: a batch of mixed-length prompts gives each prompt the output it gets alone."""

from __future__ import annotations

from hisa import SamplingParams
from tests.conftest import long_text


def _prompts(tokenizer):
    lengths = [12, 150, 700, 40, 1300]
    return [tokenizer.encode(long_text(n, seed=i))[:n] for i, n in enumerate(lengths)]


def test_batch_equals_alone_with_chunked_prefill(make_llm):
    llm = make_llm(max_num_batched_tokens=256, page_size=16)
    prompts = _prompts(llm.tokenizer)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    together = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in together] == alone
    assert llm.engine.kv_pages_free() == llm.engine.allocator.num_pages  # nothing leaked


def test_batch_equals_alone_when_pages_run_out(make_llm):
    """The pool holds less than the whole batch, so the batch must preempt and recompute. (The pool's
    prefix cache is off: the prompts run alone first, and the batch would share their cached pages.)"""
    llm = make_llm(num_kv_pages=128, page_size=16, max_model_len=2048, max_num_batched_tokens=512,
                   prefix_cache=False)
    prompts = _prompts(llm.tokenizer)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone
    assert llm.engine.scheduler.num_preemptions > 0, "the test did not exercise preemption"
    assert sum(o.num_preemptions for o in outs) == llm.engine.scheduler.num_preemptions
    assert llm.engine.kv_pages_free() == 128


def test_a_one_token_prompt_piece_is_prefill_not_a_decode_step(make_llm):
    """With two tokens a step and one request decoding, the other's prompt is prefilled one token at a time:
    those pieces must not be sampled as if each were the request's last token (a decode row)."""
    llm = make_llm(max_num_batched_tokens=2, page_size=16)
    prompt = llm.tokenizer.encode(long_text(12, seed=5))[:12]
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = llm.generate([prompt], greedy, use_tqdm=False)[0].token_ids
    eng = llm.engine
    eng.add_request(llm.tokenizer.encode("Once upon a time"), SamplingParams(max_tokens=40, ignore_eos=True),
                    request_id="busy")
    while not any(s.num_output for s in eng.scheduler.running):
        eng.step()   # "busy" decodes from here on and takes one of the step's two tokens
    eng.add_request(prompt, greedy, request_id="late")
    late = None
    while late is None:
        late = next((o for o in eng.step() if o.request_id == "late" and o.finished), None)
    assert late.token_ids == alone
    eng.abort_request("busy")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv_pages_free() == eng.allocator.num_pages


def test_outputs_keep_prompt_order_and_finish_reasons(make_llm):
    llm = make_llm()
    tok = llm.tokenizer
    outs = llm.generate(["Count: 1, 2, 3,", "Hello"], [SamplingParams(max_tokens=5, ignore_eos=True),
                                                      SamplingParams(max_tokens=3, ignore_eos=True)],
                        use_tqdm=False)
    assert [o.prompt for o in outs] == ["Count: 1, 2, 3,", "Hello"]
    assert [len(o.token_ids) for o in outs] == [5, 3]
    assert all(o.finish_reason == "length" for o in outs)
    assert outs[0].text == tok.decode(outs[0].token_ids, skip_special_tokens=True)


def test_eos_and_stop_strings(make_llm):
    llm = make_llm()
    conv = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    out = llm.chat(conv, SamplingParams(max_tokens=60), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_token_ids
    assert "Paris" in out.text
    cut = llm.chat(conv, SamplingParams(max_tokens=60, stop=["Paris"]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop" and "Paris" not in cut.text
    assert out.text.startswith(cut.text)


def test_seeded_sampling_is_reproducible_and_batch_independent(make_llm):
    llm = make_llm()
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = llm.generate(["Once upon a time"], p, use_tqdm=False)[0].token_ids
    b = llm.generate(["Something else entirely", "Once upon a time"],
                     [SamplingParams(max_tokens=16, temperature=1.0), p], use_tqdm=False)[1].token_ids
    assert a == b
    c = llm.generate(["Once upon a time"], SamplingParams(max_tokens=16, temperature=1.0, seed=8,
                                                         ignore_eos=True), use_tqdm=False)[0].token_ids
    assert c != a
