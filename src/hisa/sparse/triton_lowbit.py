"""Triton kernels of the `lowbit` algorithm: the per-step key update and the two scoring kernels.
Launchers and torch references: `hisa.sparse.lowbit_keys` (layout, update) and
`hisa.sparse.lowbit_scores` (scores).

lowbit_update_kernel, grid (R,): quantizes row r's new key (token t - 1 of its sparse slot), every
(KV head, channel group) at once, into its codes and (step, min).

lowbit_logits_kernel, grid (R, PB, KVH): program (r, b, j) walks the pages of block b of row r in
sub-tiles of SUB_P pages (TOKENS = SUB_P * S tokens, the launcher's `sub_tokens`). Each sub-tile's
codes of KV head j ([TOKENS, NG, GB] bytes plus their groups' step/min) are dequantized once into a
[TOKENS, D] tile in channel order, in q's dtype: byte (grp, sub) holds channel grp * GROUP + i * GB
+ sub at code position i, so shifting it into a [TOKENS, NG, NP, GB] tensor and reading that
row-major gives the natural channel order. One tl.dot ([BLOCK_G, D] x [D, TOKENS], fp32
accumulation) then gives the logits of all G query heads of the group; tl.dot needs every dim >= 16,
so the G heads are padded with zero rows to BLOCK_G >= 16 and D with masked whole groups to >= 16
channels (a padded D of 96 is 128), so every shape check_layout allows takes this one path.
fp16/bf16 q: the keys are rounded to that dtype (bf16: 8 mantissa bits, far below the step / 2 of
the codes); fp32 q: an fp32 ("ieee") dot. Per head it stores each page's value (log2 domain: its
max logit or, with PAGE_MASS, the log-sum-exp of its logits) to [R, H, MAXP] and keeps an online
softmax partial (max, sum of 2^(l - max)) over the block's tokens, written to [R, PB, H] at the
end. The sub-tile loop has a constant trip count (NSUB) so the compiler can pipeline its loads;
tokens outside [lo, hi) are masked, and a program whose block misses the range skips the loop (no
data-dependent host control: the grid depends on shapes only).
On an H200 (Llama-8B shape, 32K tokens x 8 rows, bf16 q) it measured ~0.3 ms per layer (one ad-hoc
graph-timed run; the per-head fp32 multiply-and-sum it replaced was reported at ~50 ms per 32-layer
step, not re-measured); bench/selection_kernels_gpu.py --only lowbit times it.

lowbit_scores_kernel, grid (R, page blocks): merges row r's partials into each head's max M_h and
normalizer Z_h, and writes score(page) = Σ_kvh pool_{h in kvh} 2^(v_h(page) - M_h) / Z_h
(pool: mean or max over the group's query heads), -inf outside [lo, hi).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.sparse.triton_page_scores import head_softmax


@triton.jit
def lowbit_update_kernel(
    k_ptr,                          # [R, KVH * D] new keys (row stride below)
    codes_ptr, scales_ptr,          # uint8 [SS, MAXT, KVH * DB], fp16 [SS, MAXT, KVH * NG * 2] (one layer)
    sslot_ptr, t_ptr,               # int32 [R]
    stride_k, stride_cs, stride_ct, stride_ss, stride_st, SENTINEL,
    NGROUPS: tl.constexpr, BLOCK_G: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
):
    NP: tl.constexpr = 8 // BITS
    GB: tl.constexpr = GROUP // NP
    LEVELS: tl.constexpr = (1 << BITS) - 1
    r = tl.program_id(0)
    sslot = tl.load(sslot_ptr + r)
    t = tl.load(t_ptr + r)
    if (sslot != SENTINEL) & (t > 0):
        tok = (t - 1).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        i = tl.arange(0, NP)
        jj = tl.arange(0, GB)
        off = g[:, None, None] * GROUP + i[None, :, None] * GB + jj[None, None, :]  # [BLOCK_G, NP, GB]
        ok = off < NGROUPS * GROUP
        k = tl.load(k_ptr + r * stride_k + off, mask=ok, other=0.0).to(tl.float32)
        lo = tl.min(tl.min(tl.where(ok, k, float("inf")), axis=2), axis=1)  # [BLOCK_G]
        hi = tl.max(tl.max(tl.where(ok, k, float("-inf")), axis=2), axis=1)
        g_ok = g < NGROUPS
        lo = tl.where(g_ok, lo, 0.0)
        hi = tl.where(g_ok, hi, 0.0)
        step16 = ((hi - lo) / LEVELS).to(tl.float16)
        min16 = lo.to(tl.float16)
        step = step16.to(tl.float32)
        mn = min16.to(tl.float32)
        inv = tl.where(step > 0.0, 1.0 / tl.where(step > 0.0, step, 1.0), 0.0)
        c = tl.floor((k - mn[:, None, None]) * inv[:, None, None] + 0.5)
        c = tl.minimum(tl.maximum(c, 0.0), LEVELS).to(tl.int32)
        packed = tl.sum(c << (i * BITS)[None, :, None], axis=1)  # [BLOCK_G, GB], the bits are disjoint
        cbase = codes_ptr + sslot.to(tl.int64) * stride_cs + tok * stride_ct
        tl.store(cbase + g[:, None] * GB + jj[None, :], packed.to(tl.uint8),
                 mask=g_ok[:, None] & (jj[None, :] < GB))
        sbase = scales_ptr + sslot.to(tl.int64) * stride_ss + tok * stride_st
        tl.store(sbase + g * 2, step16, mask=g_ok)
        tl.store(sbase + g * 2 + 1, min16, mask=g_ok)


@triton.jit
def lowbit_logits_kernel(
    q_ptr,                          # [R, H, D] fp32 / fp16 / bf16 (the dot runs in this dtype)
    codes_ptr, scales_ptr,          # uint8 [SS, MAXT, KVH, DB], fp16 [SS, MAXT, KVH, NG, 2] (one layer)
    sslot_ptr, lo_ptr, hi_ptr,      # int32 [R]: sparse slot, middle pages [lo, hi) (empty: not selected)
    logit_ptr, mpart_ptr, spart_ptr,  # fp32 [R, H, MAXP], [R, PB, H], [R, PB, H]
    scale_log2, MAXP, PB,
    stride_qr, stride_qh, stride_cs, stride_ct, stride_ss, stride_st,
    H: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, S: tl.constexpr, SUB_P: tl.constexpr,
    NSUB: tl.constexpr, DB: tl.constexpr, NG: tl.constexpr, BLOCK_NG: tl.constexpr, GROUP: tl.constexpr,
    BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, PAGE_MASS: tl.constexpr = False,
):
    NP: tl.constexpr = 8 // BITS
    GB: tl.constexpr = GROUP // NP
    MASK: tl.constexpr = (1 << BITS) - 1
    TOKENS: tl.constexpr = SUB_P * S
    BLOCK_K: tl.constexpr = BLOCK_NG * GROUP  # channels of the dot, D padded with whole masked groups
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    j = tl.program_id(2)  # the kv head
    sslot = tl.load(sslot_ptr + r).to(tl.int64)
    lo = tl.load(lo_ptr + r)
    hi = tl.load(hi_ptr + r)
    # the group's query heads, padded with zero rows to BLOCK_G >= 16 (tl.dot's smallest M)
    gi = tl.arange(0, BLOCK_G)
    g_ok = gi < G
    ch = tl.arange(0, BLOCK_K)  # channel, natural order
    q = tl.load(q_ptr + r * stride_qr + (j * G + gi)[:, None] * stride_qh + ch[None, :],
                mask=g_ok[:, None] & (ch < NG * GROUP)[None, :], other=0.0)  # [BLOCK_G, BLOCK_K]
    m_run = tl.full([BLOCK_G], float("-inf"), tl.float32)  # per query head: running max
    s_run = tl.zeros([BLOCK_G], tl.float32)  # and running sum of 2^(l - max)
    grp = tl.arange(0, BLOCK_NG)  # channel group
    grp_ok = grp < NG
    sub = tl.arange(0, GB)  # byte within the group
    shift = tl.arange(0, NP) * BITS  # code position i sits in bits [i * BITS, (i + 1) * BITS)
    ps = tl.arange(0, SUB_P)
    ts = tl.arange(0, TOKENS)
    first = b * (SUB_P * NSUB)
    st_lo = tl.maximum(lo - first, 0) // SUB_P
    st_hi = tl.minimum(tl.maximum(hi - first, 0) + SUB_P - 1, SUB_P * NSUB) // SUB_P
    # a loop of constant trip count (the compiler pipelines its loads), masked per token; a program
    # whose block misses the row's middle range (all of a row that does not select) skips it
    if st_lo < st_hi:
        for st in range(NSUB):
            p = first + st * SUB_P + ps  # [SUB_P] logical pages
            valid = (p >= lo) & (p < hi)
            tok = (first + st * SUB_P) * S + ts  # [TOKENS]
            tv = (tok >= lo * S) & (tok < hi * S)
            tok = tok.to(tl.int64)
            ok = tv[:, None] & grp_ok[None, :]  # [TOKENS, BLOCK_NG]
            cb = codes_ptr + sslot * stride_cs + tok[:, None, None] * stride_ct + j * DB
            c = tl.load(cb + grp[None, :, None] * GB + sub[None, None, :], mask=ok[:, :, None],
                        other=0).to(tl.int32)  # [TOKENS, BLOCK_NG, GB]
            sb = scales_ptr + sslot * stride_ss + tok[:, None] * stride_st + (j * NG + grp[None, :]) * 2
            step = tl.load(sb, mask=ok, other=0.0).to(tl.float32)  # [TOKENS, BLOCK_NG]
            mn = tl.load(sb + 1, mask=ok, other=0.0).to(tl.float32)
            # dequantize once: channel grp * GROUP + i * GB + sub is code position i of byte (grp, sub),
            # so [TOKENS, BLOCK_NG, NP, GB] read row-major is the keys in channel order
            code = (c[:, :, None, :] >> shift[None, None, :, None]) & MASK
            k = code.to(tl.float32) * step[:, :, None, None] + mn[:, :, None, None]
            k = tl.reshape(k.to(q.dtype), [TOKENS, BLOCK_K])
            # all G heads at once: [BLOCK_G, BLOCK_K] x [BLOCK_K, TOKENS], fp32 accumulation
            lg = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            lg = tl.where(tv[None, :], lg, float("-inf"))  # [BLOCK_G, TOKENS]
            lp = tl.reshape(lg, [BLOCK_G, SUB_P, S])
            pm = tl.max(lp, axis=2)  # [BLOCK_G, SUB_P] pages' best tokens
            if PAGE_MASS:  # the page's log-sum-exp: 2^v / Z is then the mass of its tokens (>= the max)
                pm_sub = tl.where(pm == float("-inf"), 0.0, pm)
                tot = tl.sum(tl.exp2(lp - pm_sub[:, :, None]), axis=2)  # 0: no token of the page in range
                pm = tl.where(tot > 0.0, pm_sub + tl.log2(tl.where(tot > 0.0, tot, 1.0)), float("-inf"))
            tl.store(logit_ptr + (r * H + j * G + gi)[:, None] * MAXP + p[None, :], pm,
                     mask=g_ok[:, None] & valid[None, :])
            # online softmax partial of every head over the block's tokens
            m_new = tl.maximum(m_run, tl.max(pm, axis=1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_run = s_run * tl.exp2(m_run - m_sub) + tl.sum(tl.exp2(lg - m_sub[:, None]), axis=1)
            m_run = m_new
    h = j * G + gi
    tl.store(mpart_ptr + (r * PB + b) * H + h, m_run, mask=g_ok)
    tl.store(spart_ptr + (r * PB + b) * H + h, s_run, mask=g_ok)


@triton.jit
def lowbit_scores_kernel(
    logit_ptr, mpart_ptr, spart_ptr,  # fp32 [R, H, MAXP], [R, PB, H], [R, PB, H]
    lo_ptr, hi_ptr, score_ptr,      # int32 [R] x2, fp32 [R, MAXP] out
    MAXP, PB,
    H: tl.constexpr, G: tl.constexpr, KVH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PB: tl.constexpr,
    BLOCK_H: tl.constexpr, POOL_MAX: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    lo = tl.load(lo_ptr + r)
    hi = tl.load(hi_ptr + r)
    p = b * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = (p >= lo) & (p < hi)
    # each head's softmax at its page's best token (partials merged over the row's middle tokens)
    w = head_softmax(logit_ptr, mpart_ptr, spart_ptr, r, p, valid, MAXP, PB, H, BLOCK_PB, BLOCK_H)
    if POOL_MAX:
        h = tl.arange(0, BLOCK_H)
        h_ok = h < H
        score = tl.zeros([BLOCK_P], tl.float32)
        kv_of = h // G
        for k in tl.static_range(KVH):
            score += tl.max(tl.where((kv_of == k)[None, :] & h_ok[None, :], w, 0.0), axis=1)
    else:
        score = tl.sum(w, axis=1) / G
    tl.store(score_ptr + r * MAXP + p, tl.where(valid, score, float("-inf")), mask=p < MAXP)
