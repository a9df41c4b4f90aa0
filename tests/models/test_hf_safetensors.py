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


def _tiny(tmp_path, name: str, cls: str, **config):
    """A tiny random `cls` checkpoint (transformers' own class) saved under tmp_path/name, fp32, eval."""
    import transformers

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg = getattr(transformers, f"{cls}Config")(**{**common, **config})
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls.removesuffix('Text')}ForCausalLM")(cfg).float().eval()
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    return model, tmp_path / name


def _max_logit_diff(model, path, n: int = 40, prefill: int = 30) -> float:
    """Max |hisa - transformers| over the prefill's last row and n - prefill decode steps (fp32, CPU)."""
    from hisa import LLM

    loaded = load_model(str(path), device=torch.device("cpu"), dtype=torch.float32, progress=False)
    with LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=4) as llm:
        ids = torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(1)).tolist()
        ours = llm.engine.score(ids, prefill_tokens=prefill)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, prefill - 1:].float()
    return (ours - ref).abs().max().item()


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


@pytest.mark.parametrize("name, cls, config", [
    # YaRN's attention factor (0.1 ln 4 + 1 on cos/sin) was dropped: Qwen2.5's documented long-context
    # setting was off by ~1.5 in the logits at every position
    ("qwen2_yarn", "Qwen2", dict(rope_parameters={**YARN, "rope_theta": 1e6})),
    ("llama_yarn", "Llama", dict(rope_parameters={**YARN, "rope_theta": 1e4})),
    # sliding windows shorter than the prompt were ignored (all context attended): off by ~5
    ("mistral_window", "Mistral", dict(sliding_window=8)),
    ("qwen2_window", "Qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("llama_gelu", "Llama", dict(hidden_act="gelu_pytorch_tanh")),   # was run as SiLU
    ("gemma3_yarn", "Gemma3Text", dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention",
                                       "full_attention"], rope_parameters={
        "full_attention": {**YARN, "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 1e4}})),
])
def test_configs_real_checkpoints_use_match_transformers(tmp_path, name, cls, config):
    model, path = _tiny(tmp_path, name, cls, **config)
    assert _max_logit_diff(model, path) < 1e-4


def test_a_window_only_the_upper_layers_use_is_where_transformers_puts_it(tmp_path):
    from hisa.models.loader import hf_config

    _, path = _tiny(tmp_path, "q", "Qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                    max_window_layers=1)
    assert hf_config(path).layer_windows == [None, 8, 8]
    _, path = _tiny(tmp_path, "m", "Mistral", sliding_window=None)
    assert hf_config(path).layer_windows == [None, None]


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "MLP activation 'gelu' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic' is not supported"),
    (dict(partial_rotary_factor=0.5), "partial rotary embeddings"),
    (dict(model_type="gemma3_text", head_dim=16, rope_parameters={"full_attention": {"rope_type": "default"},
                                                                  "sliding_attention": {"rope_type": "linear",
                                                                                        "factor": 4.0}}),
     "RoPE scaling on the sliding layers"),
])
def test_configs_hisa_cannot_run_are_refused(tmp_path, change, message):
    from hisa.errors import ModelLoadError
    from hisa.models.loader import hf_config

    (tmp_path / "config.json").write_text(json.dumps({**_CONFIG, **change}))
    with pytest.raises(ModelLoadError, match=message):
        hf_config(tmp_path)   # before any weight is read


def test_config_fields_left_null_or_in_the_old_spelling_read_as_transformers_reads_them(tmp_path):
    from hisa.models.loader import hf_config

    old = {**_CONFIG, "num_key_value_heads": None, "rope_theta": None, "rms_norm_eps": None,
           "rope_scaling": {"type": "yarn", "factor": 4.0}}   # transformers 4: no original length in the dict
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = hf_config(tmp_path)
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.rms_norm_eps) == (4, 10000.0, 1e-6)
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["original_max_position_embeddings"] == 512
