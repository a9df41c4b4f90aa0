"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) with grouped-query attention.

Attention itself is not done here: each layer hands its q/k/v to `attn.forward(layer_idx, q, k, v)`,
an object the model runner builds per step (dense paged attention, or the sparse coordinator),
which owns the KV cache.

The dense parts are fused (`hisa.ops`; one kernel each on CUDA): q/k/v are one GEMM (`qkv_proj`,
with Qwen2's biases) whose output one kernel splits and rotates (RoPE); gate/up are one GEMM
(`gate_up_proj`) followed by one SiLU-and-multiply; each residual add is fused with the norm that
follows it. A decode step runs per layer: add+norm, qkv GEMM, rope, [attention], o_proj, add+norm,
gate_up GEMM, act*mul, down GEMM; on a bf16 decode batch on CUDA, five kernels: qkv GEMM with the
norm, rope, [attention], o_proj with the residual add (preparing the norm), gate_up GEMM with the
norm and act*mul, down GEMM with the residual add (`DecoderLayer.forward`). Checkpoints still load
by their Hugging Face names (`...q_proj.weight` fills rows of `qkv_proj.weight`:
`hisa.models.layers.checkpoint_targets`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from hisa.models.config import ModelConfig
from hisa.models.layers import FusedLinear, RMSNorm, project_add
from hisa.models.rope import RotaryEmbedding, rope_attention_factor, rope_inv_freq
from hisa.ops.linear import Linear, gate_up_act, linear_qkv_rope
from hisa.ops.rms_norm import NormedRows

__all__ = ["AttentionFn", "RMSNorm", "Attention", "MLP", "DecoderLayer", "LlamaForCausalLM"]


class AttentionFn(Protocol):
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] (contiguous) for the T tokens of this step → [T, H, D]."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias=cfg.attention_bias)
        self.o_proj = Linear(q, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor | NormedRows, cos_sin: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """x: [T, hidden] normed, cos_sin: fp32 [T, 2, D/2] → [T, hidden]."""
        return self.o_proj(self.attend(x, cos_sin, attn))

    def attend(self, x: torch.Tensor | NormedRows, cos_sin: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """The attention output before o_proj: [T, hidden] normed → [T, H * D]."""
        # [T, H, D], [T, KVH, D], [T, KVH, D]; one kernel for a decode batch on CUDA, else qkv_proj + qkv_rope
        q, k, v = linear_qkv_rope(x, self.qkv_proj.weight, self.qkv_proj.bias, cos_sin, num_heads=self.num_heads,
                                  num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        out = attn.forward(self.layer_idx, q, k, v)  # [T, H, D]
        return out.reshape(x.shape[0], self.num_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, act: str = "silu"):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = FusedLinear(cfg.hidden_size, {"gate_proj": inter, "up_proj": inter}, bias=False)
        self.down_proj = Linear(inter, cfg.hidden_size, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor | NormedRows) -> torch.Tensor:
        """x: [T, hidden] → [T, hidden]."""
        return self.down_proj(self.gated(x))

    def gated(self, x: torch.Tensor | NormedRows) -> torch.Tensor:
        """act(gate) * up, [T, I]: the down projection's input (one kernel with the gate|up
        projection for a decode batch on CUDA)."""
        return gate_up_act(x, self.gate_up_proj.weight, act=self.act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg, act=cfg.mlp_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor | NormedRows, residual: torch.Tensor | None, cos_sin: torch.Tensor,
                attn: AttentionFn, next_norm: RMSNorm | None = None,
                ) -> tuple[torch.Tensor | NormedRows, torch.Tensor | None]:
        """x: the previous layer's MLP output (the embeddings for the first layer, with residual
        None), residual: [T, hidden] the stream before x is added → (this layer's MLP output,
        residual). next_norm: the next layer's input norm; on a bf16 decode batch on CUDA the o and
        down projections add the residual and prepare the norm after them, which the qkv and
        gate|up projections apply (`project_add`): then the pair returned is (NormedRows of
        next_norm, None), and no norm kernel runs between the layers."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        a = self.self_attn.attend(h, cos_sin, attn)
        h, residual = self.post_attention_layernorm.add_norm(
            *project_add(self.self_attn.o_proj, a, residual, self.post_attention_layernorm))
        return project_add(self.mlp.down_proj, self.mlp.gated(h), residual, next_norm)


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The whole model. `forward` returns final hidden states; `compute_logits` projects chosen rows.

    Example::

        model = LlamaForCausalLM(cfg)
        hidden = model(input_ids, positions, attn)        # [T, hidden]
        logits = model.compute_logits(hidden[last_rows])  # [B, vocab]
    """

    def __init__(self, cfg: ModelConfig, rope_freqs: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, rope_freqs),
                                    rope_attention_factor(cfg.rope_scaling))  # YaRN scales cos/sin

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
                max_position: int | None = None) -> torch.Tensor:
        """input_ids, positions: int64 [T] (all tokens of the step, requests concatenated) → [T, hidden].

        `max_position` (>= positions.max(), known to the caller) spares a device sync.
        """
        x, residual = self.model.embed_tokens(input_ids), None  # [T, hidden]
        cos_sin = self.rope.lookup(positions, max_position)  # [T, 2, D/2], shared by every layer
        layers = self.model.layers
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else None
            x, residual = layer(x, residual, cos_sin, attn, next_norm)
        return self.model.norm.add_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] → fp32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
