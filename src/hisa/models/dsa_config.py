"""The DeepSeek-V3.2 family's own fields (MLA, the lightning indexer, MoE), one typed dataclass.

`ModelConfig.dsa` holds one of these for a DeepSeek-V3.2 (`deepseek_v32`) or GLM-5 (`glm_moe_dsa`)
model and None for every other family. The shared fields keep their usual meaning there:
`num_heads` query heads, `num_kv_heads = 1` (one latent "head" shared by all heads),
`head_dim = qk_nope_head_dim + qk_rope_head_dim` (the q·k width before absorption),
`intermediate_size` the dense MLP of the first layers, `rope_theta` / `rope_scaling` the RoPE of
the `qk_rope_head_dim` slice.
"""

from __future__ import annotations

from dataclasses import dataclass

DENSE_MLP, MOE_MLP = "dense", "sparse"  # per-layer MLP kinds (Hugging Face spelling)
FULL_INDEXER, SHARED_INDEXER = "full", "shared"  # GLM-5: a layer runs its indexer or reuses the previous top-k


@dataclass(slots=True)
class DSAConfig:
    """MLA + lightning indexer + MoE shapes of one DeepSeek-V3.2 / GLM-5 model.

    Per token and layer the cache holds `kv_lora_rank + qk_rope_head_dim` latent values (the
    normed compressed KV, then the roped shared key) and `index_head_dim` indexer-key values.

    Example (DeepSeek-V3.2's attention, a reduced MoE)::

        DSAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048,
                  moe_intermediate_size=2048, n_routed_experts=16, n_shared_experts=1,
                  num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  mlp_layer_types=["dense", "sparse", "sparse", "sparse"])
    """

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int  # tokens each query attends to (all of them while the context is shorter)
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    mlp_layer_types: list[str]  # per layer: "dense" (MLP of intermediate_size) or "sparse" (MoE)
    n_group: int = 1  # expert groups; a token picks its experts from its `topk_group` best groups
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # GLM-5: interleaved RoPE in the indexer (DeepSeek-V3.2: half-split), and per-layer "full" /
    # "shared" indexers (a shared layer reuses the previous full layer's top-k; None = all full)
    indexer_rope_interleaved: bool = False
    indexer_types: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "index_n_heads", "index_head_dim", "index_topk", "moe_intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DSA config: {name} must be a positive integer, got {value!r}")
        if self.n_shared_experts < 0:
            raise ValueError(f"DSA config: n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"DSA config: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(f"DSA config: index_head_dim ({self.index_head_dim}) must hold the rope part "
                             f"({self.qk_rope_head_dim})")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"DSA config: n_routed_experts={self.n_routed_experts} is not a multiple of "
                             f"n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ValueError("DSA config: group-limited routing scores a group by its two best experts; "
                             f"{per_group} expert per group is too few")
        if self.topk_group > self.n_group:
            raise ValueError(f"DSA config: topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"DSA config: num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of "
                             f"the {self.topk_group} chosen groups ({self.topk_group * per_group})")
        if set(self.mlp_layer_types) - {DENSE_MLP, MOE_MLP}:
            raise ValueError(f"DSA config: mlp_layer_types entries must be {DENSE_MLP!r} or {MOE_MLP!r}, "
                             f"got {self.mlp_layer_types}")
        if self.indexer_types is not None:
            if set(self.indexer_types) - {FULL_INDEXER, SHARED_INDEXER}:
                raise ValueError(f"DSA config: indexer_types entries must be {FULL_INDEXER!r} or "
                                 f"{SHARED_INDEXER!r}, got {self.indexer_types}")
            if self.indexer_types and self.indexer_types[0] != FULL_INDEXER:
                raise ValueError("DSA config: the first layer must run its own indexer (indexer_types[0] == 'full')")

    def check_layers(self, num_layers: int) -> None:
        """Raise ValueError unless the per-layer lists cover exactly `num_layers` layers."""
        for name in ("mlp_layer_types", "indexer_types"):
            value = getattr(self, name)
            if value is not None and len(value) != num_layers:
                raise ValueError(f"DSA config: {name} lists {len(value)} layers, the model has {num_layers}")

    @property
    def latent_dim(self) -> int:
        """Values per token and layer of the latent cache: the normed latent, then the roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def runs_indexer(self, layer: int) -> bool:
        """False for a GLM-5 "shared" layer, which reuses the previous full layer's top-k."""
        return self.indexer_types is None or self.indexer_types[layer] == FULL_INDEXER


# transformers' DeepseekV32Config / GlmMoeDsaConfig defaults, for keys a config.json leaves out
_HF_DEFAULTS = {
    "deepseek_v32": dict(n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
                         index_topk=2048, index_head_dim=128, index_n_heads=64, first_k_dense_replace=3),
    "glm_moe_dsa": dict(n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
                        index_topk=2048, index_head_dim=128, index_n_heads=32, first_k_dense_replace=3),
}


def _glm_indexer_types(raw: dict, n: int) -> list[str]:
    """GLM-5's per-layer "full" / "shared" indexers, read as GlmMoeDsaConfig derives them."""
    if raw.get("indexer_types"):
        return list(raw["indexer_types"])
    pattern = raw.get("index_topk_pattern")
    if pattern is not None:
        return [{"F": FULL_INDEXER, "S": SHARED_INDEXER}[c] for c in pattern] if isinstance(pattern, str) \
            else list(pattern)
    freq, offset = max(raw.get("index_topk_freq", 1), 1), raw.get("index_skip_topk_offset", 2)
    return [FULL_INDEXER if max(i - offset + 1, 0) % freq == 0 else SHARED_INDEXER for i in range(n)]


def dsa_fields_from_hf(raw: dict, where: str) -> tuple[DSAConfig, dict]:
    """A `deepseek_v32` (DeepSeek-V3.2) or `glm_moe_dsa` (GLM-5) config.json → (DSAConfig, the ModelConfig
    fields that differ from other families: num_kv_heads, head_dim, rope_theta, rope_scaling).
    Raises ModelLoadError on what hisa cannot run."""
    from hisa.errors import ModelLoadError

    glm = raw.get("model_type") == "glm_moe_dsa"
    defaults = _HF_DEFAULTS["glm_moe_dsa" if glm else "deepseek_v32"]

    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(f"{where}: quantized checkpoints ({method}) are not supported; convert the weights "
                             "to bf16 first (DeepSeek's fp8_cast_bf16.py)")
    if not raw.get("q_lora_rank"):
        raise ModelLoadError(f"{where}: q_lora_rank is missing; DeepSeek-V3.2's indexer needs the compressed query")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (silu only)")
    if raw.get("scoring_func", "sigmoid") != "sigmoid" or raw.get("moe_layer_freq", 1) != 1:
        raise ModelLoadError(f"{where}: only sigmoid routing with an MoE in every layer after the dense ones is "
                             "supported (DeepSeek-V3 style)")
    get = lambda key: raw.get(key, defaults.get(key))  # noqa: E731
    n = raw["num_hidden_layers"]
    mlp_types = raw.get("mlp_layer_types")
    if not mlp_types:
        dense = min(get("first_k_dense_replace"), n)
        mlp_types = [DENSE_MLP] * dense + [MOE_MLP] * (n - dense)
    try:
        dsa = DSAConfig(
            q_lora_rank=raw["q_lora_rank"], kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"],
            qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"],
            index_n_heads=get("index_n_heads"), index_head_dim=get("index_head_dim"), index_topk=get("index_topk"),
            moe_intermediate_size=raw["moe_intermediate_size"], n_routed_experts=raw["n_routed_experts"],
            n_shared_experts=get("n_shared_experts") or 0, num_experts_per_tok=raw["num_experts_per_tok"],
            mlp_layer_types=list(mlp_types), n_group=get("n_group"), topk_group=get("topk_group"),
            routed_scaling_factor=float(get("routed_scaling_factor")), norm_topk_prob=bool(get("norm_topk_prob")),
            indexer_rope_interleaved=glm, indexer_types=_glm_indexer_types(raw, n) if glm else None)
    except KeyError as e:
        raise ModelLoadError(f"{where}: the DeepSeek-V3.2 field {e.args[0]!r} is missing") from None
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    # RoPE: transformers >= 5 writes rope_parameters; older configs (and DeepSeek's own) rope_theta + rope_scaling
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else raw.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "yarn" and scaling.get("factor") is None:  # transformers' fallback: the context ratio
            scaling["factor"] = raw["max_position_embeddings"] / scaling["original_max_position_embeddings"]
        if kind == "default":
            scaling = None
    fields = dict(num_kv_heads=1, head_dim=dsa.qk_nope_head_dim + dsa.qk_rope_head_dim, rope_theta=theta,
                  rope_scaling=scaling)
    return dsa, fields
