"""GLM-5 (`glm_moe_dsa`) against transformers' GlmMoeDsaForCausalLM, fp32 on the CPU.

What differs from DeepSeek-V3.2 (tests/models/test_deepseek_v32_vs_hf.py): interleaved RoPE in the
indexer, and "shared" layers that run no indexer and reuse the previous full layer's top-k. A tiny
random model with layers full, shared, full; index_topk 48 of ~300 tokens.
"""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from tests.models.test_deepseek_v32_vs_hf import _hf_greedy, _prompt

PROMPT_LEN, DECODE_STEPS = 300, 8


@pytest.fixture(scope="module")
def tiny_glm(tmp_path_factory):
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = GlmMoeDsaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, n_group=1,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=32, index_topk=48, index_head_dim=32,
        index_n_heads=16, max_position_embeddings=1024, indexer_types=["full", "shared", "full"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(1)
    model = GlmMoeDsaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("tiny_glm_moe_dsa")
    model.save_pretrained(path)
    return path, model


def _llm(path) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", progress=False, page_size=16, max_num_batched_tokens=128)


def test_glm5_logits_and_greedy_tokens_match_transformers(tiny_glm):
    path, model = tiny_glm
    llm = _llm(path)
    d = llm.engine.model_config.dsa
    assert d.indexer_types == ["full", "shared", "full"] and d.indexer_rope_interleaved
    assert llm.engine.runner.model.model.layers[1].self_attn.indexer is None  # shared: no indexer weights
    ids = _prompt(PROMPT_LEN + DECODE_STEPS, seed=3)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, PROMPT_LEN - 1:]
    diff = (llm.engine.score(ids, prefill_tokens=PROMPT_LEN) - ref).abs().max().item()
    assert diff < 2e-3, diff
    prompt = ids[:PROMPT_LEN]
    out = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == _hf_greedy(model, prompt, 16)


def test_glm5_hierarchical_dsa_gives_transformers_tokens(tiny_glm):
    """Hierarchical DSA on GLM-5: a shared layer reuses the previous full layer's token picks, and its own
    buffer loads their pages. Latent KV in the host pool behind a 96-token buffer (page 2, ratio 1) for a
    300-token prompt: transformers' greedy tokens."""
    from hisa.sparse.config import SparseConfig

    path, model = tiny_glm
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, page_size=2, max_num_batched_tokens=128,
              max_model_len=512, sparse=SparseConfig(algorithm="dsa", residency="host", buffer_ratio=1.0,
                                                    min_prompt_len=64, host_pool_gb=0.01))
    prompt = _prompt(PROMPT_LEN, seed=3)
    out = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    stats = llm.engine.sparse.summary()
    assert llm.engine.sparse.manager.ns * 2 < PROMPT_LEN
    assert out.token_ids == _hf_greedy(model, prompt, 16)
    assert stats["decode_steps"] == 15 and all(m > 0 for m in stats["misses_per_layer"])
