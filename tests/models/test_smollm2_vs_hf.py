"""hisa's SmolLM2 (from the GGUF file) against Hugging Face transformers on the same weights, fp32 CPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import long_text

# fp32 on the CPU: both implementations do the same math in a different order (paged attention,
# chunked prefill); observed max |Δlogit| is ~1e-4 on logits of magnitude ~30.
ATOL = 2e-3


def _ids(tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    ids = tokenizer.encode(long_text(n_tokens, seed))
    assert len(ids) >= n_tokens
    return ids[:n_tokens]


@pytest.mark.parametrize("n_tokens", [10, 200, 2000])
def test_prefill_logits_match_transformers(smollm2, hf_smollm2, make_llm, n_tokens):
    ids = _ids(smollm2.tokenizer, n_tokens)
    # chunked prefill (512-token chunks) then 8 decode steps: both paths are compared
    llm = make_llm(max_num_batched_tokens=512)
    ours = llm.engine.score(ids, prefill_tokens=n_tokens - 8)  # [9, V]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0, n_tokens - 9:].float()  # [9, V]
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < ATOL, f"max |Δlogit| = {err:.2e} at {n_tokens} tokens"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_64_tokens_identical_to_transformers(smollm2, hf_smollm2, make_llm):
    from hisa import SamplingParams

    llm = make_llm()
    prompts = [
        llm.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}]),
        _ids(smollm2.tokenizer, 1000, seed=3),
    ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                      do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
