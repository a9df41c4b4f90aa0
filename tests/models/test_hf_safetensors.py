"""Tiny random Llama and Qwen2 checkpoints saved by transformers load in hisa and match its logits."""

from __future__ import annotations

import json

import pytest
import torch

from hisa.models.factory import load_model


def _save(tmp_path, arch: str):
    import transformers

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # make the q/k/v biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    torch.manual_seed(0)
    model = model.float().eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_checkpoint_matches_transformers(tmp_path, arch):
    hf = _save(tmp_path, arch)
    loaded = load_model(str(tmp_path), device=torch.device("cpu"), dtype=torch.float32, progress=False)
    assert loaded.config.arch == arch and loaded.config.attention_bias == (arch == "qwen2")
    from hisa import LLM

    llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=4)
    ids = torch.randint(0, 320, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = llm.engine.score(ids, prefill_tokens=290)  # [11, V]: prefill then 10 decode steps
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, 289:].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    from hisa.errors import ModelLoadError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'.*llama.*mistral.*qwen2"):
        load_model(str(tmp_path), device=torch.device("cpu"), dtype=torch.float32, progress=False)
