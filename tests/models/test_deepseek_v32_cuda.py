"""DeepSeek-V3.2 on a GPU: the compiled MLA kernel, CUDA graphs and bf16 (skipped without CUDA).

The same tiny checkpoint as tests/models/test_deepseek_v32_vs_hf.py: fp32 on CUDA matches transformers
on the CPU, decode steps replayed from CUDA graphs give the eager tokens, bf16 stays close to fp32.
"""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from tests.models.test_deepseek_v32_vs_hf import PROMPT_LEN, _hf_greedy, _prompt, tiny_dsa  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled MLA kernel, CUDA graphs)")


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), device="cuda", progress=False, page_size=16, max_num_batched_tokens=128, **kwargs)


def test_cuda_fp32_matches_transformers(tiny_dsa):  # noqa: F811
    path, model = tiny_dsa
    ids = _prompt(PROMPT_LEN + 16, seed=1)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, PROMPT_LEN - 1:]
    rows = _llm(path, dtype="float32", cuda_graphs=False).engine.score(ids, prefill_tokens=PROMPT_LEN)
    assert (rows - ref).abs().max().item() < 2e-3


def test_cuda_graphs_equal_eager_and_bf16_close_to_fp32(tiny_dsa):  # noqa: F811
    path, model = tiny_dsa
    prompts = [_prompt(n, seed=20 + n) for n in (400, 120, 30)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager = [o.token_ids for o in _llm(path, dtype="float32", cuda_graphs=False).generate(prompts, params, use_tqdm=False)]
    llm = _llm(path, dtype="float32", cuda_graphs=True)
    graphs = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert graphs == eager
    assert llm.engine.runner.graphs.replays > 0, "no decode step was replayed"
    assert eager == [_hf_greedy(model, p, 24) for p in prompts]
    bf16 = [o.token_ids for o in _llm(path, dtype="bfloat16").generate(prompts, params, use_tqdm=False)]
    agree = sum(a == b for x, y in zip(bf16, eager) for a, b in zip(x, y)) / sum(map(len, eager))
    assert agree > 0.5, agree  # random weights: bf16 drifts after the first differing token
