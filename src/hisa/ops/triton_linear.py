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

Two fusions take the norm kernels out of a decoder layer (`hisa.ops.rms_norm.NormedRows`):
  * ADD_NORM (skinny_linear_kernel, the projection that ends a sublayer): r = x @ w^T + residual, the
    product rounded to the output dtype before the add (as the unfused pair rounds), stored as the
    new residual stream; the epilogue also prepares the next norm from the r it holds: xs = r * nw
    (nw: the next norm's weight, rounded to r's dtype) and, per program, the partial sums of r^2
    over its columns (fp32 [programs, BLOCK_M]).
  * NORM_IN (both kernels, the projection that starts the next sublayer): x is that xs, streamed into
    tl.dot as any input is, and the epilogue scales the fp32 products by each row's
    rsqrt(sum of the partials / K + eps), the norm being a per-row factor. The partials are loaded
    before the weight stream and summed after it (a fixed order: deterministic). The one difference
    from a norm kernel is where the rounding falls: r * nw, not rmsnorm(r) and then * nw.
(Applying the norm weight to each x tile inside the loop instead took the tiles out of the
software pipeline: 6.30 against 5.82 ms per 32K x 8 quest step on an H200.)

ROPE (skinny_linear_kernel, the fused q|k|v projection of a model without QK-norm): each program
streams the weight rows of BLOCK_N / 2 rotation pairs of one head (columns c and c + D / 2, their
rows interleaved in the tile, any row order being one pointer per row) and its epilogue rotates the
rounded products (rotate-half, fp32, rounded once: `qkv_rope`'s arithmetic) into q or k, or copies
them into v: the projection output and the qkv_rope launch are never made (`linear_qkv_rope`).
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
    res_ptr=None, nw_ptr=None, xs_ptr=None, ss_out_ptr=None,  # ADD_NORM: residual [M, N], next norm's weight
    stride_rm=0, stride_xsm=0, ADD_NORM: tl.constexpr = False,  # [N]; out: xs [M, N], partials [programs, BLOCK_M]
    ss_ptr=None, P=1, eps=0.0, BLOCK_P: tl.constexpr = 1, NORM_IN: tl.constexpr = False,  # partials [P, BLOCK_M]
    cs_ptr=None, q_ptr=None, k_ptr=None, v_ptr=None, stride_cs=0,  # ROPE: cos_sin fp32 [M, 2, HALF]; q, k, v out
    NH: tl.constexpr = 1, NKV: tl.constexpr = 1, HALF: tl.constexpr = 1, ROPE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    if ROPE:  # BLOCK_N / 2 rotation pairs of one head: tile row 2i is column c0 + i, row 2i + 1 column HALF + c0 + i
        PAIRS: tl.constexpr = BLOCK_N // 2
        head = pid // (HALF // PAIRS)
        c0 = (pid % (HALF // PAIRS)) * PAIRS
        row = tl.arange(0, BLOCK_N)
        n = head * 2 * HALF + (row % 2) * HALF + c0 + row // 2
    else:
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
    parts = _load_partials(ss_ptr, P, BLOCK_P, BLOCK_M, NORM_IN)
    mask = n_ok[:, None] & m_ok[None, :]
    if ADD_NORM:  # the epilogue's inputs, read before the weight stream (their latency hides behind it)
        res = tl.load(res_ptr + m[None, :] * stride_rm + n[:, None], mask=mask, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
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
    if NORM_IN:
        acc *= _rstd(parts, K, eps)[None, :]
    if HAS_BIAS:  # added in fp32 before the one rounding, as cuBLAS does
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    dtype = y_ptr.dtype.element_ty
    out = acc.to(dtype)
    if ADD_NORM:  # the product rounded, the add in fp32 and rounded again (the unfused ops)
        out = (out.to(tl.float32) + res).to(dtype)
        r = out.to(tl.float32)  # what the next norm reads: the stored stream (0 in masked rows and columns)
        tl.store(xs_ptr + m[None, :] * stride_xsm + n[:, None], (r * nw[:, None]).to(dtype), mask=mask)
        tl.store(ss_out_ptr + pid * BLOCK_M + m, tl.sum(r * r, axis=0))
    if ROPE:
        _rope_store(out, m, m_ok, head, c0, cs_ptr, q_ptr, k_ptr, v_ptr, stride_cs, NH, NKV, HALF, BLOCK_N // 2,
                    BLOCK_M)
    else:
        tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], out, mask=mask)


@triton.jit
def _rope_store(out, m, m_ok, head, c0, cs_ptr, q_ptr, k_ptr, v_ptr, stride_cs, NH: tl.constexpr,
                NKV: tl.constexpr, HALF: tl.constexpr, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr):
    """ROPE's epilogue: the rounded products of PAIRS (column, column + HALF) pairs of one head
    ([2 * PAIRS, BLOCK_M], pairs interleaved), rotated for a q or k head (rotate-half, in fp32 from
    the rounded values, rounded once: as `qkv_rope` after the unfused projection) or copied for a v
    head, into the head's row of q [M, NH, 2 HALF], k or v [M, NKV, 2 HALF]."""
    x = tl.permute(tl.reshape(out.to(tl.float32), [PAIRS, 2, BLOCK_M]), (0, 2, 1))  # [PAIRS, BLOCK_M, 2]
    x1, x2 = tl.split(x)  # [PAIRS, BLOCK_M]: columns c0 + i and HALF + c0 + i
    c = c0 + tl.arange(0, PAIRS)
    ok = m_ok[None, :]
    dtype = q_ptr.dtype.element_ty
    if head < NH + NKV:
        cs = cs_ptr + m[None, :] * stride_cs + c[:, None]
        cos = tl.load(cs, mask=ok, other=0.0)
        sin = tl.load(cs + HALF, mask=ok, other=0.0)
        o1 = (x1 * cos - x2 * sin).to(dtype)
        o2 = (x2 * cos + x1 * sin).to(dtype)
        if head < NH:
            dst = q_ptr + (m[None, :] * NH + head) * (2 * HALF) + c[:, None]
        else:
            dst = k_ptr + (m[None, :] * NKV + head - NH) * (2 * HALF) + c[:, None]
        tl.store(dst, o1, mask=ok)
        tl.store(dst + HALF, o2, mask=ok)
    else:
        dst = v_ptr + (m[None, :] * NKV + head - NH - NKV) * (2 * HALF) + c[:, None]
        tl.store(dst, x1.to(dtype), mask=ok)
        tl.store(dst + HALF, x2.to(dtype), mask=ok)


@triton.jit
def _load_partials(ss_ptr, P, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, NORM_IN: tl.constexpr):
    """NORM_IN: the partial sums of squares [BLOCK_P, BLOCK_M] (read before the weight stream, summed
    after it by _rstd, so their latency hides behind it); else a placeholder."""
    if NORM_IN:
        p = tl.arange(0, BLOCK_P)
        parts = tl.load(ss_ptr + p[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :], mask=(p < P)[:, None],
                        other=0.0)
    else:
        parts = tl.zeros([1, BLOCK_M], dtype=tl.float32)
    return parts


@triton.jit
def _rstd(parts, K: tl.constexpr, eps):
    """Each row's norm factor rsqrt(mean(r^2) + eps) from the partials, [BLOCK_M]."""
    return tl.rsqrt(tl.sum(parts, axis=0) / K + eps)


@triton.jit
def skinny_gate_up_kernel(
    x_ptr, w_ptr, y_ptr,            # x [M, K], w [2 I, K] = [gate | up] (rows contiguous), y [M, I]
    M, I, stride_xm, stride_wn, stride_ym,
    K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
    ss_ptr=None, P=1, eps=0.0, BLOCK_P: tl.constexpr = 1, NORM_IN: tl.constexpr = False,  # as skinny_linear's
):
    """The gated MLP's first half for a decode batch: y = act(x @ gate^T) * (x @ up^T).

    Program n0 streams rows [n0 * BLOCK_N, (n0 + 1) * BLOCK_N) of the gate half and the same rows
    of the up half, as skinny_linear_kernel streams one block, and applies the activation in its
    epilogue: the [M, 2 I] projection output and the separate act_mul launch are never made. Both
    products are rounded to the output dtype before act(gate) * up, as the unfused two ops round
    (`hisa.ops.triton_act_mul.gated`); ACT: 0 = SiLU, 1 = GELU (tanh). NORM_IN: as in
    skinny_linear_kernel, the norm factor scales both products before they are rounded."""
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
    parts = _load_partials(ss_ptr, P, BLOCK_P, BLOCK_M, NORM_IN)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + k
        k_ok = kk < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(g_rows + kk[None, :], mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
        wu = tl.load(u_rows + kk[None, :], mask=w_mask, other=0.0)
        xt = tl.trans(tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0))
        acc_g = tl.dot(wg, xt, acc=acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(wu, xt, acc=acc_u, input_precision=DOT_PRECISION)
    if NORM_IN:
        rstd = _rstd(parts, K, eps)[None, :]
        acc_g *= rstd
        acc_u *= rstd
    dtype = y_ptr.dtype.element_ty
    y = gated(acc_g.to(dtype).to(tl.float32), acc_u.to(dtype).to(tl.float32), ACT, dtype)
    tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], y, mask=n_ok[:, None] & m_ok[None, :])
