"""GGUF files other than the two bundled models: tiny random Llama checkpoints written by transformers,
converted as llama.cpp's convert_hf_to_gguf converts them (Q/K rows permuted for its interleaved RoPE,
biases included), load in hisa with transformers' logits; files hisa cannot read fail with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hisa.errors import ModelLoadError
from hisa.models.factory import load_model

gguf = pytest.importorskip("gguf")

_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def _llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert-time Q/K row order: each head's rotate-half pairs interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(attention_bias: bool):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rms_norm_eps=1e-6, attention_bias=attention_bias, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if attention_bias:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
                layer.self_attn.o_proj.bias.zero_()   # (hisa's Llama has no output bias: left out of the file)
    return model


def _write(path, model, *, extra=None, skip=(), tensor_type=None, split_count=None):
    """`model` as a llama-arch GGUF file at `path`; `extra` metadata {key: value} (lists as arrays),
    `skip` keys left out, `tensor_type` {gguf name: numpy dtype} stored as that type."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, "rope.freq_base": 10000.0, **(extra or {})}
    for key, value in meta.items():
        if key in skip:
            continue
        if isinstance(value, list):
            w.add_array(f"llama.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"llama.{key}", value)
        else:
            w.add_uint32(f"llama.{key}", value)
    if split_count:
        w.add_uint16("split.no", 0)
        w.add_uint16("split.count", split_count)
    for name, t in model.state_dict().items():
        a = t.float().numpy().copy()
        if name.endswith("o_proj.bias") or "rotary" in name:
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            out = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                   "model.norm.weight": "output_norm.weight"}[name]
        else:
            _, _, idx, rest = name.split(".", 3)
            out = f"blk.{idx}.{_LAYER[rest]}"
            if "q_proj" in rest and "v_proj" not in rest:
                a = _llamacpp_permute(a, cfg.num_attention_heads)
            elif "k_proj" in rest:
                a = _llamacpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(out, a.astype((tensor_type or {}).get(out, np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _load(path):
    return load_model(str(path), device=torch.device("cpu"), dtype=torch.float32, progress=False)


def _max_logit_diff(model, path) -> float:
    from hisa import LLM

    loaded = _load(path)
    assert loaded.tokenizer is None   # no tokenizer metadata: weights only, prompts as token ids
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=4) as llm:
        ours = llm.engine.score(ids, prefill_tokens=30)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, 29:].float()
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("attention_bias", [False, True])
def test_a_llama_file_converted_as_llamacpp_does_matches_transformers(tmp_path, attention_bias):
    """With q/k biases, llama.cpp permutes the bias rows as well: hisa left them permuted (off by ~2.5)."""
    model = _tiny_llama(attention_bias)
    _write(tmp_path / "m.gguf", model)
    assert _max_logit_diff(model, tmp_path / "m.gguf") < 1e-4


def test_per_layer_counts_that_agree_are_read_and_differing_ones_refused(tmp_path):
    model = _tiny_llama(False)
    _write(tmp_path / "same.gguf", model, extra={"attention.head_count_kv": [2, 2], "feed_forward_length": [128, 128]})
    assert _max_logit_diff(model, tmp_path / "same.gguf") < 1e-4
    _write(tmp_path / "differ.gguf", model, extra={"attention.head_count_kv": [2, 1]})
    with pytest.raises(ModelLoadError, match="llama.attention.head_count_kv differs between layers"):
        _load(tmp_path / "differ.gguf")


@pytest.mark.parametrize("case, message", [
    (dict(tensor_type={"output_norm.weight": np.float64}), "'output_norm.weight' is stored as F64, which hisa cannot"),
    (dict(split_count=3), "is shard 1 of a GGUF split into 3 files"),
    (dict(skip=("attention.layer_norm_rms_epsilon",)), "has no llama.attention.layer_norm_rms_epsilon"),
])
def test_files_hisa_cannot_read_fail_with_one_line(tmp_path, case, message):
    _write(tmp_path / "m.gguf", _tiny_llama(False), **case)
    with pytest.raises(ModelLoadError, match=message):
        _load(tmp_path / "m.gguf")
