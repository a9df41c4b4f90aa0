"""Many LLM objects in one process on one GPU: each gives its device memory back when closed (close(),
the `with` block, or deletion), so ten in a row each serve a 4K-token request; and when the GPU is
full of engines still open, the pool-size error says what holds the memory.

Run on a GPU machine: `python -m pytest -q tests/test_llm_cuda.py`. Skipped without CUDA.
"""

from __future__ import annotations

import gc

import pytest
import torch

from hisa import LLM, SamplingParams, SparseConfig
from hisa.errors import ConfigError
from tests.conftest import long_text

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT_TOKENS = 4096
PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
GIB = 2**30


def _prompt(tokenizer) -> list[int]:
    ids = tokenizer.encode(long_text(4 * PROMPT_TOKENS // 3, seed=7))[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS
    return ids


def _sparse(i: int) -> SparseConfig | None:
    """Every other engine runs the 4K prompt sparse (device buffers, pinned host pool, CUDA graphs)."""
    return SparseConfig(algorithm="quest", token_budget=1024, host_pool_gb=1.0) if i % 2 else None


def test_ten_llms_in_a_row_each_run_a_4k_request():
    torch.cuda.empty_cache()
    free_at_start, _ = torch.cuda.mem_get_info()
    outputs: dict[bool, list[int]] = {}
    for i in range(10):
        how = ("with", "close", "del")[i % 3]
        llm = LLM(device="cuda", progress=False, sparse=_sparse(i))  # default: 0.85 of free memory for KV
        pool_pages = llm.engine.allocator.num_pages
        if how == "with":
            with llm:
                out = llm.generate([_prompt(llm.tokenizer)], PARAMS, use_tqdm=False)[0]
        else:
            out = llm.generate([_prompt(llm.tokenizer)], PARAMS, use_tqdm=False)[0]
            if how == "close":
                llm.close()
            else:
                del llm
        assert out.num_prompt_tokens == PROMPT_TOKENS and len(out.token_ids) == 16
        # every engine got a pool as large as the first one's: nothing of the earlier ones is left
        outputs.setdefault(i % 2 == 1, out.token_ids)
        assert out.token_ids == outputs[i % 2 == 1], f"engine {i} ({how}) answered differently"
        free, _ = torch.cuda.mem_get_info()
        assert free > free_at_start - 1 * GIB, f"engine {i} ({how}) left {(free_at_start - free) / GIB:.1f} GiB held"
        assert pool_pages > 1000, f"engine {i} got a KV pool of {pool_pages} pages"


def test_pool_size_error_says_what_holds_memory_and_closing_fixes_it():
    torch.cuda.empty_cache()
    open_llms = []
    try:
        with pytest.raises(ConfigError) as e:
            for _ in range(8):  # each takes 0.85 of what is free: the GPU fills within a few
                open_llms.append(LLM(device="cuda", progress=False))
        message = str(e.value)
        assert "cannot hold one request" in message and "this process holds" in message
        assert "not yet closed" in message and ".close()" in message
        assert len(open_llms) >= 2
    finally:
        for llm in open_llms:
            llm.close()
        open_llms.clear()
        gc.collect()
    with LLM(device="cuda", progress=False) as llm:  # all closed: a fresh engine gets its pool again
        assert llm.engine.allocator.num_pages > 1000
        assert llm.generate(["The sky is"], SamplingParams(max_tokens=4), use_tqdm=False)[0].token_ids
