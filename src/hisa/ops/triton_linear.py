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
):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + m[:, None] * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k = tl.arange(0, BLOCK_K)
    if PDL:  # the first weight tile: constant data, read before the wait
        w0 = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    if PDL:
        x0 = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.dot(w0, tl.trans(x0), acc=acc, input_precision=DOT_PRECISION)
        k_first: tl.constexpr = BLOCK_K
    else:
        k_first: tl.constexpr = 0
    for k0 in tl.range(k_first, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + k
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w, tl.trans(x), acc=acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:  # added in fp32 before the one rounding, as cuBLAS does
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def skinny_gate_up_kernel(
    x_ptr, w_ptr, y_ptr,            # x [M, K], w [2 I, K] = [gate | up] (rows contiguous), y [M, I]
    M, I, stride_xm, stride_wn, stride_ym,
    K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    """The gated MLP's first half for a decode batch: y = act(x @ gate^T) * (x @ up^T).

    Program n0 streams rows [n0 * BLOCK_N, (n0 + 1) * BLOCK_N) of the gate half and the same rows
    of the up half, as skinny_linear_kernel streams one block, and applies the activation in its
    epilogue: the [M, 2 I] projection output and the separate act_mul launch are never made. Both
    products are rounded to the output dtype before act(gate) * up, as the unfused two ops round
    (`hisa.ops.triton_act_mul.gated`); ACT: 0 = SiLU, 1 = GELU (tanh)."""
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
    k = tl.arange(0, BLOCK_K)
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + k
        k_ok = kk < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(g_rows + kk[None, :], mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
        wu = tl.load(u_rows + kk[None, :], mask=w_mask, other=0.0)
        xt = tl.trans(tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0))
        acc_g = tl.dot(wg, xt, acc=acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(wu, xt, acc=acc_u, input_precision=DOT_PRECISION)
    dtype = y_ptr.dtype.element_ty
    y = gated(acc_g.to(dtype).to(tl.float32), acc_u.to(dtype).to(tl.float32), ACT, dtype)
    tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], y, mask=n_ok[:, None] & m_ok[None, :])
