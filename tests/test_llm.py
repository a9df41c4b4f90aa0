"""The LLM object's lifetime: close(), the `with` block and deletion free the engine's memory at once
(KV pool, sparse cache, weights it loaded), a closed LLM refuses further use, and weights passed in
with `loaded=` stay with their owner. (tests/test_llm_cuda.py checks device memory on a GPU.)"""

from __future__ import annotations

import gc
import weakref

import pytest

from hisa import LLM, SamplingParams, SparseConfig

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def _tiny(**kwargs) -> LLM:
    sparse = SparseConfig(algorithm="quest", token_budget=64, min_prompt_len=32, host_pool_gb=0.01,
                          max_sparse_requests=2)
    return LLM("random:tiny-llama", device="cpu", max_model_len=256, page_size=16, progress=False, sparse=sparse,
               **kwargs)


def _held(llm: LLM) -> list[weakref.ref]:
    """Weak references to the big tensors the engine holds: KV pool (sparse buffers included), host pool, weights."""
    e = llm.engine
    tensors = [e.cache.data, *e.sparse.manager.host.layers]  # sparse buffers are pages of the KV pool
    return [weakref.ref(t) for t in tensors] + [weakref.ref(p) for p in e.loaded.model.parameters()]


def test_close_frees_everything_and_refuses_further_use():
    llm = _tiny()
    outs = llm.generate([list(range(1, 48)), [5, 6, 7]], PARAMS, use_tqdm=False)  # one sparse, one dense
    assert [len(o.token_ids) for o in outs] == [4, 4] and llm.engine.sparse.summary()["decode_steps"] > 0
    held = _held(llm)
    llm.close()
    assert all(ref() is None for ref in held)
    with pytest.raises(RuntimeError, match="this engine is closed"):
        llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False)
    llm.close()  # idempotent


def test_with_block_and_deletion_free_the_engine():
    with _tiny() as llm:
        llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False)
        held = _held(llm)
    assert all(ref() is None for ref in held)
    llm = _tiny()
    llm.generate([list(range(1, 48))], PARAMS, use_tqdm=False)
    held = _held(llm)
    del llm  # no close(): deletion alone gives the memory back, without waiting for the garbage collector
    assert all(ref() is None for ref in held)


def test_shared_weights_stay_with_their_owner(smollm2):
    llm = LLM(loaded=smollm2, device="cpu", dtype="float32", max_model_len=128, progress=False)
    first = llm.generate(["The sky is"], PARAMS, use_tqdm=False)[0].token_ids
    cache = weakref.ref(llm.engine.cache.data)
    llm.close()
    gc.collect()
    assert cache() is None
    with LLM(loaded=smollm2, device="cpu", dtype="float32", max_model_len=128, progress=False) as again:
        assert again.generate(["The sky is"], PARAMS, use_tqdm=False)[0].token_ids == first


def test_a_refused_prompt_leaves_nothing_queued_and_other_requests_are_not_mixed_in():
    from hisa.errors import InvalidRequestError

    with _tiny() as llm:
        with pytest.raises(InvalidRequestError, match="empty"):
            llm.generate([[1, 2, 3], []], PARAMS, use_tqdm=False)  # the first was queued before the second failed
        assert not llm.engine.has_unfinished_requests()
        alone = llm.generate([[4, 5, 6]], PARAMS, use_tqdm=False)[0].token_ids
        other = llm.engine.add_request([7, 8, 9], SamplingParams(max_tokens=12, ignore_eos=True))  # not generate()'s
        outs = llm.generate([[4, 5, 6]], PARAMS, use_tqdm=False)
        assert [o.token_ids for o in outs] == [alone]
        assert llm.engine.has_unfinished_requests()  # the other request runs on; its output is its caller's
        while llm.engine.has_unfinished_requests():
            finished = [o for o in llm.engine.step() if o.finished]
            assert [o.request_id for o in finished] in ([], [other])
        assert llm.engine.kv_pages_free() == llm.engine.allocator.num_pages


def test_request_ids_and_token_id_prompts():
    import numpy as np
    import torch

    from hisa.errors import InvalidRequestError

    with _tiny() as llm:
        e = llm.engine
        assert e.add_request([1, 2], PARAMS, request_id="req-1") == "req-1"
        auto = [e.add_request([1, 2], PARAMS) for _ in range(3)]  # the automatic ids go past the one taken
        assert "req-1" not in auto and len(set(auto)) == 3
        with pytest.raises(InvalidRequestError, match="already in use"):
            e.add_request([1, 2], PARAMS, request_id=auto[0])
        for bad in ([1.9, 2], [True, 3], ["7"]):
            with pytest.raises(InvalidRequestError, match="must hold integers"):
                e.add_request(bad, PARAMS)
        ok = [e.add_request(ids, PARAMS) for ids in (np.array([3, 4]), torch.tensor([3, 4]), [np.int64(3), 4])]
        assert [e.num_prompt_tokens(i) for i in ok] == [2, 2, 2]
        for rid in ["req-1", *auto, *ok]:
            e.abort_request(rid)
        with pytest.raises(InvalidRequestError, match="stop strings need a tokenizer"):  # random weights: no text
            e.add_request([1, 2], SamplingParams(max_tokens=4, stop=["."]))


def test_keep_alive_without_the_prefix_cache_is_warned_about_once(caplog):
    import logging

    with _tiny(prefix_cache=False) as llm, caplog.at_level(logging.WARNING, logger="hisa"):
        for _ in range(2):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, keep_alive=True), use_tqdm=False)
    assert sum("keep_alive has no effect" in r.getMessage() for r in caplog.records) == 1


def test_generate_reports_prefill_and_decode_separately(smollm2):
    with LLM(loaded=smollm2, device="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=64,
             progress=False) as llm:
        ids = llm.tokenizer.encode("word " * 150)[:150]
        out = llm.generate([ids], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
        stats = llm.last_stats
    assert stats.prefill_tokens == 150 and stats.steps == 3 + 4  # 3 prefill chunks (64 + 64 + 22), 4 decodes
    assert stats.decode_tokens == 4 and stats.output_tokens == len(out.token_ids) == 5
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert stats.prefill_tok_s == pytest.approx(150 / stats.prefill_s)
    assert "prefill 150 tok in" in stats.summary() and "decode 4 tok in" in stats.summary()


def test_progress_bar_moves_through_prefill_then_decode(capsys):
    from hisa.llm import _Progress

    bar = _Progress(prompt_tokens=150, max_output_tokens=10, disable=False)
    bar.step(still_prefilling=True, prefill_tokens=64, output_tokens=0, stopped_early=0)
    assert (bar.bar.desc.rstrip(": "), bar.bar.n, bar.bar.total) == ("prefill", 64, 150)  # not "prefill 0/150" while prefilling
    bar.step(still_prefilling=False, prefill_tokens=86, output_tokens=1, stopped_early=0)
    assert (bar.bar.desc.rstrip(": "), bar.bar.n, bar.bar.total) == ("decode", 1, 10)
    bar.step(still_prefilling=False, prefill_tokens=0, output_tokens=1, stopped_early=6)  # stopped at 2 of 10
    assert (bar.bar.n, bar.bar.total) == (2, 4)
    bar.close()


def test_a_dense_request_that_could_outgrow_a_pool_sized_for_sparse_requests_is_refused():
    from hisa.errors import InvalidRequestError

    sparse = SparseConfig(algorithm="quest", token_budget=64, min_prompt_len=128, host_pool_gb=0.01)
    smallest = None
    for pages in range(1, 32):  # the smallest device pool the engine accepts: well under max_model_len
        try:
            smallest = LLM("random:tiny-llama", device="cpu", max_model_len=512, page_size=16, progress=False,
                           sparse=sparse, num_kv_pages=pages)
            break
        except Exception:  # noqa: BLE001 — ConfigError: too small
            continue
    assert smallest is not None and pages * 16 < 512
    with smallest as llm:
        room = pages * 16 - 10 + 1
        with pytest.raises(InvalidRequestError, match=f"lower max_tokens to at most {room}"):
            llm.generate([list(range(3, 13))], SamplingParams(max_tokens=room + 1, ignore_eos=True), use_tqdm=False)
        out = llm.generate([list(range(3, 13))], SamplingParams(max_tokens=room, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.token_ids) == room and out.finish_reason == "length"
        # what the server gives a request without max_tokens: the pool's room for a dense one, the context's else
        assert llm.engine.max_output_tokens(list(range(3, 13))) == room
        assert llm.engine.max_output_tokens(list(range(3, 203))) == 512 - 200
        long = llm.generate([list(range(3, 203))], SamplingParams(max_tokens=200, ignore_eos=True), use_tqdm=False)[0]
        assert len(long.token_ids) == 200  # a sparse request is not bound by the device pool


def test_a_kv_pool_larger_than_the_machine_is_a_config_error():
    from hisa.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot allocate the KV pool .*lower kv_cache_gb"):
        LLM("random:tiny-llama", device="cpu", max_model_len=256, page_size=16, progress=False,
            kv_cache_gb=1_000_000)   # 1 PB, past any address space: refused at once, nothing touched
