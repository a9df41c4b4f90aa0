"""Gemma-3-270M's attention shape (random weights): teacher-forced logits on CPU/CUDA in fp32/bf16.

A 6-layer random-weight model with Gemma-3-270M's attention (head_dim 256, 4 query heads on 1 KV
head, a 512-token window, 5 sliding + 1 global layer, hidden 640), the CPU fp32 weights copied to
every engine. A 1,200-token document is prefilled to its last 24 tokens, which are fed through
decode steps (`LLMEngine.score`); each run's logits are compared with CPU fp32. Used to rule the
Triton decode kernel and fused prefill out when dense Gemma looked broken on CUDA (the cause was the
GPU machine's transformers 5.17 converting Gemma's tokenizer wrongly: docs/eval.md, "Gemma-3-270M").
Needs CUDA.

Usage::

    python bench/gemma_cuda_check.py
"""

import torch

from hisa import LLM
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.factory import random_model

SHAPE = dict(num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
             hidden_size=640, intermediate_size=2048, num_layers=6,
             layer_types=["sliding_attention"] * 5 + ["full_attention"])
cfg = ModelConfig(**{**PRESETS["tiny-gemma3"], **SHAPE})
ids = torch.randint(3, cfg.vocab_size, (1200,), generator=torch.Generator().manual_seed(0)).tolist()
cpu = random_model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=3)
out = {}
for dev, dt in (("cpu", "float32"), ("cpu", "bfloat16"), ("cuda", "bfloat16"), ("cuda", "float32")):
    l = random_model(cfg, device=torch.device(dev), dtype=getattr(torch, dt), seed=3)
    l.model.load_state_dict(cpu.model.state_dict())
    llm = LLM(loaded=l, device=dev, dtype=dt, progress=False, max_model_len=2048, kv_cache_gb=0.5)
    out[(dev, dt)] = llm.engine.score(ids, prefill_tokens=len(ids) - 24)
ref = out[("cpu", "float32")]
for k, v in out.items():
    print(k, "max|d| prefill row", (v[0] - ref[0]).abs().max().item(),
          "decode rows", (v[1:] - ref[1:]).abs().max().item(),
          "argmax agree", (v.argmax(-1) == ref.argmax(-1)).float().mean().item())
