"""Triton kernels of page scoring for the whole batch (Quest bound, optional page-mean key).
Launcher and torch reference: `hisa.sparse.page_scores`.

Kernel 1 (page_logits_kernel), grid (R, cdiv(PB, BLOCKS), KVH): program (r, c, j) scores the page
blocks b = c * BLOCKS ... c * BLOCKS + BLOCKS - 1 of row r (block b: pages [b * BLOCK_P, (b + 1) *
BLOCK_P)) for the query heads of kv head j, in a loop that Triton software-pipelines (STAGES: the
next block's summaries load while this one's products run). Quest's bound
max_d(q_d * kmin_d, q_d * kmax_d) summed over d equals q⁺ · kmax + q⁻ · kmin (q⁺ = max(q, 0),
q⁻ = min(q, 0)) when kmin <= kmax. Each kv head's page summaries are read once and serve its G query
heads as two tl.dot products in q's dtype ([BLOCK_P, D] x [D, G], heads padded to 16 rows; products
of two bf16/fp16 values are exact in the fp32 accumulator). The logits (log2 domain) go to a
workspace [R, H, MAXP] and each program also writes its block's per-head softmax partials (max,
sum of 2^(l - max)) to [R, PB, H].
Kernel 2 (page_scores_kernel), grid (R, PB): merges the partials of row r into each head's max and
normalizer and writes the page score sum_h softmax_h(page) (plus the mean-key term when HAS_MEAN),
-inf outside the row's middle range [lo, hi).
Kernel 3 (select_pages_kernel), grid (R,): the top K pages of each row, in page order.
(Merging, scoring and selecting in one program per row was slower: 35 vs 27 µs per layer for
kernels 2 + 3 after kernel 1 at 32K x 8, one SM per row reading all its logits.)
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter
from hisa.sparse.triton_compose import scatter_resident_row


@triton.jit
def page_logits_kernel(
    q_ptr,                          # [R, H, D]
    kmin_ptr, kmax_ptr, kmean_ptr,  # [SS, MAXP, KVH, D] one layer's metadata (kmean read when HAS_MEAN)
    sslot_ptr, lo_ptr, hi_ptr,      # int32 [R]: sparse slot, middle range [lo, hi) (empty: not selected)
    logit_ptr, mpart_ptr, spart_ptr,  # fp32 [R, H, MAXP], [R, PB, H], [R, PB, H]
    logit2_ptr, mpart2_ptr, spart2_ptr,  # the same for the mean key (HAS_MEAN)
    scale_log2, MAXP, PB,
    stride_qr, stride_qh, stride_ms, stride_mp, stride_mh,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, HAS_MEAN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCKS: tl.constexpr, STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    j = tl.program_id(2)  # the kv head
    sslot = tl.load(sslot_ptr + r).to(tl.int64)
    lo = tl.load(lo_ptr + r)
    hi = tl.load(hi_ptr + r)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    h = j * G + g  # the kv head's query heads (padded to BLOCK_G rows for tl.dot)
    # the group's queries split by sign: q . bound = q+ . kmax + q- . kmin (exact in q's dtype)
    qg = tl.load(q_ptr + r * stride_qr + h[:, None] * stride_qh + d[None, :],
                 mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    q_pos = tl.trans(tl.where(qg > 0, qg, 0.0).to(kmax_ptr.dtype.element_ty))  # (where computes bf16 in fp32)
    q_neg = tl.trans(tl.where(qg < 0, qg, 0.0).to(kmax_ptr.dtype.element_ty))
    if HAS_MEAN:
        q_all = tl.trans(qg.to(kmax_ptr.dtype.element_ty))
    row = sslot * stride_ms + j * stride_mh
    for i in tl.range(0, BLOCKS, num_stages=STAGES):
        b = c * BLOCKS + i  # (the last program's blocks may run past PB: nothing read or written there)
        p = b * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] logical pages
        valid = (p >= lo) & (p < hi)  # (hi <= MAXP <= PB * BLOCK_P)
        tile = valid[:, None] & d_ok[None, :]
        # the kv head's summaries of the block's pages, read once, one product per bound for all G heads
        base = (row + p.to(tl.int64) * stride_mp)[:, None] + d[None, :]
        kmax = tl.load(kmax_ptr + base, mask=tile, other=0.0)  # [BLOCK_P, BLOCK_D]
        kmin = tl.load(kmin_ptr + base, mask=tile, other=0.0)
        lg = tl.dot(kmax, q_pos, input_precision=DOT_PRECISION)
        lg = tl.dot(kmin, q_neg, acc=lg, input_precision=DOT_PRECISION)  # [BLOCK_P, BLOCK_G]
        _store_heads(lg * scale_log2, valid, g_ok & (b < PB), r, b, p, h, logit_ptr, mpart_ptr, spart_ptr,
                     MAXP, PB, H)
        if HAS_MEAN:
            kmean = tl.load(kmean_ptr + base, mask=tile, other=0.0)
            lm = tl.dot(kmean, q_all, input_precision=DOT_PRECISION)
            _store_heads(lm * scale_log2, valid, g_ok & (b < PB), r, b, p, h, logit2_ptr, mpart2_ptr, spart2_ptr,
                         MAXP, PB, H)


@triton.jit
def _store_heads(lg, valid, g_ok, r, b, p, h, logit_ptr, mpart_ptr, spart_ptr, MAXP, PB, H):
    """A block's logits [BLOCK_P, BLOCK_G] of the heads h (read back where valid) and each head's
    softmax partials over the block (max, sum of 2^(l - max)); g_ok: the real heads (none for a
    block past the row's last)."""
    lg = tl.where(valid[:, None] & g_ok[None, :], lg, float("-inf"))
    tl.store(logit_ptr + (r * H + h)[None, :] * MAXP + p[:, None], lg, mask=valid[:, None] & g_ok[None, :])
    m = tl.max(lg, axis=0)  # [BLOCK_G]
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp2(lg - m_sub[None, :]), axis=0)  # exp2(-inf) = 0 for masked pages
    tl.store(mpart_ptr + (r * PB + b) * H + h, m, mask=g_ok)
    tl.store(spart_ptr + (r * PB + b) * H + h, s, mask=g_ok)


@triton.jit
def _softmax_block(logit_ptr, mpart_ptr, spart_ptr, r, p, valid, MAXP, PB, H: tl.constexpr,
                   BLOCK_PB: tl.constexpr, BLOCK_H: tl.constexpr):
    """sum over heads of softmax_h at pages p."""
    return tl.sum(head_softmax(logit_ptr, mpart_ptr, spart_ptr, r, p, valid, MAXP, PB, H, BLOCK_PB, BLOCK_H),
                  axis=1)


@triton.jit
def head_softmax(logit_ptr, mpart_ptr, spart_ptr, r, p, valid, MAXP, PB, H: tl.constexpr,
                  BLOCK_PB: tl.constexpr, BLOCK_H: tl.constexpr):
    """softmax_h at pages p for every head h, [BLOCK_P, BLOCK_H] (0 outside valid pages and heads):
    merge row r's per-block partials (max, sum) into each head's normalizer, then normalize the
    block's logits."""
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    pb = tl.arange(0, BLOCK_PB)
    part = (r * PB + pb)[:, None] * H + h[None, :]  # [BLOCK_PB, BLOCK_H]
    pm = (pb < PB)[:, None] & h_ok[None, :]
    m = tl.load(mpart_ptr + part, mask=pm, other=float("-inf"))
    s = tl.load(spart_ptr + part, mask=pm, other=0.0)
    big = tl.max(m, axis=0)  # [BLOCK_H] each head's max over the row
    big_sub = tl.where(big == float("-inf"), 0.0, big)
    m_sub = tl.where(m == float("-inf"), big_sub[None, :], m)
    norm = tl.sum(s * tl.exp2(m_sub - big_sub[None, :]), axis=0)  # [BLOCK_H]
    inv = tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), 0.0)
    lg = tl.load(logit_ptr + (r * H + h)[None, :] * MAXP + p[:, None],
                 mask=valid[:, None] & h_ok[None, :], other=float("-inf"))  # [BLOCK_P, BLOCK_H]
    return tl.exp2(lg - big_sub[None, :]) * inv[None, :]


@triton.jit
def page_scores_kernel(
    logit_ptr, mpart_ptr, spart_ptr, logit2_ptr, mpart2_ptr, spart2_ptr,
    lo_ptr, hi_ptr, score_ptr,      # int32 [R] x2, fp32 [R, MAXP] out
    MAXP, PB,
    H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PB: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    lo = tl.load(lo_ptr + r)
    hi = tl.load(hi_ptr + r)
    p = b * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = (p >= lo) & (p < hi)
    score = _softmax_block(logit_ptr, mpart_ptr, spart_ptr, r, p, valid, MAXP, PB, H, BLOCK_PB, BLOCK_H)
    if HAS_MEAN:
        score += _softmax_block(logit2_ptr, mpart2_ptr, spart2_ptr, r, p, valid, MAXP, PB, H, BLOCK_PB, BLOCK_H)
    tl.store(score_ptr + r * MAXP + p, tl.where(valid, score, float("-inf")), mask=p < MAXP)


@triton.jit
def select_pages_kernel(
    score_ptr,                      # fp32 [R, MAXP] page scores (>= 0 inside [lo, hi))
    lo_ptr, hi_ptr,                 # int32 [R]
    out_ptr,                        # int32 [R, K] out: the chosen pages in page order, -1 padded
    MAXP, stride_o,
    K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EARLY_EXIT: tl.constexpr,
    kind_ptr=None, slot_ptr=None, t_ptr=None, block_table_ptr=None, table_ptr=None, kv_lens_ptr=None,
    stride_bt=0, stride_tb=0, S: tl.constexpr = 1,
    LAYOUT: tl.constexpr = False,  # also lay resident rows out in the attention table (scatter_resident_row)
    PDL: tl.constexpr = False,
):
    """Top-K pages of each row by score, written in page order (no sort).

    Scores of valid pages are non-negative, so their fp32 bit patterns order like the values. A
    search finds the K-th largest pattern T = max{t : #(patterns >= t) >= K}: each round cuts the
    candidate range [t_lo, t_hi] in three and counts the patterns at or above both cuts in one
    reduction (two counts packed 16 bits apart in an int32; 32 bits apart in an int64 when a row
    has 2^15 pages or more), so 20 rounds (3^20 > 2^31) replace a binary search's 31; with EARLY_EXIT
    the search stops once exactly K patterns are at or above t_lo (9.6 -> 7.5 µs per call at 1,028
    pages on an H200, bench/results/selection_kernels_gpu_h200_v3.json). The pages
    above T and the first (lowest) pages equal to T make the K; ties go to the lower page, as a
    stable sort would. (On an H200 the three-way search was the fastest at 1,028 pages, 9.3 vs
    10.2 µs per call for two-way and 10.5 for four-way counts packed in an int64; at 4,096 the three
    were within 4 µs: bench/results/selection_kernels_gpu_h200_v2.json.)"""
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    r = tl.program_id(0).to(tl.int64)
    lo = tl.load(lo_ptr + r)
    hi = tl.load(hi_ptr + r)
    p = tl.arange(0, BLOCK)
    valid = (p >= lo) & (p < hi) & (p < MAXP)
    score = tl.load(score_ptr + r * MAXP + p, mask=valid, other=0.0)
    bits = tl.where(valid, score.to(tl.int32, bitcast=True), -1).to(tl.int64)  # -1 outside the range
    kk = tl.minimum(tl.sum(valid.to(tl.int32), axis=0), K)
    t_lo = tl.zeros([], dtype=tl.int64)
    t_hi = tl.full([], 2147483647, tl.int64)  # bits of valid scores are in [0, 2^31 - 1)
    n_lo = tl.sum(valid.to(tl.int32), axis=0).to(tl.int64)  # patterns >= t_lo
    if EARLY_EXIT:
        # stop once exactly kk patterns are >= t_lo (they are the top kk, ties and all) or the range is
        # one pattern: with distinct scores this takes about half the rounds
        rounds = tl.zeros([], dtype=tl.int32)
        while (rounds < 20) & (t_lo < t_hi) & (n_lo != kk):
            t_lo, t_hi, n_lo = _trisect(bits, kk, t_lo, t_hi, n_lo, BLOCK)
            rounds += 1
    else:
        for _ in range(20):
            t_lo, t_hi, n_lo = _trisect(bits, kk, t_lo, t_hi, n_lo, BLOCK)
    above = bits > t_lo
    tie = (bits == t_lo) & valid
    need = kk - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + r * stride_o + pos, p, mask=take)
    k = tl.arange(0, BLOCK_K)
    tl.store(out_ptr + r * stride_o + k, tl.full([BLOCK_K], -1, tl.int32), mask=(k >= kk) & (k < K))
    if LAYOUT:
        scatter_resident_row(p, take, pos, r, kind_ptr, slot_ptr, t_ptr, lo, hi, block_table_ptr, table_ptr,
                             kv_lens_ptr, stride_bt, stride_tb, S, K)


@triton.jit
def _trisect(bits, kk, t_lo, t_hi, n_lo, BLOCK: tl.constexpr):
    """One round of select_pages' search: cut [t_lo, t_hi] in three, keep the third holding the
    kk-th largest pattern. n_lo: the patterns >= t_lo."""
    step = (t_hi - t_lo + 3) // 3  # a third of the range, rounded up (>= 1)
    c1 = t_lo + step
    c2 = c1 + step
    if BLOCK > 16384:  # rows of 2^15 pages and more: the counts 32 bits apart in an int64
        packed = tl.sum((bits >= c1).to(tl.int64) + ((bits >= c2).to(tl.int64) << 32), axis=0)
        n1 = packed & 0xFFFFFFFF
        n2 = packed >> 32
    else:
        packed = tl.sum((bits >= c1).to(tl.int32) + ((bits >= c2).to(tl.int32) << 16), axis=0)
        n1 = (packed & 0xFFFF).to(tl.int64)
        n2 = (packed >> 16).to(tl.int64)
    t_hi = tl.where(n2 >= kk, t_hi, tl.where(n1 >= kk, tl.minimum(c2 - 1, t_hi), c1 - 1))
    n_lo = tl.where(n2 >= kk, n2, tl.where(n1 >= kk, n1, n_lo))
    t_lo = tl.where(n2 >= kk, c2, tl.where(n1 >= kk, c1, t_lo))
    return t_lo, t_hi, n_lo
