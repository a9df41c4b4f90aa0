"""The fused dense parts: checkpoint names map onto rows of the fused projections, and a decode
step launches ~8 kernels per decoder layer on CUDA (counted with the profiler on the CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from hisa.models.config import PRESETS, ModelConfig
from hisa.models.factory import random_model
from hisa.models.layers import checkpoint_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import launch_count  # noqa: E402  (bench/launch_count.py: the counting the benchmark reports)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_checkpoint_names_are_rows_of_the_fused_projections(preset):
    cfg = ModelConfig(**PRESETS[preset])
    model = random_model(cfg, device=torch.device("cpu"), dtype=torch.float32).model
    targets = checkpoint_targets(model)
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in targets)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    rows = {"self_attn.q_proj": (attn.qkv_proj, 0, q), "self_attn.k_proj": (attn.qkv_proj, q, q + kv),
            "self_attn.v_proj": (attn.qkv_proj, q + kv, q + 2 * kv),
            "mlp.gate_proj": (mlp.gate_up_proj, 0, cfg.intermediate_size),
            "mlp.up_proj": (mlp.gate_up_proj, cfg.intermediate_size, 2 * cfg.intermediate_size)}
    for name, (fused, start, end) in rows.items():
        target = targets[f"model.layers.1.{name}.weight"]
        assert target.shape == (end - start, cfg.hidden_size)
        assert target.data_ptr() == fused.weight[start:end].data_ptr()  # a view: loading fills the fused weight
    with torch.no_grad():
        targets["model.layers.1.self_attn.k_proj.weight"].fill_(3.0)
    assert (attn.qkv_proj.weight[q:q + kv] == 3.0).all() and (attn.qkv_proj.weight[:q] != 3.0).any()
    assert {n for n in targets if n.endswith("norm.weight")} >= {"model.norm.weight", "model.layers.0.input_layernorm.weight"}


def test_qwen2_biases_are_fused_too():
    cfg = ModelConfig(**{**PRESETS["tiny-llama"], "arch": "qwen2", "attention_bias": True})
    model = random_model(cfg, device=torch.device("cpu"), dtype=torch.float32).model
    targets = checkpoint_targets(model)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert targets["model.layers.0.self_attn.v_proj.bias"].shape == (kv,)
    assert targets["model.layers.0.self_attn.v_proj.bias"].data_ptr() == \
        model.model.layers[0].self_attn.qkv_proj.bias[q + kv:].data_ptr()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decode_step_launches_eight_kernels_per_layer_on_cuda(family):
    """norm, qkv GEMM, rope, [attention], o_proj, add+norm, gate_up GEMM, act*mul, down GEMM."""
    counts = launch_count.per_layer(family, path="cuda", dtype=torch.bfloat16)
    assert counts["per_layer"] == 8, counts["ops"]
    assert counts["ops"]["aten::mm"] == 4 and counts["ops"]["triton:rms_norm"] == 2


def test_fused_model_runs_in_triton_as_on_cuda(monkeypatch):
    """The model forward with every hisa.ops launcher on its Triton branch (interpreter on a CPU)
    gives the CPU path's hidden states: the kernels are wired with the right shapes and weights.
    The projections take their kernel too, so Llama's residual adds run in the o and down
    projections and its norms in the qkv and gate|up projections (and no norm kernel but the last)."""
    from hisa.ops import linear as linear_mod

    if not os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs TRITON_INTERPRET=1 (the conftest sets it on a CPU)")
    from hisa.ops import act_mul, qkv_rope, rms_norm

    for preset in ("tiny-llama", "tiny-gemma3"):
        model = random_model(ModelConfig(**PRESETS[preset]), device=torch.device("cpu"), dtype=torch.float32,
                             seed=2).model
        ids, pos = torch.tensor([3, 9, 27, 81]), torch.tensor([0, 1, 2, 3])
        with torch.inference_mode():
            want = model(ids, pos, launch_count._ReturnQ(), 3)
            saved = [(m, m.want_triton) for m in (act_mul, qkv_rope, rms_norm)]
            norms = []
            try:
                for m, _ in saved:
                    m.want_triton = lambda use_triton, x: True
                monkeypatch.setattr(linear_mod, "_pays", lambda x, weight, programs: True)
                monkeypatch.setattr(linear_mod, "norms_in_kernels", lambda x: True)  # fp32 here; bf16 on CUDA
                real_norm = rms_norm._launch_triton
                monkeypatch.setattr(rms_norm, "_launch_triton", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
                got = model(ids, pos, launch_count._ReturnQ(), 3)
            finally:
                for m, f in saved:
                    m.want_triton = f
                monkeypatch.undo()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if preset == "tiny-llama":
            assert len(norms) == 2  # the first layer's input norm (embeddings) and the final norm
