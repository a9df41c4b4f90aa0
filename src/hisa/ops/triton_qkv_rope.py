"""Triton kernel of the fused q|k|v split + QK-norm + RoPE. Launcher: `hisa.ops.qkv_rope`.

Grid (T, H + 2 * KVH): program (t, h) reads head h of token t from the fused projection row
([q heads | k heads | v heads], D each) and writes it to q, k or v (contiguous [T, heads, D]).
q and k heads are rotated in the rotate-half layout (first half x1, second half x2):
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin,
with cos/sin read from the token's row of `cos_sin` [T, 2, D // 2] (fp32), in fp32, rounded once.
HAS_NORM (Gemma-3's QK-norm) first norms each q/k head over D with its weight ([D], shared by the
heads of q, resp. k) and rounds to the dtype, as the unfused model does; UNIT_OFFSET scales by
(1 + w) in fp32 (Gemma), otherwise rounds first and multiplies by w. v heads are copied.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter


@triton.jit
def qkv_rope_kernel(
    qkv_ptr, cs_ptr, qw_ptr, kw_ptr,  # qkv [T, (H + 2 KVH) * D]; cos_sin fp32 [T, 2, HALF]; norm weights [D]
    q_ptr, k_ptr, v_ptr,              # outputs [T, H, D], [T, KVH, D], [T, KVH, D], contiguous
    stride_qkv, stride_cs, eps,
    H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_H)
    ok = d < HALF
    src = qkv_ptr + t * stride_qkv + head * 2 * HALF
    x1 = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_H]
    x2 = tl.load(src + HALF + d, mask=ok, other=0.0).to(tl.float32)
    if head >= H + KVH:  # a v head: copied as it is
        dst = v_ptr + (t * KVH + head - H - KVH) * 2 * HALF
        tl.store(dst + d, x1.to(dtype), mask=ok)
        tl.store(dst + HALF + d, x2.to(dtype), mask=ok)
    else:
        is_q = head < H
        if HAS_NORM:
            if is_q:
                w1 = tl.load(qw_ptr + d, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(qw_ptr + HALF + d, mask=ok, other=0.0).to(tl.float32)
            else:
                w1 = tl.load(kw_ptr + d, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(kw_ptr + HALF + d, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
            if UNIT_OFFSET:
                x1 = (x1 * rstd * (1.0 + w1)).to(dtype).to(tl.float32)
                x2 = (x2 * rstd * (1.0 + w2)).to(dtype).to(tl.float32)
            else:
                x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
                x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        cos = tl.load(cs_ptr + t * stride_cs + d, mask=ok, other=0.0)
        sin = tl.load(cs_ptr + t * stride_cs + HALF + d, mask=ok, other=0.0)
        o1 = (x1 * cos - x2 * sin).to(dtype)
        o2 = (x2 * cos + x1 * sin).to(dtype)
        if is_q:
            dst = q_ptr + (t * H + head) * 2 * HALF
        else:
            dst = k_ptr + (t * KVH + head - H) * 2 * HALF
        tl.store(dst + d, o1, mask=ok)
        tl.store(dst + HALF + d, o2, mask=ok)
