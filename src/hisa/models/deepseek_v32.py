"""DeepSeek-V3.2 decoder: MLA attention, DSA's lightning indexer, MoE (and GLM-5's small variations).

Checked against transformers' DeepseekV32ForCausalLM (tests/models/test_deepseek_v32_vs_hf.py):
  * MLA: q = q_b(RMSNorm(q_a(x))) split per head into a no-RoPE part (qk_nope_head_dim) and a RoPE
    part (qk_rope_head_dim); kv_a(x) = [latent (kv_lora_rank) | k_pe (qk_rope_head_dim)], the latent
    RMS-normed, k_pe one key shared by all heads. RoPE is interleaved (adjacent pairs) and YaRN
    scales cos/sin by its attention factor. Softmax scale qk_head_dim ** -0.5 x YaRN mscale^2.
  * absorbed form: the model hands the attention the absorbed query q = [q_nope W_UK | q_pe] [T, H, Dl + Dr]
    and the new tokens' cache rows [latent | k_pe] [T, Dl + Dr], and gets the output in latent space
    [T, H, Dl], which goes through W_UV (kv_b_proj's value rows) and o_proj. kv_b_proj is never
    applied to the cache; the cache holds Dl + Dr values per token and layer, not H x (nope + v) x 2.
  * indexer: q = wq_b(RMSNorm(q_a(x))) [IH, ID], k = LayerNorm(wk(x)) [ID], RoPE on their first
    qk_rope_head_dim values (half-split for DeepSeek-V3.2, interleaved for GLM-5), per-head weights
    weights_proj(x) * IH ** -0.5 in fp32. Scoring and top-k are the attention's (`hisa.attention.dsa_indexer`).
  * layers: pre-norm residual blocks; the first layers (`mlp_layer_types == "dense"`) have a dense
    SiLU MLP, the rest the MoE (`hisa.models.moe`).

Attention itself is not done here: each layer calls `attn.forward_mla(layer_idx, q, kv, index)` on an
object the model runner builds per step (`hisa.engine.dsa_attention.DSAAttention`), which owns the
latent and indexer caches and the selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from hisa.models.config import ModelConfig
from hisa.models.dsa_config import MOE_MLP
from hisa.models.llama import RMSNorm
from hisa.models.moe import MoE, GatedMLP, fuse_expert_tensors
from hisa.models.rope import RotaryEmbedding, apply_rope, rope_attention_factor, rope_inv_freq

_LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm (transformers does not use rms_norm_eps there)
_INDEXER_NORM_EPS = 1e-6


@dataclass
class IndexerStep:
    """The indexer's inputs for the tokens of one step and one layer (what DSA selection needs)."""

    q: torch.Tensor  # [T, IH, ID] roped indexer queries
    weights: torch.Tensor  # fp32 [T, IH] per-head weights, IH ** -0.5 folded in
    keys: torch.Tensor  # [T, ID] roped, normed indexer keys of the new tokens (to be cached)


class MLAAttentionFn(Protocol):
    def forward_mla(self, layer_idx: int, q: torch.Tensor, kv: torch.Tensor, index: IndexerStep | None) -> torch.Tensor:
        """q: [T, H, Dl + Dr] absorbed queries; kv: [T, Dl + Dr] the new tokens' latent rows; index:
        the indexer's inputs (None on a GLM-5 layer that reuses the previous selection) → [T, H, Dl]."""


class Indexer(nn.Module):
    """DSA's lightning indexer projections (the scoring and top-k run in the attention object)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dsa
        self.n_heads, self.head_dim, self.rope_dim = d.index_n_heads, d.index_head_dim, d.qk_rope_head_dim
        self.interleaved = d.indexer_rope_interleaved
        self.wq_b = nn.Linear(d.q_lora_rank, d.index_n_heads * d.index_head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, d.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(d.index_head_dim, eps=_INDEXER_NORM_EPS)
        self.weights_proj = nn.Linear(cfg.hidden_size, d.index_n_heads, bias=False)  # kept in fp32

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> IndexerStep:
        t, r = x.shape[0], self.rope_dim
        q = self.wq_b(q_resid).view(t, self.n_heads, self.head_dim)  # [T, IH, ID]
        k = self.k_norm(self.wk(x))  # [T, ID]
        q = torch.cat([apply_rope(q[..., :r], cos[:, None], sin[:, None], interleaved=self.interleaved),
                       q[..., r:]], dim=-1)
        k = torch.cat([apply_rope(k[:, :r], cos, sin, interleaved=self.interleaved), k[:, r:]], dim=-1)
        weights = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5  # [T, IH]
        return IndexerStep(q=q, weights=weights, keys=k)


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.dsa
        self.layer_idx = layer_idx
        self.num_heads, self.nope, self.rope_dim = cfg.num_heads, d.qk_nope_head_dim, d.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = d.v_head_dim, d.kv_lora_rank
        bias = cfg.attention_bias
        self.q_a_proj = nn.Linear(cfg.hidden_size, d.q_lora_rank, bias=bias)
        self.q_a_layernorm = RMSNorm(d.q_lora_rank, _LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(d.q_lora_rank, cfg.num_heads * (d.qk_nope_head_dim + d.qk_rope_head_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, d.kv_lora_rank + d.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(d.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(d.kv_lora_rank, cfg.num_heads * (d.qk_nope_head_dim + d.v_head_dim), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d.v_head_dim, cfg.hidden_size, bias=bias)
        self.indexer = Indexer(cfg) if d.runs_indexer(layer_idx) else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: MLAAttentionFn) -> torch.Tensor:
        t, h, dl = x.shape[0], self.num_heads, self.kv_lora_rank
        q_resid = self.q_a_layernorm(self.q_a_proj(x))  # [T, q_lora]
        q = self.q_b_proj(q_resid).view(t, h, self.nope + self.rope_dim)  # [T, H, nope + rope]
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(x)  # [T, Dl + Dr]
        latent = self.kv_a_layernorm(compressed[:, :dl])  # [T, Dl]
        k_pe = apply_rope(compressed[:, dl:], cos, sin, interleaved=True)  # [T, Dr]
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], interleaved=True)  # [T, H, Dr]
        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, dl)  # [H, nope + v, Dl]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w[:, :self.nope])  # [H, T, Dl]: q_nope W_UK
        q_abs = torch.cat([q_lat.transpose(0, 1), q_pe], dim=-1)  # [T, H, Dl + Dr]
        kv = torch.cat([latent, k_pe], dim=-1)  # [T, Dl + Dr]
        index = self.indexer(x, q_resid, cos, sin) if self.indexer is not None else None
        o_lat = attn.forward_mla(self.layer_idx, q_abs, kv, index)  # [T, H, Dl]
        o = torch.bmm(o_lat.transpose(0, 1), w[:, self.nope:].transpose(1, 2))  # [H, T, v]: o_lat W_UV^T
        return self.o_proj(o.transpose(0, 1).reshape(t, h * self.v_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(cfg, layer_idx)
        moe = cfg.dsa.mlp_layer_types[layer_idx] == MOE_MLP
        self.mlp = MoE(cfg) if moe else GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV32Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV32ForCausalLM(nn.Module):
    """The whole DeepSeek-V3.2 (or GLM-5) model; same interface as `LlamaForCausalLM`, with an
    attention object that implements `forward_mla` (MLAAttentionFn).

    Example::

        model = DeepseekV32ForCausalLM(cfg)
        hidden = model(input_ids, positions, attn)        # [T, hidden]
        logits = model.compute_logits(hidden[last_rows])  # [B, vocab]
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV32Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(self.rope_inv_freq(cfg), rope_attention_factor(cfg.rope_scaling))

    @staticmethod
    def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
        """fp32 [qk_rope_head_dim // 2] inverse frequencies of the RoPE slice (YaRN-scaled when configured)."""
        return rope_inv_freq(cfg.dsa.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)

    def fp32_parameters(self) -> list[nn.Parameter]:
        """Parameters kept in fp32 whatever the model dtype (as transformers keeps them): the
        indexer's head weights and the router's score bias."""
        keep = []
        for name, p in self.named_parameters():
            if name.endswith("indexer.weights_proj.weight") or name.endswith("e_score_correction_bias"):
                keep.append(p)
        return keep

    def convert_checkpoint(self, tensors):
        """Hugging Face tensors → this model's names: per-expert tensors fused, multi-token-prediction
        layers (index >= num_layers, not used for generation) dropped."""
        n = self.config.num_layers
        kept = ((name, t) for name, t in tensors if not _mtp_layer(name, n))
        return fuse_expert_tensors(kept, self.config.dsa.n_routed_experts)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: MLAAttentionFn,
                max_position: int | None = None) -> torch.Tensor:
        """input_ids, positions: int64 [T] (all tokens of the step, requests concatenated) → [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.cos_sin(positions, max_position)  # fp32 [T, Dr] each
        for layer in self.model.layers:
            x = layer(x, cos, sin, attn)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] → fp32 logits [N, vocab]."""
        return self.lm_head(hidden).float()


def _mtp_layer(name: str, num_layers: int) -> bool:
    if not name.startswith("model.layers."):
        return False
    return int(name.split(".")[2]) >= num_layers
