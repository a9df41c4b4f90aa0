"""Triton kernel folding each decode row's new key into its page's Quest summaries (min, max and,
for quest-mean, the running mean). Launcher and reference: `hisa.sparse.quest.QuestAlgorithm`.

Program r: the row's page is (t - 1) // S of its sparse slot, the key its (t - 1) % S-th token; a
page's first token starts the summaries at the key (the slots held a previous page's values).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter


@triton.jit
def quest_update_kernel(
    k_ptr,                          # [R, KVH * D] new keys (row stride below)
    kmin_ptr, kmax_ptr, kmean_ptr,  # [SS, MAXP, KVH * D] one layer's summaries (kmean when HAS_MEAN)
    sslot_ptr, t_ptr,               # int32 [R]
    stride_k, stride_s, stride_p, SENTINEL,
    S: tl.constexpr, KD: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    r = tl.program_id(0)
    sslot = tl.load(sslot_ptr + r)
    t = tl.load(t_ptr + r)
    if (sslot != SENTINEL) & (t > 0):
        page = ((t - 1) // S).to(tl.int64)
        off = (t - 1) % S
        offs = tl.arange(0, BLOCK)
        m = offs < KD
        k = tl.load(k_ptr + r * stride_k + offs, mask=m).to(tl.float32)
        base = sslot.to(tl.int64) * stride_s + page * stride_p + offs
        first = off == 0
        lo = tl.load(kmin_ptr + base, mask=m).to(tl.float32)
        hi = tl.load(kmax_ptr + base, mask=m).to(tl.float32)
        lo = tl.where(first, k, tl.minimum(lo, k))
        hi = tl.where(first, k, tl.maximum(hi, k))
        tl.store(kmin_ptr + base, lo.to(kmin_ptr.dtype.element_ty), mask=m)
        tl.store(kmax_ptr + base, hi.to(kmax_ptr.dtype.element_ty), mask=m)
        if HAS_MEAN:
            mean = tl.load(kmean_ptr + base, mask=m).to(tl.float32)
            mean = tl.where(first, k, mean + (k - mean) / (off + 1).to(tl.float32))
            tl.store(kmean_ptr + base, mean.to(kmean_ptr.dtype.element_ty), mask=m)
