"""Triton kernel of `hisa.ops.linear`: y = x @ w^T for a decode batch (few rows, M <= 16).

Grid (cdiv(N, BLOCK_N),): program n0 streams rows [n0 * BLOCK_N, (n0 + 1) * BLOCK_N) of the weight
over all of K in BLOCK_K steps (a loop Triton software-pipelines, STAGES deep) and multiplies each
tile by the whole of x. The weight tile is tl.dot's left operand ([BLOCK_N, BLOCK_K] x [BLOCK_K,
BLOCK_M]; x's rows padded to BLOCK_M = 16, the smallest tensor-core shape), so a decode batch of 1-16
rows costs what its weight bytes cost; fp32 accumulation (and bias), one rounding to the output
dtype. No split over K: a program owns its outputs and writes them once (no workspace, no second
kernel).
With PDL (`hisa.ops.pdl`) the first weight tile is read before the wait for the previous kernel
(weights are not written during a step), so the weight stream starts while that kernel drains.

Two fusions take a separate kernel out of a decoder layer (`hisa.ops.rms_norm.NormedRows`):
  * HAS_RESIDUAL (skinny_linear_kernel): y = x @ w^T + residual, the product rounded to the output
    dtype before the add, as the unfused pair rounds: a sublayer's output joins the residual stream
    in the projection's epilogue.
  * NORM_IN (both kernels): x is the raw residual stream r and the kernel computes
    rmsnorm(r) * nw @ w^T itself. Each x tile is multiplied by the norm weight nw as it is read (one
    rounding to x's dtype, for tl.dot) while the row's sum of squares accumulates in fp32; the
    epilogue scales the fp32 products by rsqrt(mean(r^2) + eps). The norm is a per-row factor, so it
    comes out of the sum; the one difference from a separate norm kernel is where the bf16
    rounding falls (r * nw rather than rmsnorm(r), then * nw).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_act_mul import gated
from hisa.ops.triton_pdl import pdl_enter


@triton.jit
def skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,     # x [M, K], w [N, K] (rows contiguous), bias [N] (HAS_BIAS), y [M, N]
    M, N, stride_xm, stride_wn, stride_ym,
    K: tl.constexpr,  # (a model has few distinct K; a constant trip count, and the interpreter needs one)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
    res_ptr=None, stride_rm=0, HAS_RESIDUAL: tl.constexpr = False,  # residual [M, N] added in the epilogue
    nw_ptr=None, eps=0.0, NORM_IN: tl.constexpr = False,  # x is normed with weight nw [K] (module docstring)
):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + m[:, None] * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)  # NORM_IN: each row's sum of x^2
    k = tl.arange(0, BLOCK_K)
    if PDL:  # the first weight tile: constant data, read before the wait
        w0 = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    if PDL:
        x0, sumsq = _x_tile(x_rows, nw_ptr, k, m_ok, k < K, sumsq, NORM_IN)
        acc = tl.dot(w0, tl.trans(x0), acc=acc, input_precision=DOT_PRECISION)
        k_first: tl.constexpr = BLOCK_K
    else:
        k_first: tl.constexpr = 0
    for k0 in tl.range(k_first, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + k
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        x, sumsq = _x_tile(x_rows, nw_ptr, kk, m_ok, k_ok, sumsq, NORM_IN)  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w, tl.trans(x), acc=acc, input_precision=DOT_PRECISION)
    if NORM_IN:
        acc *= tl.rsqrt(sumsq / K + eps)[None, :]
    if HAS_BIAS:  # added in fp32 before the one rounding, as cuBLAS does
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = acc.to(y_ptr.dtype.element_ty)
    if HAS_RESIDUAL:  # the product rounded, then the add in fp32 and a second rounding (the unfused ops)
        res = tl.load(res_ptr + m[None, :] * stride_rm + n[:, None], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        out = (out.to(tl.float32) + res.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], out, mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _x_tile(x_rows, nw_ptr, kk, m_ok, k_ok, sumsq, NORM_IN: tl.constexpr):
    """x's tile [BLOCK_M, BLOCK_K] at columns kk for tl.dot: as stored, or (NORM_IN) times the norm
    weight, rounded to x's dtype, with the tile's squares added to each row's sumsq."""
    x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if NORM_IN:
        xf = x.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
        nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        x = (xf * nw[None, :]).to(x.dtype)
    return x, sumsq


@triton.jit
def skinny_gate_up_kernel(
    x_ptr, w_ptr, y_ptr,            # x [M, K], w [2 I, K] = [gate | up] (rows contiguous), y [M, I]
    M, I, stride_xm, stride_wn, stride_ym,
    K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
    nw_ptr=None, eps=0.0, NORM_IN: tl.constexpr = False,  # x is normed with weight nw [K] (module docstring)
):
    """The gated MLP's first half for a decode batch: y = act(x @ gate^T) * (x @ up^T).

    Program n0 streams rows [n0 * BLOCK_N, (n0 + 1) * BLOCK_N) of the gate half and the same rows
    of the up half, as skinny_linear_kernel streams one block, and applies the activation in its
    epilogue: the [M, 2 I] projection output and the separate act_mul launch are never made. Both
    products are rounded to the output dtype before act(gate) * up, as the unfused two ops round
    (`hisa.ops.triton_act_mul.gated`); ACT: 0 = SiLU, 1 = GELU (tanh). NORM_IN: as in
    skinny_linear_kernel, the norm scales both products before they are rounded."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok = n < I
    m_ok = m < M
    g_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    u_rows = w_ptr + (n + I).to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + m[:, None] * stride_xm
    acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    k = tl.arange(0, BLOCK_K)
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + k
        k_ok = kk < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(g_rows + kk[None, :], mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
        wu = tl.load(u_rows + kk[None, :], mask=w_mask, other=0.0)
        x, sumsq = _x_tile(x_rows, nw_ptr, kk, m_ok, k_ok, sumsq, NORM_IN)
        xt = tl.trans(x)
        acc_g = tl.dot(wg, xt, acc=acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(wu, xt, acc=acc_u, input_precision=DOT_PRECISION)
    if NORM_IN:
        rstd = tl.rsqrt(sumsq / K + eps)[None, :]
        acc_g *= rstd
        acc_u *= rstd
    dtype = y_ptr.dtype.element_ty
    y = gated(acc_g.to(dtype).to(tl.float32), acc_u.to(dtype).to(tl.float32), ACT, dtype)
    tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], y, mask=n_ok[:, None] & m_ok[None, :])
