"""DeepSeek-V3.2's parts on their own: the MoE against transformers' (each of its three execution
paths), YaRN against transformers' RoPE parameters, the checkpoint conversion, the config checks
and the random presets' shapes."""

from __future__ import annotations

import pytest
import torch

from hisa.errors import ModelLoadError
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.moe import MoE, fuse_expert_tensors


def _hf_config(**overrides):
    from transformers import DeepseekV32Config

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
                num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, index_topk=16, index_head_dim=16,
                index_n_heads=4, routed_scaling_factor=2.5)
    return DeepseekV32Config(**{**base, **overrides})


def _hisa_config(hf) -> ModelConfig:
    from hisa.models.dsa_config import dsa_fields_from_hf

    raw = hf.to_dict()
    dsa, fields = dsa_fields_from_hf(raw, "test")
    return ModelConfig(arch="deepseek_v32", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                       intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
                       num_heads=hf.num_attention_heads, num_kv_heads=fields["num_kv_heads"],
                       head_dim=fields["head_dim"], rope_theta=fields["rope_theta"],
                       rope_scaling=fields["rope_scaling"], dsa=dsa)


@pytest.mark.parametrize("tokens,grouped_mm,path", [
    (2, True, "_gathered"),  # T*k <= E
    (40, True, "_grouped_mm"), (100, True, "_grouped_mm"),  # PyTorch's grouped GEMM, offsets on the device
    (40, False, "_every_expert"), (100, False, "_grouped"),  # where that GEMM would sync (e.g. fp32 on CUDA)
])
def test_moe_matches_transformers(tokens, grouped_mm, path, monkeypatch):
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32MoE

    hf_cfg = _hf_config()
    torch.manual_seed(0)
    ref = DeepseekV32MoE(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(0.0, 0.2)
        ref.gate.e_score_correction_bias.normal_(0.0, 0.1)
    ours = MoE(_hisa_config(hf_cfg)).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.gate.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
        ours.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
        ours.experts.down_proj.copy_(ref.experts.down_proj)
        ours.shared_experts.load_state_dict(ref.shared_experts.state_dict())
    x = torch.randn(tokens, hf_cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    if not grouped_mm:
        monkeypatch.setattr(ours.experts, "_grouped_mm_runs", lambda x: False)
    ran = []
    method = getattr(ours.experts, path)
    monkeypatch.setattr(ours.experts, path, lambda *a: ran.append(path) or method(*a))
    with torch.no_grad():
        _, ref_w, ref_ids = ref.gate(x)
        w, ids = ours.gate(x)
        torch.testing.assert_close(ids.sort(-1).values, ref_ids.sort(-1).values, rtol=0, atol=0)
        # group-limited: every token's experts come from at most topk_group groups
        groups = ids // (hf_cfg.n_routed_experts // hf_cfg.n_group)
        assert all(len(set(g.tolist())) <= hf_cfg.topk_group for g in groups)
        torch.testing.assert_close(ours(x), ref(x[None])[0], rtol=1e-5, atol=1e-5)
    assert ran == [path]


def test_fuse_expert_tensors_stacks_each_layer_and_passes_the_rest():
    E, inter, hidden = 3, 4, 5
    gen = torch.Generator().manual_seed(0)
    parts = {(e, k): torch.randn(hidden if k == "down_proj" else inter, inter if k == "down_proj" else hidden,
                                 generator=gen) for e in range(E) for k in ("gate_proj", "up_proj", "down_proj")}
    tensors = [("model.norm.weight", torch.ones(hidden))]
    tensors += [(f"model.layers.1.mlp.experts.{e}.{k}.weight", t) for (e, k), t in sorted(parts.items())]
    out = dict(fuse_expert_tensors(iter(tensors), E))
    assert set(out) == {"model.norm.weight", "model.layers.1.mlp.experts.gate_up_proj",
                        "model.layers.1.mlp.experts.down_proj"}
    gate_up = out["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2I, hidden]
    assert gate_up.shape == (E, 2 * inter, hidden)
    torch.testing.assert_close(gate_up[2, :inter], parts[(2, "gate_proj")])
    torch.testing.assert_close(gate_up[2, inter:], parts[(2, "up_proj")])
    torch.testing.assert_close(out["model.layers.1.mlp.experts.down_proj"][1], parts[(1, "down_proj")])
    with pytest.raises(ModelLoadError, match="expert tensors"):
        dict(fuse_expert_tensors(iter(tensors[:-1]), E))


def test_yarn_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import yarn_apply_mscale

    from hisa.models.rope import rope_attention_factor, rope_inv_freq, yarn_softmax_mscale

    for mscale, mscale_all in ((1.0, 1.0), (1.0, 0.8), (0.707, 0.0)):
        scaling = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": mscale,
                   "mscale_all_dim": mscale_all, "original_max_position_embeddings": 4096, "beta_fast": 32,
                   "beta_slow": 1}
        hf = _hf_config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=dict(scaling))
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
        torch.testing.assert_close(rope_inv_freq(64, 10000.0, scaling), inv_freq, rtol=0, atol=0)
        assert rope_attention_factor(scaling) == pytest.approx(factor, rel=1e-12)
        assert yarn_softmax_mscale(scaling) ** 2 == pytest.approx(yarn_apply_mscale(scaling, 1.0), rel=1e-12)


@pytest.mark.parametrize("change,match", [
    (dict(n_routed_experts=5), "multiple of n_group"),
    (dict(topk_group=5), "topk_group=5 exceeds n_group"),
    (dict(num_experts_per_tok=5, topk_group=1), "exceeds the experts"),
    (dict(index_head_dim=4), "must hold the rope part"),
    (dict(mlp_layer_types=["dense", "moe", "sparse"]), "mlp_layer_types entries"),
])
def test_dsa_config_rejects_inconsistent_fields(change, match):
    preset = dict(PRESETS["tiny-deepseek-v3.2"])
    preset["dsa"] = {**preset["dsa"], **change}
    with pytest.raises(ValueError, match=match):
        ModelConfig(**preset)


def test_loader_refuses_quantized_checkpoints(tmp_path):
    import json

    from hisa.models.loader import hf_config

    raw = _hf_config().to_dict() | {"quantization_config": {"quant_method": "fp8"}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="quantized checkpoints"):
        hf_config(tmp_path)


def test_real_shape_preset():
    """random:deepseek-v3.2-small has DeepSeek-V3.2's attention shapes (built on the meta device: no memory)."""
    from hisa.models.deepseek_v32 import DeepseekV32ForCausalLM

    cfg = ModelConfig(**PRESETS["deepseek-v3.2-small"])
    d = cfg.dsa
    assert (cfg.hidden_size, cfg.num_heads, d.q_lora_rank, d.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (d.qk_rope_head_dim, d.qk_nope_head_dim, d.v_head_dim) == (64, 128, 128)
    assert (d.index_n_heads, d.index_head_dim, d.index_topk) == (64, 128, 2048)
    assert cfg.kv_bytes_per_token(2) == 4 * (576 + 128) * 2
    # DeepSeek's softmax scale: 192 ** -0.5 x (0.1 ln 40 + 1) ** 2
    assert cfg.attention_scale == pytest.approx(192 ** -0.5 * (0.1 * torch.tensor(40.0).log().item() + 1) ** 2)
    with torch.device("meta"):
        net = DeepseekV32ForCausalLM(cfg)
    attn = net.model.layers[1].self_attn
    assert attn.kv_b_proj.weight.shape == (128 * 256, 512) and attn.indexer.wq_b.weight.shape == (64 * 128, 1536)
    assert 5.0e9 < sum(p.numel() for p in net.parameters()) < 5.6e9
