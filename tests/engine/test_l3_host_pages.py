"""Host pool pages that an L3 write reads (a host-backed request's answer, stored for its next turn)
go back to the pool as soon as the write has read them: an idle engine holds none."""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams, SparseConfig
from hisa.models.factory import load_model


@pytest.mark.parametrize("l3_async", [False, True])
def test_an_idle_engine_with_l3_holds_no_host_page(tmp_path, l3_async):
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    prompt = torch.randint(3, 500, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
             num_kv_pages=200, prefix_cache=False, l3=f"file:{tmp_path}", l3_async=l3_async,
             sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                 residency="host")) as llm:
        engine = llm.engine
        llm.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
        if l3_async:
            engine.l3_prefix.drain()   # the write ran on the I/O thread; drain waits for it and frees
        host = engine.sparse.host_allocator
        assert not engine.has_unfinished_requests()
        assert engine.l3_prefix.stats.pages_stored > 0   # the answer's pages were written from the host pool
        assert host.num_free == host.num_pages
        assert engine.sparse.summary()["host_bytes_in_use"] == 0
