"""Architecture description shared by every model source (GGUF, Hugging Face directory, random)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Hugging Face `model_type` / GGUF `general.architecture` values we can run, mapped to our family.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


@dataclass(slots=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer of the Llama family.

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

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            from hisa.errors import ModelLoadError

            raise ModelLoadError(
                f"unsupported architecture {self.arch!r}; hisa supports: "
                + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
                + " (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token across all layers."""
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
}
