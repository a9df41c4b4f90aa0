"""act_mul: the Triton kernel (compiled on CUDA, else TRITON_INTERPRET=1 on CPU tensors) against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hisa.ops.act_mul import act_mul, act_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("t,inter", [(1, 64), (4, 1536), (3, 100)])
def test_triton_matches_reference(dtype, act, t, inter):
    x = (torch.randn(t, 2 * inter, generator=torch.Generator().manual_seed(0)) * 4).to(DEVICE, dtype)
    got = act_mul(x, act=act, use_triton=True)
    torch.testing.assert_close(got, act_mul_ref(x, act=act), **TOL[dtype])
    assert got.shape == (t, inter) and got.is_contiguous()


def test_reference_is_the_gated_mlp():
    x = torch.randn(3, 64)
    g, u = x[:, :32], x[:, 32:]
    assert torch.equal(act_mul_ref(x, act="silu"), F.silu(g) * u)
    assert torch.equal(act_mul_ref(x, act="gelu_tanh"), F.gelu(g, approximate="tanh") * u)


def test_strided_rows_in_triton():
    wide = torch.randn(4, 80, device=DEVICE)
    x = wide[:, :64]
    torch.testing.assert_close(act_mul(x, act="silu", use_triton=True), act_mul_ref(x, act="silu"), **TOL[torch.float32])


@pytest.mark.parametrize("x,act,match", [
    (torch.randn(2, 7), "silu", "odd width"),
    (torch.randn(2, 8), "relu", "act must be one of"),
    (torch.randn(8), "silu", r"gate_up must be 2-D"),
])
def test_bad_arguments_fail_with_a_message(x, act, match):
    with pytest.raises(ValueError, match=match):
        act_mul(x, act=act)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_cuda_real_shapes(act):
    x = torch.randn(2048, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(act_mul(x, act=act), act_mul_ref(x, act=act), **TOL[torch.bfloat16])
