"""Triton kernel of act(gate) * up over a fused gate|up projection. Launcher: `hisa.ops.act_mul`.

Grid (T, cdiv(I, BLOCK)): program (t, c) reads columns c*BLOCK.. of the gate half and the up half
of row t and writes act(gate) * up. In fp32; act(gate) is rounded to the dtype before the product,
as the unfused model's two ops do. ACT: 0 = SiLU (Llama), 1 = GELU with the tanh approximation (Gemma).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter

@triton.jit
def act_mul_kernel(
    x_ptr, out_ptr,      # x [T, 2 I] (gate | up), any row stride; out [T, I] contiguous
    inter, stride_x,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + t * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * inter + cols, gated(g, u, ACT, dtype), mask=ok)


@triton.jit
def gated(g, u, ACT: tl.constexpr, dtype: tl.constexpr):
    """act(g) * u from fp32 g and u (values of `dtype`), rounded to `dtype` as the unfused model's
    two ops round: act(g) first, then the product."""
    if ACT == 0:  # g * sigmoid(g), with exp of a non-positive argument only (no overflow)
        e = tl.exp(-tl.abs(g))
        a = g * tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    else:  # 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3); tanh from exp(-2|z|)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(z))
        th = (1.0 - e) / (1.0 + e)
        a = 0.5 * g * (1.0 + tl.where(z >= 0, th, -th))
    return (a.to(dtype).to(tl.float32) * u).to(dtype)
