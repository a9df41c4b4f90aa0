"""Gemma-3 on CUDA (Triton decode, fused prefill) against the CPU reference paths, at the real
attention shape of Gemma-3-270M: head_dim 256, 4 query heads over 1 KV head, a 512-token window."""

from __future__ import annotations

import pytest
import torch

from hisa import LLM
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.factory import random_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE_270M = dict(num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                  hidden_size=256, intermediate_size=512, num_layers=6,
                  layer_types=["sliding_attention"] * 5 + ["full_attention"])


@pytest.mark.parametrize("sparse", [None, "quest"])
def test_teacher_forced_logits_on_cuda_match_the_cpu(sparse):
    """A 1,200-token document (past the window), its last 24 tokens fed through decode steps: the
    fp32 logits of the CUDA engine equal the CPU engine's."""
    from hisa.sparse.config import SparseConfig

    cfg = ModelConfig(**{**PRESETS["tiny-gemma3"], **SHAPE_270M})
    ids = torch.randint(3, cfg.vocab_size, (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = {}
    cpu = random_model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=3)
    cuda = random_model(cfg, device=torch.device("cuda"), dtype=torch.float32, seed=3)
    cuda.model.load_state_dict(cpu.model.state_dict())  # the CUDA generator draws other numbers
    for device, loaded in (("cpu", cpu), ("cuda", cuda)):
        sp = None if sparse is None else SparseConfig(algorithm=sparse, token_budget=512, min_prompt_len=64,
                                                      host_pool_gb=0.5)
        llm = LLM(loaded=loaded, device=device, dtype="float32", progress=False, max_model_len=2048, sparse=sp,
                  kv_cache_gb=0.5)
        logits[device] = llm.engine.score(ids, prefill_tokens=len(ids) - 24)
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=2e-3, rtol=2e-3)
