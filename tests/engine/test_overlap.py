"""Overlap mode (hisa.engine.overlap): the same tokens, texts and finish reasons as the synchronous
engine, whatever ends a request (length, EOS, stop token, stop string, abort) and whatever forces a
drain (a request arriving mid-decode, preemption, demotion); nothing leaks."""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.engine.sequence import PENDING_TOKEN
from hisa.models.factory import load_model
from hisa.sparse.config import SparseConfig


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)


def _random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def _run(engine, requests, *, on_step=None):
    """Drive `engine` until done: requests = [(prompt, params)] added at once; `on_step(engine, i)`
    runs before the i-th step() (to add or abort requests). Returns {request id: final output}."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    finals, i = {}, 0
    while engine.has_unfinished_requests():
        if on_step is not None:
            on_step(engine, i)
        for out in engine.step():
            assert PENDING_TOKEN not in out.token_ids
            if out.finished:
                assert out.request_id not in finals, "a request finished twice"
                finals[out.request_id] = out
        i += 1
    return ids, finals


def _same(a, b):
    return [(o.token_ids, o.text, o.finish_reason) for o in a] == [(o.token_ids, o.text, o.finish_reason) for o in b]


def test_stops_lengths_and_stop_strings_give_the_synchronous_outputs(make_llm):
    """A batch ending by EOS, max_tokens, a stop token and a stop string (each seen one step late in
    overlap mode: the extra token is dropped) gives exactly the synchronous engine's outputs."""
    runs = {}
    for overlap in (False, True):
        llm = make_llm(overlap=overlap, max_model_len=512)
        tok = llm.tokenizer
        conv = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        chat = llm.apply_chat_template(conv)
        plain = tok.encode("Count: 1, 2, 3,")
        reqs = [(chat, SamplingParams(max_tokens=60)),  # EOS
                (plain, SamplingParams(max_tokens=7, ignore_eos=True)),  # length
                (chat, SamplingParams(max_tokens=60, stop=["Paris"])),  # stop string
                (plain, SamplingParams(max_tokens=30, stop_token_ids=[tok.encode(" 6")[-1]])),  # stop token
                (tok.encode("Hello"), SamplingParams(max_tokens=1))]  # one token: the prefill's
        ids, finals = _run(llm.engine, reqs)
        runs[overlap] = [finals[i] for i in ids]
        assert llm.engine.kv_pages_free() == llm.engine.allocator.num_pages
        if overlap:
            assert llm.engine.num_overlapped_steps >= 6
            assert all(not s.pending for s in llm.engine._seqs.values())
        llm.close()
    assert [o.finish_reason for o in runs[True]] == ["stop", "length", "stop", "stop", "length"]
    assert "Paris" in runs[True][0].text and "Paris" not in runs[True][2].text
    assert _same(runs[True], runs[False])


def test_abort_of_a_request_whose_token_is_in_flight(tiny):
    """Aborted with its token in flight: that token is dropped (no output, no PENDING left), its pages
    come back, and the other requests finish as they do synchronously."""
    prompts = _random_prompts([40, 70, 25])
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 30, 25)]
    want = {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  overlap=overlap)
        engine, seen = llm.engine, {}

        def abort_mid_decode(engine, i):
            if i == 6:
                seq = engine._seqs[ids[1]]
                assert seq.pending == overlap and (engine._in_flight is not None) == overlap
                assert engine.abort_request(ids[1])
                assert PENDING_TOKEN not in seq.token_ids
                seen["aborted_at"] = seq.num_output

        ids = [f"r{k}" for k in range(3)]
        for k, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(p, sp, request_id=ids[k])
        finals = {}
        while engine.has_unfinished_requests():
            abort_mid_decode(engine, seen.setdefault("i", 0))
            seen["i"] += 1
            for out in engine.step():
                assert out.request_id != ids[1] or seen["i"] <= 6, "an output after the abort"
                if out.finished:
                    finals[out.request_id] = out.token_ids
        assert ids[1] not in finals and seen["aborted_at"] > 0
        assert engine.kv_pages_free() == engine.allocator.num_pages
        want[overlap] = finals
        llm.close()
    assert want[True] == want[False]


def test_a_request_arriving_mid_decode_drains_then_overlaps_again(tiny):
    """A request added while others decode makes a prefill step: the step in flight is resolved first
    (a drain), then decoding overlaps again; outputs equal the synchronous engine's."""
    prompts = _random_prompts([50, 90, 120])
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (24, 12, 18)]
    outs, counts = {}, {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  overlap=overlap)
        late = []

        def add_late(engine, i):
            if i == 5:
                late.append(engine.add_request(prompts[2], params[2]))

        ids, finals = _run(llm.engine, list(zip(prompts[:2], params[:2])), on_step=add_late)
        outs[overlap] = [finals[i].token_ids for i in ids + late]
        counts[overlap] = llm.engine.num_overlapped_steps
        assert llm.engine.kv_pages_free() == llm.engine.allocator.num_pages
        llm.close()
    assert outs[True] == outs[False]
    assert counts[False] == 0 and counts[True] >= 15  # overlapped before and after the new request's prefill


def test_a_prompt_one_token_longer_than_the_step_budget(tiny):
    """The first chunk stops one token short of the prompt's end: the step computing that last token is
    not a decode of an output token and runs synchronously; the outputs equal the synchronous engine's."""
    prompts = _random_prompts([9, 17])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=4, max_model_len=64,
                  max_num_batched_tokens=8, overlap=overlap)
        outs[overlap] = [[o.token_ids for o in llm.generate([p], params, use_tqdm=False)] for p in prompts]
        outs[overlap].append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.engine.kv_pages_free() == llm.engine.allocator.num_pages
        llm.close()
    assert outs[True] == outs[False]


def test_preemption_under_a_small_pool(tiny):
    """The pool holds less than the batch: steps that need pages drain and preempt synchronously, the
    others overlap; outputs equal the synchronous engine's (and the batch's preemptions are the same)."""
    prompts = _random_prompts([200, 150, 180, 120], seed=1)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    res = {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  num_kv_pages=48, max_num_batched_tokens=256, prefix_cache=False, overlap=overlap)
        ids, finals = _run(llm.engine, [(p, params) for p in prompts])
        res[overlap] = ([finals[i].token_ids for i in ids], llm.engine.scheduler.num_preemptions,
                        llm.engine.num_overlapped_steps)
        assert llm.engine.kv_pages_free() == 48
        llm.close()
    assert res[True][0] == res[False][0]
    assert res[True][1] > 0 and res[True][2] > 0


@pytest.mark.parametrize("residency", ["host", "auto"])
def test_sparse_requests_give_the_synchronous_tokens_and_statistics(tiny, residency):
    """Quest, host-backed, or resident beside a dense request on a pool that runs short (`auto`: a
    demotion, which drains, then host-backed): the same tokens and the same selection statistics."""
    prompts = _random_prompts([300, 260, 40], seed=2)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 40, 26)]
    res = {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  max_num_batched_tokens=1024, num_kv_pages=42 if residency == "auto" else None,
                  sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                      residency=residency), overlap=overlap)
        engine = llm.engine
        ids, finals = _run(engine, list(zip(prompts, params)))
        st = engine.sparse.summary()
        res[overlap] = ([finals[i].token_ids for i in ids], engine.scheduler.num_demotions,
                        {k: st[k] for k in ("decode_steps", "hits", "misses", "selected_pages")})
        assert engine.allocator.num_free == engine.allocator.num_pages
        assert engine.sparse.host_allocator.num_free == engine.sparse.host_allocator.num_pages
        if overlap:
            assert engine.num_overlapped_steps > 10
        llm.close()
    assert res[True] == res[False]
    if residency == "host":
        assert res[True][2]["misses"] > 0
    if residency == "auto":
        assert res[True][1] > 0, "the test did not exercise demotion"


def test_sampled_requests_overlap_with_their_seeded_tokens(tiny):
    """Temperature, top-k, top-p, min-p and logit-bias requests are drawn on the device and overlap
    like greedy ones, with the synchronous engine's tokens (seeded: their own generators); a request
    with a penalty reads the token in flight, so the steps it runs in are synchronous."""
    prompts = _random_prompts([30, 45, 25, 38], seed=4)
    params = [SamplingParams(max_tokens=24, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=22, temperature=1.1, top_k=20, top_p=0.9, min_p=0.02, seed=11, ignore_eos=True,
                             logit_bias={7: 3.0, 11: -2.0}),
              SamplingParams(max_tokens=6, temperature=0.7, presence_penalty=0.5, seed=5, ignore_eos=True)]
    res = {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  overlap=overlap)
        ids, finals = _run(llm.engine, list(zip(prompts, params)))
        res[overlap] = [(finals[i].token_ids, finals[i].finish_reason) for i in ids]
        if overlap:  # the penalty request decodes 6 tokens synchronously, then the other three overlap
            assert 12 <= llm.engine.num_overlapped_steps <= 18
        llm.close()
    assert res[True] == res[False]
    assert len({tuple(t) for t, _ in res[True]}) == 4


@pytest.mark.parametrize("overlap", [False, True])
def test_a_row_with_nan_logits_fails_its_request_alone(tiny, overlap):
    """The model gives one sampled request NaN logits in one step: that request ends with "error",
    the others (one of them sampled) get the tokens of a run without the fault; in overlap mode the
    failed row still feeds a valid token to the step launched after it."""
    prompts = _random_prompts([30, 45, 25], seed=9)
    params = [SamplingParams(max_tokens=14, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=0.9, seed=2, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=0.9, seed=7, ignore_eos=True)]

    rids = ["r0", "r1", "r2"]

    def run(fault: bool):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  overlap=overlap)
        engine = llm.engine
        real, calls = engine.runner.run, [0]

        def run_with_fault(batch, *a, **k):
            logits, rows = real(batch, *a, **k)
            calls[0] += 1
            if fault and calls[0] == 8:  # a decode step: poison the third request's row
                logits = logits.clone()  # (an inference tensor cannot be written in place)
                for r, i in enumerate(rows):
                    if batch.seqs[i].request_id == rids[2]:
                        logits[r] = float("nan")
            return logits, rows

        engine.runner.run = run_with_fault
        for (prompt, sp), rid in zip(zip(prompts, params), rids):
            engine.add_request(prompt, sp, request_id=rid)
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert PENDING_TOKEN not in out.token_ids
                if out.finished:
                    finals[out.request_id] = out
        if overlap:  # the poisoned step was an overlapped one
            assert engine.num_overlapped_steps > 5
        llm.close()
        return [finals[r] for r in rids]

    clean, faulty = run(False), run(True)
    assert [o.finish_reason for o in faulty] == ["length", "length", "error"]
    assert "not finite" in str(faulty[2].error)
    assert faulty[0].token_ids == clean[0].token_ids and faulty[1].token_ids == clean[1].token_ids
    assert len(faulty[2].token_ids) < 14 and faulty[2].token_ids == clean[2].token_ids[:len(faulty[2].token_ids)]


def test_score_and_close_with_overlap_on(tiny):
    """score() (teacher forcing) runs synchronously; close() with a step in flight frees everything."""
    llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512, overlap=True)
    doc = _random_prompts([40], seed=5)[0]
    ref = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
              overlap=False)
    torch.testing.assert_close(llm.engine.score(doc, prefill_tokens=30), ref.engine.score(doc, prefill_tokens=30))
    ref.close()
    engine = llm.engine
    engine.add_request(_random_prompts([20], seed=6)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None and engine.has_unfinished_requests()
    llm.close()
    assert engine._in_flight is None and engine.closed


def test_replayed_overlapped_steps_equal_eager_synchronous_steps(tiny):
    """Replayed decode steps (the CPU stand-in for CUDA graphs re-runs the recorded step) read the input
    ids the overlap gather wrote into the static buffers: the same tokens as eager synchronous steps."""
    from hisa.engine.cuda_graph import DecodeGraphs

    prompts = _random_prompts([230, 250, 60], seed=5)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (30, 20, 12)]
    res = {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                      residency="host"), overlap=overlap)
        if overlap:
            llm.engine.runner.graphs = DecodeGraphs(torch.device("cpu"), capture=lambda body: body)
        ids, finals = _run(llm.engine, list(zip(prompts, params)))
        res[overlap] = [finals[i].token_ids for i in ids]
        if overlap:
            graphs = llm.engine.runner.graphs
            assert graphs.captures == 3 and graphs.replays > 20 and llm.engine.num_overlapped_steps > 20
        llm.close()
    assert res[True] == res[False]


def test_requests_waiting_for_a_slot_do_not_stop_the_overlap(tiny):
    """With every request slot taken, a waiting request cannot be admitted: decoding overlaps; when a
    slot frees, the step in flight drains and the waiting request is prefilled. Same outputs."""
    prompts = _random_prompts([30, 50, 40, 20], seed=8)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (10, 25, 14, 9)]
    res = {}
    for overlap in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  max_num_seqs=2, overlap=overlap)
        ids, finals = _run(llm.engine, list(zip(prompts, params)))
        res[overlap] = [finals[i].token_ids for i in ids]
        if overlap:  # 2 at a time: 28 of 34 steps overlap although requests wait (14 or fewer if waiting stopped it)
            assert llm.engine.num_overlapped_steps > 20
        llm.close()
    assert res[True] == res[False]
