"""hisa.ops.linear: the decode-batch projection kernel against F.linear, and where it is used."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hisa.ops import linear as linear_mod
from hisa.ops.linear import Linear, linear

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,block_n,block_k", [(1, 40, 64, 16, 32), (5, 33, 100, 16, 32), (16, 64, 48, 32, 16),
                                                   (3, 17, 256, 16, 128)])
def test_kernel_matches_f_linear(dtype, m, n, k, block_n, block_k):
    """Rows 1..16, N and K not multiples of the blocks (masked tails), several blocks over K."""
    torch.manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = torch.randn(n, k, dtype=dtype, device=DEV) * k ** -0.5
    got = linear(x, w, use_triton=True, block_n=block_n, block_k=block_k, num_stages=2)
    want = F.linear(x.float(), w.float())
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@needs_triton
def test_fp16_bias_is_added_before_the_one_rounding():
    """The bias joins the fp32 accumulator (as cuBLAS adds it), not the rounded fp16 output: outputs
    near 1000 (fp16 steps of 0.5-1) plus biases under 0.5 differ from a round-then-add in about half
    the entries; the kernel matches one rounding of the fp32 sum but for accumulation-order ties."""
    torch.manual_seed(5)
    x = torch.randn(4, 64, dtype=torch.float16, device=DEV)
    w = (torch.randn(64, 64, device=DEV) * 120).half()
    b = (torch.rand(64, device=DEV) * 0.5).half()
    got = linear(x, w, b, use_triton=True, block_n=16, block_k=32, num_stages=1)
    exact = F.linear(x.float(), w.float()) + b.float()
    assert (got == exact.half()).float().mean() > 0.97
    assert (F.linear(x, w) + b != exact.half()).float().mean() > 0.2   # (what two roundings would give)


@needs_triton
def test_leading_dims_bias_and_strided_rows():
    x = torch.randn(2, 3, 40, device=DEV)
    big = torch.randn(6, 80, device=DEV)
    w = torch.randn(24, 40, device=DEV)
    b = torch.randn(24, device=DEV)
    got = linear(x, w, b, use_triton=True, block_n=16, block_k=16, num_stages=1)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3, 24)
    rows = big[:, :40]  # a row stride of 80
    torch.testing.assert_close(linear(rows, w, use_triton=True, block_n=16, block_k=16, num_stages=1),
                               F.linear(rows, w), rtol=1e-5, atol=1e-5)


@needs_triton
def test_bad_input_is_refused():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="does not match"):
        linear(x, torch.randn(4, 9, device=DEV), use_triton=True)
    with pytest.raises(ValueError, match="weight is"):
        linear(x, torch.randn(4, 8, device=DEV, dtype=torch.float16), use_triton=True)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, torch.randn(4, 8, device=DEV), torch.randn(5, device=DEV), use_triton=True)
    with pytest.raises(ValueError, match="at most 16 rows"):
        linear(torch.randn(17, 8, device=DEV), torch.randn(4, 8, device=DEV), use_triton=True)


def test_the_dispatch_uses_the_kernel_only_where_it_pays(monkeypatch):
    """CPU tensors, fp32, more than MAX_M rows and a weight too short to fill the GPU take F.linear;
    the model layer computes the same as nn.Linear either way."""
    calls = []
    real = F.linear
    monkeypatch.setattr(linear_mod.F, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = Linear(32, 48, bias=False)
    x = torch.randn(4, 32)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)
    assert calls == [(4, 32)]  # a CPU tensor: F.linear


@needs_triton
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,inter,k,block_n,block_k", [(1, 40, 64, 16, 32), (5, 33, 100, 16, 32), (16, 64, 48, 32, 16)])
def test_gate_up_kernel_matches_the_projection_then_act_mul(act, dtype, m, inter, k, block_n, block_k):
    """gate_up_act's kernel (both halves streamed by one program, the activation in its epilogue)
    against the fp32 projection then act(gate) * up; masked tails in I and K, several K blocks."""
    from hisa.ops.act_mul import act_mul_ref
    from hisa.ops.linear import gate_up_act

    torch.manual_seed(m * 100 + inter + k)
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = (torch.randn(2 * inter, k, device=DEV) * 2 * k ** -0.5).to(dtype)
    got = gate_up_act(x, w, act=act, use_triton=True, block_n=block_n, block_k=block_k, num_stages=2)
    want = act_mul_ref(F.linear(x.float(), w.float()), act=act)
    assert got.dtype == dtype and got.shape == (m, inter)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_gate_up_act_off_the_kernel_is_the_projection_then_act_mul():
    """Where the kernel does not run (here: the CPU), gate_up_act is linear + act_mul, leading dims kept;
    a weight that is not two halves, or an unknown activation, is refused."""
    from hisa.ops.act_mul import act_mul
    from hisa.ops.linear import gate_up_act

    x = torch.randn(2, 3, 24)
    w = torch.randn(40, 24)
    got = gate_up_act(x, w, act="silu")
    assert got.shape == (2, 3, 20)
    torch.testing.assert_close(got, act_mul(F.linear(x, w).reshape(6, 40), act="silu").view(2, 3, 20))
    with pytest.raises(ValueError, match=r"\[2 \* I, K\]"):
        gate_up_act(x, torch.randn(41, 24), act="silu")
    with pytest.raises(ValueError, match="act must be"):
        gate_up_act(x, w, act="relu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("act,rows", [("silu", 8), ("gelu_tanh", 3), ("silu", 16)])
def test_gate_up_kernel_at_llama_8b_shapes_matches_the_unfused_ops(act, rows):
    """bf16, Llama-3.1-8B's gate|up (2 x 14336 x 4096): the dispatch picks the fused kernel, and it
    agrees with cuBLAS's projection then act_mul to bf16 rounding (each half rounded once in both)."""
    from hisa.ops.act_mul import act_mul
    from hisa.ops.linear import gate_up_act

    torch.manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2 * 14336, 4096, device="cuda") * 4096 ** -0.5).to(torch.bfloat16)
    got = gate_up_act(x, w, act=act)
    want = act_mul(F.linear(x, w), act=act)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert (got == want).float().mean() > 0.9
