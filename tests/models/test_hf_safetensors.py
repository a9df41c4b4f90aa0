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


_CONFIG = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@pytest.mark.parametrize("change, message", [
    (dict(num_attention_heads=None), "the field 'num_attention_heads' is missing"),
    (dict(num_hidden_layers="2"), "not a model config hisa can read"),
    (dict(num_key_value_heads=0), "not a model config hisa can read"),
    (dict(num_key_value_heads=3), "not a multiple of"),   # ModelConfig's own check, as a load error
    ("[1, 2]", "holds a JSON list, not an object"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_a_damaged_config_is_a_load_error_not_a_traceback(tmp_path, change, message):
    from hisa.errors import ModelLoadError
    from hisa.models.loader import hf_config

    if isinstance(change, dict):
        cfg = {k: v for k, v in {**_CONFIG, **change}.items() if v is not None}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    elif isinstance(change, bytes):
        (tmp_path / "config.json").write_bytes(change)
    else:
        (tmp_path / "config.json").write_text(change)
    with pytest.raises(ModelLoadError, match=message):
        hf_config(tmp_path)


def test_a_damaged_generation_config_or_safetensors_file_is_a_load_error(tmp_path):
    from hisa.errors import ModelLoadError

    (tmp_path / "config.json").write_text(json.dumps(_CONFIG))
    (tmp_path / "generation_config.json").write_text("{bad")
    with pytest.raises(ModelLoadError, match="generation_config.json is not valid JSON"):
        load_model(str(tmp_path), device=torch.device("cpu"), dtype=torch.float32, progress=False)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        load_model(str(tmp_path), device=torch.device("cpu"), dtype=torch.float32, progress=False)
