"""Triton kernel of RMSNorm fused with the residual add. Launcher: `hisa.ops.rms_norm`.

One program per row (token), in fp32, rounding to the output dtype wherever the unfused model
rounds, so the result follows `rms_norm_ref` in any dtype:
  * HAS_PRE (Gemma's post-sublayer norm, with PRE_W): h = norm(x), rounded; else h = x.
  * HAS_RESIDUAL: r = h + residual, rounded and stored (the new residual); else r = x.
  * out = norm(r) with W.
  * norm(x) = x * rsqrt(mean(x^2) + eps), scaled: UNIT_OFFSET (Gemma) by (1 + w) in fp32, then
    rounded; otherwise (Llama) rounded first, then multiplied by w (what `w * x.to(dtype)` does).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter


@triton.jit
def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, pre_w_ptr,  # x, residual [T, N] (row strides below); weights [N]
    out_ptr, res_out_ptr,              # [T, N] contiguous: the normed output, the new residual
    n_cols, stride_x, stride_res, eps, pre_eps,
    HAS_RESIDUAL: tl.constexpr, HAS_PRE: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_N]
    if HAS_RESIDUAL:
        if HAS_PRE:  # Gemma: the sublayer's output is normed (its post norm) before the add
            pw = tl.load(pre_w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            prstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + pre_eps)
            if UNIT_OFFSET:
                x = (x * prstd * (1.0 + pw)).to(dtype).to(tl.float32)
            else:
                x = ((x * prstd).to(dtype).to(tl.float32) * pw).to(dtype).to(tl.float32)
        res = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        r = (x + res).to(dtype)
        tl.store(res_out_ptr + row * n_cols + cols, r, mask=ok)
        x = r.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # masked columns hold 0: the sum is the row's
    if UNIT_OFFSET:
        y = (x * rstd * (1.0 + w)).to(dtype)
    else:
        y = ((x * rstd).to(dtype).to(tl.float32) * w).to(dtype)
    tl.store(out_ptr + row * n_cols + cols, y, mask=ok)
