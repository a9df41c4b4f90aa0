"""Triton kernels of the `lowbit` algorithm: the per-step key update and the two scoring kernels.
Launchers and torch references: `hisa.sparse.lowbit_keys` (layout, update) and
`hisa.sparse.lowbit_scores` (scores).

lowbit_update_kernel, grid (R,): quantizes row r's new key (token t - 1 of its sparse slot), every
(KV head, channel group) at once, into its codes and (step, min).

lowbit_logits_kernel, grid (R, PB, KVH): program (r, b, j) walks the pages of block b of row r in
sub-tiles of SUB_P pages. Each sub-tile's codes of KV head j are read once ([SUB_P, S, DB] bytes
plus their groups' step/min) and serve the G query heads of the group: per head and code position
i, one shift + mask + fma dequantizes GB channels, multiplied with the matching query channels in
fp32 (G is 1-8 here: too small for tl.dot). Per head it stores each page's max logit (log2 domain)
to [R, H, MAXP] and keeps an online softmax partial (max, sum of 2^(l - max)) over the block's
tokens, written to [R, PB, H] at the end.

lowbit_scores_kernel, grid (R, page blocks): merges row r's partials into each head's max M_h and
normalizer Z_h, and writes score(page) = Σ_kvh pool_{h in kvh} 2^(pagemax_h - M_h) / Z_h
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
    q_ptr,                          # [R, H, D]
    codes_ptr, scales_ptr,          # uint8 [SS, MAXT, KVH, DB], fp16 [SS, MAXT, KVH, NG, 2] (one layer)
    sslot_ptr, lo_ptr, hi_ptr,      # int32 [R]: sparse slot, middle pages [lo, hi) (empty: not selected)
    logit_ptr, mpart_ptr, spart_ptr,  # fp32 [R, H, MAXP], [R, PB, H], [R, PB, H]
    scale_log2, MAXP, PB,
    stride_qr, stride_qh, stride_cs, stride_ct, stride_ss, stride_st,
    H: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, S: tl.constexpr, SUB_P: tl.constexpr,
    NSUB: tl.constexpr, DB: tl.constexpr, BLOCK_DB: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
    BITS: tl.constexpr,
):
    NP: tl.constexpr = 8 // BITS
    GB: tl.constexpr = GROUP // NP
    MASK: tl.constexpr = (1 << BITS) - 1
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    j = tl.program_id(2)  # the kv head
    sslot = tl.load(sslot_ptr + r).to(tl.int64)
    lo = tl.load(lo_ptr + r)
    hi = tl.load(hi_ptr + r)
    gi = tl.arange(0, BLOCK_G)
    m_run = tl.full([BLOCK_G], float("-inf"), tl.float32)  # per query head of the group: running max
    s_run = tl.zeros([BLOCK_G], tl.float32)  # and running sum of 2^(l - max)
    col = tl.arange(0, BLOCK_DB)  # byte of the packed key
    col_ok = col < DB
    grp = col // GB  # its channel group
    sub = col % GB
    ps = tl.arange(0, SUB_P)
    ts = tl.arange(0, S)
    first = b * (SUB_P * NSUB)
    # only the sub-tiles that overlap the middle range (none for rows that do not select)
    st_lo = tl.maximum(lo - first, 0) // SUB_P
    st_hi = tl.minimum(tl.maximum(hi - first, 0) + SUB_P - 1, SUB_P * NSUB) // SUB_P
    st = st_lo
    while st < st_hi:  # (a while loop: the interpreter cannot range() over loaded bounds)
        p = first + st * SUB_P + ps  # [SUB_P] logical pages
        valid = (p >= lo) & (p < hi)
        tok = (p[:, None] * S + ts[None, :]).to(tl.int64)  # [SUB_P, S]
        tile = valid[:, None, None] & col_ok[None, None, :]
        c = tl.load(codes_ptr + sslot * stride_cs + tok[:, :, None] * stride_ct + j * DB + col[None, None, :],
                    mask=tile, other=0).to(tl.int32)  # [SUB_P, S, BLOCK_DB]
        sb = scales_ptr + sslot * stride_ss + tok[:, :, None] * stride_st + (j * NG + grp[None, None, :]) * 2
        step = tl.load(sb, mask=tile, other=0.0).to(tl.float32)
        mn = tl.load(sb + 1, mask=tile, other=0.0).to(tl.float32)
        for g in tl.static_range(G):
            h = j * G + g
            acc = tl.zeros([SUB_P, S], tl.float32)
            for i in tl.static_range(NP):
                qh = tl.load(q_ptr + r * stride_qr + h * stride_qh + grp * GROUP + i * GB + sub, mask=col_ok,
                             other=0.0).to(tl.float32)  # [BLOCK_DB] the channels of code position i
                kv = ((c >> (i * BITS)) & MASK).to(tl.float32) * step + mn
                acc += tl.sum(kv * qh[None, None, :], axis=2)
            lg = tl.where(valid[:, None], acc * scale_log2, float("-inf"))  # [SUB_P, S]
            pm = tl.max(lg, axis=1)  # [SUB_P] each page's best token
            tl.store(logit_ptr + (r * H + h) * MAXP + p, pm, mask=valid)
            # online softmax partial of head g over the block's tokens
            onehot = gi == g
            m_old = tl.max(tl.where(onehot, m_run, float("-inf")), axis=0)
            s_old = tl.sum(tl.where(onehot, s_run, 0.0), axis=0)
            m_new = tl.maximum(m_old, tl.max(pm, axis=0))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_new = s_old * tl.exp2(m_old - m_sub) + tl.sum(tl.sum(tl.exp2(lg - m_sub), axis=1), axis=0)
            m_run = tl.where(onehot, m_new, m_run)
            s_run = tl.where(onehot, s_new, s_run)
        st += 1
    h = j * G + gi
    tl.store(mpart_ptr + (r * PB + b) * H + h, m_run, mask=gi < G)
    tl.store(spart_ptr + (r * PB + b) * H + h, s_run, mask=gi < G)


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
