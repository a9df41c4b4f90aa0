"""A DeepSeek-V3.2 model (MLA + DSA) in the engine: preemption, captured decode steps, cache sizing.

The tiny random preset (`random:tiny-deepseek-v3.2`, index_topk 32) with its weights scaled up so
attention and routing matter; prompts longer and shorter than the selection.
"""

from __future__ import annotations

import os

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.engine.cuda_graph import DecodeGraphs
from hisa.kvcache.mla_cache import MLAKVCache
from tests.conftest import sharp_tiny_dsa

PROMPT_LENS, MAX_TOKENS = (20, 90, 45), (24, 12, 18)


@pytest.fixture(scope="module")
def tiny():
    return sharp_tiny_dsa(seed=3)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _generate(loaded, **kwargs) -> tuple[list[list[int]], LLM]:
    kwargs.setdefault("max_model_len", 512)
    llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=16, **kwargs)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    outs = llm.generate(_prompts(loaded.config.vocab_size), params, use_tqdm=False)
    return [o.token_ids for o in outs], llm


def test_batch_equals_alone_and_survives_preemption(tiny):
    alone = [_generate(tiny, max_num_seqs=1)[0][i] for i in range(len(PROMPT_LENS))]
    together, _ = _generate(tiny, max_num_batched_tokens=32)
    assert together == alone
    tight, llm = _generate(tiny, num_kv_pages=8, max_model_len=128)  # 8 pages; the requests need 14
    assert tight == alone
    assert llm.engine.scheduler.num_preemptions > 0, "the test did not exercise preemption"
    assert llm.engine.kv_pages_free() == 8  # nothing leaked


def test_replayed_decode_steps_equal_eager_steps(tiny):
    """Decode steps recorded once per padded row count and replayed (the CPU recorder re-runs the
    recorded step on the static buffers) give the eager tokens: the DSA step reads nothing from the
    host. The full-width page table also sends short contexts through the indexer, which must then
    select every token."""
    eager, _ = _generate(tiny)
    llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512)
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(torch.device("cpu"), capture=lambda body: body)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    replayed = llm.generate(_prompts(tiny.config.vocab_size), params, use_tqdm=False)
    assert [o.token_ids for o in replayed] == eager
    assert runner.graphs.captures > 0 and runner.graphs.replays > 0


def test_kv_pool_is_sized_by_latent_and_indexer_bytes(tiny):
    llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, kv_cache_gb=0.001,
              max_model_len=512)
    cache, d = llm.engine.cache, tiny.config.dsa
    assert isinstance(cache, MLAKVCache)
    page_bytes = tiny.config.num_layers * 16 * (d.kv_lora_rank + d.qk_rope_head_dim + d.index_head_dim) * 4
    # the pool the allocator hands out, plus the scratch page padding rows write into
    assert cache.num_pages == int(0.001 * 2**30 // page_bytes) + 1 and cache.nbytes == cache.num_pages * page_bytes
    assert llm.engine.allocator.num_pages == cache.num_pages - 1


@pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the kernel on CPU tensors, in the interpreter (tests/conftest.py sets it only "
                           "without CUDA); the CUDA kernel has its own tests")
def test_engine_through_the_triton_kernel_equals_the_reference(tiny, monkeypatch):
    """The engine's decode rows through the Triton kernel (interpreter on a CPU) give the tokens of the
    torch reference: the cache views, page tables and selections it passes are what the kernel reads."""
    import functools

    import hisa.engine.dsa_attention as dsa_attention

    prompt = _prompts(tiny.config.vocab_size)[2]  # 45 tokens: the indexer selects 32 of them
    params = SamplingParams(max_tokens=5, ignore_eos=True)

    def run() -> list[int]:
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=128)
        return llm.generate([prompt], params, use_tqdm=False)[0].token_ids

    reference = run()
    monkeypatch.setattr(dsa_attention, "mla_decode_attention",
                        functools.partial(dsa_attention.mla_decode_attention, use_triton=True))
    assert run() == reference
