"""Architecture description shared by every model source (GGUF, Hugging Face directory, random)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hisa.models.dsa_config import DSAConfig
from hisa.ops.act_mul import ACTIVATIONS

# Hugging Face `model_type` / GGUF `general.architecture` values we can run, mapped to our family.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma3": "gemma3",  # GGUF spelling of the Gemma-3 text model
    "gemma3_text": "gemma3",  # Hugging Face spelling
    "deepseek_v32": "deepseek_v32",  # DeepSeek-V3.2: MLA + lightning indexer (DSA) + MoE
    "glm_moe_dsa": "deepseek_v32",  # GLM-5: the same, interleaved RoPE in the indexer, some layers reuse top-k
}
SUPPORTED_MODELS = "Llama 2/3, Mistral, Qwen2/2.5, SmolLM2, Gemma-3 text, DeepSeek-V3.2, GLM-5"
SLIDING, FULL = "sliding_attention", "full_attention"  # layer types (Hugging Face spelling)


@dataclass(slots=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer (the Llama family or Gemma-3).

    The Gemma-3 fields default to "absent", so a Llama config never sets them: `layer_types`
    marks each layer "sliding_attention" (attends to the last `sliding_window` tokens, RoPE base
    `rope_local_theta`) or "full_attention" (the whole context, RoPE base `rope_theta` with
    `rope_scaling`); the attention scale is `query_pre_attn_scalar ** -0.5` when that is set.

    Example::

        ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face style rope scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    # the MLP's gate activation, "silu" or "gelu_tanh" (hisa.ops.act_mul); None: the family's own
    # (silu for the Llama family and DSA models, gelu_tanh for Gemma-3)
    hidden_act: str | None = None
    # Gemma-3, and Mistral / Qwen2 checkpoints that use a sliding window (None = absent)
    sliding_window: int | None = None  # tokens a sliding layer attends to, the current one included
    layer_types: list[str] | None = None  # per layer: "sliding_attention" or "full_attention"
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (rope_theta serves the rest)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim ** -0.5)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    # DeepSeek-V3.2 family only: MLA, indexer and MoE fields (a dict is converted once, here)
    dsa: DSAConfig | None = None

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            from hisa.errors import ModelLoadError

            raise ModelLoadError(
                f"unsupported architecture {self.arch!r}; hisa supports: "
                + ", ".join(sorted(SUPPORTED_ARCHITECTURES)) + f" ({SUPPORTED_MODELS})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_act is not None and self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise ValueError(f"layer_types must list {self.num_layers} entries of {SLIDING!r} / {FULL!r}, "
                                 f"got {self.layer_types}")
            if SLIDING in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
                raise ValueError(f"sliding layers need sliding_window > 0, got {self.sliding_window}")
        if isinstance(self.dsa, dict):
            self.dsa = DSAConfig(**self.dsa)
        if (self.dsa is not None) != (self.family == "deepseek_v32"):
            raise ValueError(f"architecture {self.arch!r} " + ("needs" if self.dsa is None else "takes no")
                             + " DSA fields (ModelConfig.dsa)")
        if self.dsa is not None:
            self.dsa.check_layers(self.num_layers)
            if self.num_kv_heads != 1 or self.head_dim != self.dsa.qk_nope_head_dim + self.dsa.qk_rope_head_dim:
                raise ValueError("a DSA model has num_kv_heads=1 (one latent head) and head_dim = qk_nope_head_dim "
                                 f"+ qk_rope_head_dim, got {self.num_kv_heads} and {self.head_dim}")

    @property
    def family(self) -> str:
        """The model class that runs this architecture: "llama" or "gemma3"."""
        return SUPPORTED_ARCHITECTURES[self.arch]

    @property
    def mlp_act(self) -> str:
        """The MLP's gate activation: `hidden_act`, or the family's own."""
        return self.hidden_act or ("gelu_tanh" if self.family == "gemma3" else "silu")

    @property
    def attention_scale(self) -> float:
        """Softmax scale of q·k (Gemma-3: query_pre_attn_scalar ** -0.5, else head_dim ** -0.5; DSA
        models with YaRN: times the squared YaRN mscale, as transformers' DeepSeek models do)."""
        scale = (self.query_pre_attn_scalar or self.head_dim) ** -0.5
        if self.dsa is not None:
            from hisa.models.rope import yarn_softmax_mscale

            scale *= yarn_softmax_mscale(self.rope_scaling) ** 2
        return scale

    @property
    def layer_windows(self) -> list[int | None]:
        """Per layer: the sliding window in tokens, or None for attention over the whole context."""
        if self.layer_types is None:
            return [None] * self.num_layers
        return [self.sliding_window if t == SLIDING else None for t in self.layer_types]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token across all layers (DSA: the latent row and the indexer key)."""
        if self.dsa is not None:
            return self.num_layers * (self.dsa.latent_dim + self.dsa.index_head_dim) * dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# Shapes of well-known models, for random-weight benchmarks (no weights needed).
PRESETS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=[128001, 128009],
        name="random:llama-3.1-8b",
    ),
    "tiny-llama": dict(
        arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=32768,
        bos_token_id=1, eos_token_ids=[2], name="random:tiny-llama",
    ),
    # Gemma-3 shape in miniature: a 16-token window on 3 of every 4 layers (for fast tests)
    "tiny-gemma3": dict(
        arch="gemma3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, rope_local_theta=1e4,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=2, eos_token_ids=[1],
        sliding_window=16, layer_types=["sliding_attention"] * 3 + ["full_attention"],
        query_pre_attn_scalar=16, name="random:tiny-gemma3",
    ),
    # DeepSeek-V3.2's attention at its real shapes (MLA: 128 heads, q_lora 1536, kv_lora 512, rope 64,
    # nope 128, v 128; indexer 64 heads x 128, top-2048; YaRN x40) with 4 layers (1 dense + 3 MoE) and
    # a reduced MoE (16 routed experts of 2048, top-4 from 2 of 4 groups, 1 shared): ~5.3B parameters,
    # ~10.5 GB in bf16. KV per token and layer: 576 latent + 128 indexer values. For GPU benchmarks.
    "deepseek-v3.2-small": dict(
        arch="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=4,
        num_heads=128, num_kv_heads=1, head_dim=192, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=163840, bos_token_id=0, eos_token_ids=[1], name="random:deepseek-v3.2-small",
        dsa=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 index_n_heads=64, index_head_dim=128, index_topk=2048, moe_intermediate_size=2048,
                 n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    ),
    # the same structure in miniature (for fast tests): a 32-token selection, 4 experts in 2 groups
    "tiny-deepseek-v3.2": dict(
        arch="deepseek_v32", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
        num_heads=4, num_kv_heads=1, head_dim=48, rms_norm_eps=1e-6, max_position_embeddings=32768,
        bos_token_id=0, eos_token_ids=[1], name="random:tiny-deepseek-v3.2",
        dsa=dict(q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24,
                 index_n_heads=8, index_head_dim=32, index_topk=32, moe_intermediate_size=32,
                 n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                 routed_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse"]),
    ),
}
