"""Gemma-3 text decoder (Gemma-3 270M / 1B / 4B / 12B / 27B language models).

What differs from the Llama family (`llama.py`), all checked against transformers' Gemma3:
  * token embeddings are multiplied by sqrt(hidden_size) (rounded to the weights' dtype);
  * RMSNorm scales by (1 + weight), computed in fp32 (so a zero weight is the identity);
  * four norms per layer: before and after attention, before and after the MLP (the "post" norms
    apply to the sublayer's output, before the residual add);
  * QK-norm: q and k get a per-head RMSNorm before RoPE;
  * the MLP is gated GELU (tanh approximation);
  * attention scale query_pre_attn_scalar ** -0.5 (the runner reads `ModelConfig.attention_scale`);
  * sliding-window layers (5 of every 6) attend to the last `sliding_window` tokens and use a
    local RoPE base (10K); full-attention layers use rope_theta (1M, maybe linearly scaled). The
    window is applied by the attention object (it reads `ModelConfig.layer_windows`), the RoPE here;
  * optional final-logit soft-capping; tied input/output embeddings.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_norm.weight`, ...), and norm
weights hold Hugging Face's value (the offset from 1; GGUF files store 1 + w, the loader subtracts 1).
The dense parts are fused as in `llama.py` (`qkv_proj`, `gate_up_proj`, loaded by their Hugging Face
names); here the QK-norm runs inside the rope kernel, and each post-sublayer norm is fused with the
residual add and the next pre-norm, so a decode step also runs ~8 kernels per layer besides attention.
"""

from __future__ import annotations

import torch
from torch import nn

from hisa.models.config import SLIDING, ModelConfig
from hisa.models.layers import FusedLinear, RMSNorm
from hisa.models.llama import AttentionFn
from hisa.models.rope import RotaryEmbedding, rope_attention_factor, rope_inv_freq
from hisa.ops.linear import Linear, gate_up_act
from hisa.ops.qkv_rope import qkv_rope


class GemmaRMSNorm(RMSNorm):
    """RMSNorm over the last dim with a (1 + weight) scale, in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps, unit_offset=True)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.is_sliding = cfg.layer_windows[layer_idx] is not None
        bias = cfg.attention_bias
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=bias)
        self.o_proj = Linear(q, cfg.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """x: [T, hidden] normed, cos_sin: fp32 [T, 2, D/2] (this layer's RoPE base) → [T, hidden]."""
        q, k, v = qkv_rope(self.qkv_proj(x), cos_sin, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.head_dim, q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight,
                           eps=self.q_norm.eps)  # QK-norm, then RoPE: [T, H, D], [T, KVH, D], [T, KVH, D]
        out = attn.forward(self.layer_idx, q, k, v)  # [T, H, D]; the window (if any) is the attention's job
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = FusedLinear(cfg.hidden_size, {"gate_proj": inter, "up_proj": inter}, bias=False)
        self.down_proj = Linear(inter, cfg.hidden_size, bias=False)
        self.act = cfg.mlp_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] → [T, hidden] (gated GELU, tanh approximation, unless the config says otherwise)."""
        return self.down_proj(gate_up_act(x, self.gate_up_proj.weight, act=self.act))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Gemma3Attention(cfg, layer_idx)
        self.mlp = Gemma3MLP(cfg)
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: torch.Tensor, attn: AttentionFn,
                prev_post_norm: GemmaRMSNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output before its post-feedforward norm `prev_post_norm`
        (the scaled embeddings for the first layer, with residual and prev_post_norm None)
        → (this layer's MLP output, before its post-feedforward norm; the residual stream)."""
        h, residual = self.input_layernorm.add_norm(x, residual, prev_post_norm)
        h = self.self_attn(h, cos_sin, attn)
        h, residual = self.pre_feedforward_layernorm.add_norm(h, residual, self.post_attention_layernorm)
        return self.mlp(h), residual


class Gemma3Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    """The whole Gemma-3 text model; same interface as `LlamaForCausalLM`.

    `rope` rotates the full-attention layers (rope_theta, rope_scaling), `rope_local` the sliding
    ones (rope_local_theta, unscaled).

    Example::

        model = Gemma3ForCausalLM(cfg)
        hidden = model(input_ids, positions, attn)        # [T, hidden]
        logits = model.compute_logits(hidden[last_rows])  # [B, vocab]
    """

    def __init__(self, cfg: ModelConfig, rope_freqs: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.model = Gemma3Body(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        global_freq, local_freq = self.rope_inv_freqs(cfg, rope_freqs)
        self.rope = RotaryEmbedding(global_freq, rope_attention_factor(cfg.rope_scaling))  # YaRN scales cos/sin
        self.rope_local = RotaryEmbedding(local_freq)
        self._sliding = [t == SLIDING for t in (cfg.layer_types or [])] or [False] * cfg.num_layers

    @staticmethod
    def rope_inv_freqs(cfg: ModelConfig, rope_freqs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(full-attention, sliding) inverse frequencies, each fp32 [head_dim // 2]."""
        global_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, rope_freqs)
        local_freq = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta, None)
        return global_freq, local_freq

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
                max_position: int | None = None) -> torch.Tensor:
        """input_ids, positions: int64 [T] (all tokens of the step, requests concatenated) → [T, hidden]."""
        emb = self.model.embed_tokens
        # the scale is rounded to fp32, then to the weights' dtype, as transformers does (bf16: sqrt(640) → 25.25)
        x = emb(input_ids) * torch.tensor(self.config.hidden_size ** 0.5).to(emb.weight.dtype)
        if max_position is None:
            max_position = int(positions.max())  # one sync for both rotary tables, not one per layer
        cos_sin = {False: self.rope.lookup(positions, max_position)}  # [T, 2, D/2] per RoPE base
        if any(self._sliding):
            cos_sin[True] = self.rope_local.lookup(positions, max_position)
        residual, post_norm = None, None
        for layer, sliding in zip(self.model.layers, self._sliding):
            x, residual = layer(x, residual, cos_sin[sliding], attn, post_norm)
            post_norm = layer.post_feedforward_layernorm
        return self.model.norm.add_norm(x, residual, post_norm)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] → fp32 logits [N, vocab] (soft-capped when the config says so)."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
