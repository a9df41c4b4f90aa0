"""rms_norm: the reference against transformers' norms and decoder-layer math, the Triton kernel
(compiled on CUDA, else TRITON_INTERPRET=1 on CPU tensors) and the CPU path against the reference."""

from __future__ import annotations

import pytest
import torch

from hisa.ops.rms_norm import rms_norm, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# bf16 arithmetic is wrong in the Triton interpreter: bf16 runs only compiled, on CUDA
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _case(t, n, dtype, *, residual, pre, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=gen) * 3
    w = torch.randn(n, generator=gen) * 0.5
    r = torch.randn(t, n, generator=gen) if residual else None
    pw = torch.randn(n, generator=gen) * 0.5 if pre else None
    move = (lambda a: None if a is None else a.to(device, dtype))
    return move(x), move(w), move(r), move(pw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 64), (5, 576), (3, 100)])  # 100: a row that is not a power of two
@pytest.mark.parametrize("unit_offset,residual,pre", [(False, False, False), (False, True, False),
                                                      (True, False, False), (True, True, True)])
def test_triton_matches_reference(dtype, t, n, unit_offset, residual, pre):
    x, w, r, pw = _case(t, n, dtype, residual=residual, pre=pre)
    args = dict(eps=1e-6, unit_offset=unit_offset, residual=r, pre_weight=pw)
    out, res = rms_norm(x, w, use_triton=True, **args)
    ref_out, ref_res = rms_norm_ref(x, w, **args)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(res, ref_res, **TOL[dtype])
    assert out.dtype == dtype and res.dtype == dtype and out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset,residual,pre", [(False, False, False), (False, True, False), (True, True, True)])
def test_cpu_path_matches_reference(dtype, unit_offset, residual, pre):
    x, w, r, pw = _case(7, 96, dtype, residual=residual, pre=pre, device="cpu")
    args = dict(eps=1e-5, unit_offset=unit_offset, residual=r, pre_weight=pw)
    out, res = rms_norm(x, w, **args)
    ref_out, ref_res = rms_norm_ref(x, w, **args)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert torch.equal(res, ref_res)
    if r is None:
        assert res is x  # the first layer's residual is its input itself


def test_reference_is_transformers_llama_and_gemma_math():
    """Llama: r = x + residual; out = LlamaRMSNorm(r). Gemma-3: r = residual + post_norm(x); out = Gemma3RMSNorm(r)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, r, pw = _case(4, 64, torch.float32, residual=True, pre=True, device="cpu")
    llama = LlamaRMSNorm(64, eps=1e-5)
    llama.weight.data.copy_(w)
    out, res = rms_norm_ref(x, w, eps=1e-5, residual=r)
    torch.testing.assert_close(res, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out, llama(x + r), rtol=0, atol=0)
    post, norm = Gemma3RMSNorm(64, eps=1e-6), Gemma3RMSNorm(64, eps=1e-6)
    post.weight.data.copy_(pw)
    norm.weight.data.copy_(w)
    out, res = rms_norm_ref(x, w, eps=1e-6, unit_offset=True, residual=r, pre_weight=pw)
    torch.testing.assert_close(res, r + post(x), rtol=0, atol=0)
    torch.testing.assert_close(out, norm(r + post(x)), rtol=0, atol=0)


def test_inputs_are_not_written():
    x, w, r, pw = _case(3, 64, torch.float32, residual=True, pre=True, device=DEVICE)
    before = [t.clone() for t in (x, w, r, pw)]
    for use_triton in (False, True):
        rms_norm(x, w, eps=1e-6, unit_offset=True, residual=r, pre_weight=pw, use_triton=use_triton)
        assert all(torch.equal(a, b) for a, b in zip(before, (x, w, r, pw)))


def test_strided_rows_are_read_in_place():
    x, w, r, _ = _case(4, 128, torch.float32, residual=True, pre=False, device=DEVICE)
    wide = torch.randn(4, 256, device=DEVICE)
    wide[:, :128] = x
    out, res = rms_norm(wide[:, :128], w, eps=1e-6, residual=r, use_triton=True)
    ref_out, ref_res = rms_norm_ref(x, w, eps=1e-6, residual=r)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(res, ref_res, **TOL[torch.float32])


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(2, 3, 4)), r"x must be 2-D \[T, N\]"),
    (dict(weight=torch.randn(5)), r"weight must have shape \(8,\)"),
    (dict(residual=torch.randn(3, 8)), r"residual must have shape \(2, 8\)"),
    (dict(residual=torch.randn(2, 8, dtype=torch.float64)), r"residual must be torch.float32"),
    (dict(pre_weight=torch.randn(8)), "pre_weight .* needs a residual"),
    (dict(eps=-1.0), "eps must be a finite float >= 0"),
    (dict(x=torch.randn(8, 2).t()), "contiguous in its last dim"),
    (dict(x=torch.randint(0, 3, (2, 8))), "x must be torch.float16 or torch.bfloat16 or torch.float32"),
])
def test_bad_arguments_fail_with_a_message(kwargs, match):
    args = dict(x=torch.randn(2, 8), weight=torch.randn(8), eps=1e-6)
    args.update(kwargs)
    x, w = args.pop("x"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        rms_norm(x, w, **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_large_rows_and_many_tokens():
    """Real sizes on the GPU: Llama-3.1-8B's hidden size, a prefill chunk, bf16."""
    x, w, r, _ = _case(2048, 4096, torch.bfloat16, residual=True, pre=False, device="cuda")
    out, res = rms_norm(x, w, eps=1e-5, residual=r)
    ref_out, ref_res = rms_norm_ref(x, w, eps=1e-5, residual=r)
    torch.testing.assert_close(out, ref_out, **TOL[torch.bfloat16])
    assert torch.equal(res, ref_res)
