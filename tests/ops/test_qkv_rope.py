"""qkv_rope: the reference against transformers' rotary math (and Gemma's QK-norm), the Triton kernel
(compiled on CUDA, else TRITON_INTERPRET=1 on CPU tensors) and the CPU path against the reference."""

from __future__ import annotations

import pytest
import torch

from hisa.models.rope import RotaryEmbedding, rope_inv_freq
from hisa.ops.qkv_rope import qkv_rope, qkv_rope_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _case(t, h, kvh, d, dtype, *, norm, seed=0, device=DEVICE, row_pad=0):
    gen = torch.Generator().manual_seed(seed)
    width = (h + 2 * kvh) * d
    qkv = torch.randn(t, width + row_pad, generator=gen)
    positions = torch.randint(0, 5000, (t,), generator=gen)
    cos_sin = RotaryEmbedding(rope_inv_freq(d, 10000.0, None)).lookup(positions)  # [T, 2, D/2]
    qw = torch.randn(d, generator=gen) * 0.5 if norm else None
    kw = torch.randn(d, generator=gen) * 0.5 if norm else None
    move = (lambda a: None if a is None else a.to(device, dtype))
    return move(qkv)[:, :width], cos_sin.to(device), move(qw), move(kw), positions  # row_pad > 0: a strided view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,kvh,d", [(1, 4, 2, 16), (5, 9, 3, 64), (3, 4, 1, 24)])  # 24: half is not a power of two
@pytest.mark.parametrize("norm,unit_offset", [(False, True), (True, True), (True, False)])
def test_triton_matches_reference(dtype, t, h, kvh, d, norm, unit_offset):
    qkv, cos_sin, qw, kw, _ = _case(t, h, kvh, d, dtype, norm=norm)
    args = dict(num_heads=h, num_kv_heads=kvh, head_dim=d, q_norm_weight=qw, k_norm_weight=kw, eps=1e-6,
                unit_offset=unit_offset)
    got = qkv_rope(qkv, cos_sin, use_triton=True, **args)
    want = qkv_rope_ref(qkv, cos_sin, **args)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        assert a.is_contiguous() and a.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
def test_cpu_path_matches_reference(dtype, norm):
    qkv, cos_sin, qw, kw, _ = _case(6, 6, 2, 32, dtype, norm=norm, device="cpu", row_pad=8)
    args = dict(num_heads=6, num_kv_heads=2, head_dim=32, q_norm_weight=qw, k_norm_weight=kw, eps=1e-6)
    for a, b in zip(qkv_rope(qkv, cos_sin, **args), qkv_rope_ref(qkv, cos_sin, **args)):
        torch.testing.assert_close(a, b, **TOL[dtype])
        assert a.is_contiguous()


def test_strided_rows_in_triton():
    qkv, cos_sin, _, _, _ = _case(4, 4, 2, 16, torch.float32, norm=False, device=DEVICE, row_pad=16)
    args = dict(num_heads=4, num_kv_heads=2, head_dim=16)
    for a, b in zip(qkv_rope(qkv, cos_sin, use_triton=True, **args), qkv_rope_ref(qkv, cos_sin, **args)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_reference_is_transformers_rotary_and_gemma_qk_norm():
    """Same as transformers' Llama rotary embedding + apply_rotary_pos_emb, and Gemma3RMSNorm on q/k first."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    h, kvh, d = 4, 2, 32
    qkv, cos_sin, qw, kw, positions = _case(5, h, kvh, d, torch.float32, norm=True, device="cpu")
    inv_freq = rope_inv_freq(d, 10000.0, None)
    freqs = positions[:, None].float() * inv_freq[None]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k = q.view(1, 5, h, d).transpose(1, 2), k.view(1, 5, kvh, d).transpose(1, 2)  # [1, heads, T, D]
    qn, kn = Gemma3RMSNorm(d, eps=1e-6), Gemma3RMSNorm(d, eps=1e-6)
    qn.weight.data.copy_(qw)
    kn.weight.data.copy_(kw)
    for norm in (False, True):
        hq, hk = (qn(q), kn(k)) if norm else (q, k)
        want_q, want_k = apply_rotary_pos_emb(hq, hk, emb.cos()[None], emb.sin()[None])
        got_q, got_k, got_v = qkv_rope_ref(qkv, cos_sin, num_heads=h, num_kv_heads=kvh, head_dim=d,
                                           q_norm_weight=qw if norm else None, k_norm_weight=kw if norm else None)
        torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
        assert torch.equal(got_v, v.reshape(5, kvh, d))


@pytest.mark.parametrize("kwargs,match", [
    (dict(qkv=torch.randn(2, 100)), r"qkv must have shape \(\*, 128\)"),
    (dict(cos_sin=torch.randn(2, 2, 8, dtype=torch.float64)), "cos_sin must be torch.float32"),
    (dict(cos_sin=torch.randn(3, 2, 8)), r"cos_sin must have shape \(2, 2, 8\)"),
    (dict(head_dim=15, qkv=torch.randn(2, 120)), "head_dim must be even"),
    (dict(q_norm_weight=torch.randn(16)), "go together"),
    (dict(num_heads=0), "num_heads must be an int >= 1"),
])
def test_bad_arguments_fail_with_a_message(kwargs, match):
    args = dict(qkv=torch.randn(2, 128), cos_sin=torch.randn(2, 2, 8), num_heads=4, num_kv_heads=2, head_dim=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        qkv_rope(args.pop("qkv"), args.pop("cos_sin"), **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("h,kvh,d,norm", [(32, 8, 128, False), (4, 1, 256, True)])  # Llama-3.1-8B, Gemma-3-270M
def test_cuda_real_shapes(h, kvh, d, norm):
    qkv, cos_sin, qw, kw, _ = _case(1024, h, kvh, d, torch.bfloat16, norm=norm, device="cuda")
    args = dict(num_heads=h, num_kv_heads=kvh, head_dim=d, q_norm_weight=qw, k_norm_weight=kw)
    for a, b in zip(qkv_rope(qkv, cos_sin, **args), qkv_rope_ref(qkv, cos_sin, **args)):
        torch.testing.assert_close(a, b, **TOL[torch.bfloat16])


def test_rotary_table_is_built_once_per_device_however_the_device_is_named():
    """Each engine made over the same loaded weights asks the shared rotary table for its max model
    length. Asking again must not grow it: on CUDA the engine names the device "cuda" while the table
    lives on "cuda:0", and every engine of `hisa eval` used to double it (32 GiB after 14 engines)."""
    rope = RotaryEmbedding(rope_inv_freq(64, 10000.0, None))
    name = "cuda" if torch.cuda.is_available() else "cpu"
    rope._ensure(8192, torch.device(name))
    first = rope._cos_sin
    assert first.shape[0] == 8193
    for _ in range(3):
        rope._ensure(8192, torch.device(name))
        rope._ensure(8000, name)
    assert rope._cos_sin is first
    rope._ensure(9000, name)  # a longer model length grows it, geometrically
    assert rope._cos_sin.shape[0] == 2 * 8193
    if torch.cuda.is_available():  # a table on another device is rebuilt at the asked size, not doubled
        rope._ensure(100, "cpu")
        assert rope._cos_sin.shape[0] == 4096 and rope._cos_sin.device.type == "cpu"
