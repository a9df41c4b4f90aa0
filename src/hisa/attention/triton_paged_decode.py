"""Triton kernels of paged decode attention (split-KV / flash-decoding). Launcher: `hisa.attention.paged_decode`.

Algorithm (same result as `reference.paged_decode_attention_ref`):
  * split kernel, grid (B, KVH, num_splits): one program holds all G = H // KVH query heads of one
    kv head as a [BLOCK_G, BLOCK_D] tile (BLOCK_G >= 16 so both products run on tl.dot), so every
    K/V row is loaded once per group. The request's tokens are cut into blocks of BLOCK_N; split s
    takes a contiguous run of ceil(n_blocks / num_splits) blocks, computed per request from its
    kv_len, so short and long requests of one batch both spread over all splits.
  * sliding window (WINDOW < kv_len): the blocks start at kv_len - WINDOW instead of 0, so keys
    older than the window are never visited (masked by construction) and cost nothing; the launcher
    passes WINDOW = MAX_TOKENS when there is no window.
  * each token of a block is gathered through the page table (page = table[t // S], offset t % S),
    so any page size works and pages may be anywhere in the cache; K/V addresses use the caches'
    real strides (k and v are usually views of one [P, 2, S, KVH, D] tensor).
  * online softmax in fp32 in the log2 domain (scale * log2(e) folded into the scores, exp2).
  * DIRECT_OUT (num_splits == 1): the split kernel normalizes and writes the output itself.
    Otherwise it writes (m, l, acc) per query head and split to fp32 workspaces and the combine
    kernel, grid (B, H), merges them: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
  * empty splits and empty requests hold m = -inf, l = 0, acc = 0; every exp2 subtracts a finite
    max (0 when everything is -inf) so nothing turns into NaN, and l == 0 gives a zero output.
  * loops: range() with runtime bounds (software-pipelined by num_stages) when compiled; a while
    loop under TRITON_INTERPRET=1 (INTERPRETER), see the comment at the loop.
  * masked loads read 0 for tokens past kv_len: the cache is allocated uninitialized and a NaN
    there would survive a zero probability (0 * NaN = NaN).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter


@triton.jit
def _attend_block(
    start, tok_hi, q, m_i, l_i, acc,
    k_ptr, v_ptr, pt_row_ptr, kvh, d, d_ok, scale_log2,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    S: tl.constexpr, BLOCK_N: tl.constexpr, KV_EVICT: tl.constexpr = "",
):
    """Fold tokens [start, min(start + BLOCK_N, tok_hi)) into the running (m_i, l_i, acc)."""
    tok = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] virtual token positions
    tok_ok = tok < tok_hi
    page = tl.load(pt_row_ptr + tok // S, mask=tok_ok, other=-1).to(tl.int64)  # [BLOCK_N]
    tok_ok = tok_ok & (page >= 0)  # a -1 page is never dereferenced, even given a bad kv_len
    offs = tok % S
    kv_mask = tok_ok[:, None] & d_ok[None, :]  # [BLOCK_N, BLOCK_D]
    k = tl.load(k_ptr + page[:, None] * stride_kp + offs[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                mask=kv_mask, other=0.0, eviction_policy=KV_EVICT)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_ptr + page[:, None] * stride_vp + offs[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                mask=kv_mask, other=0.0, eviction_policy=KV_EVICT)  # [BLOCK_N, BLOCK_D]

    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [BLOCK_G, BLOCK_N]
    qk = tl.where(tok_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # [BLOCK_G]
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite: no (-inf) - (-inf)
    alpha = tl.exp2(m_i - m_sub)  # [BLOCK_G]
    p = tl.exp2(qk - m_sub[:, None])  # [BLOCK_G, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [BLOCK_G, BLOCK_D]
    return m_new, l_i, acc


@triton.jit
def paged_decode_split_kernel(
    q_ptr,                                  # [B, H, D]
    k_ptr, v_ptr,                           # [P, S, KVH, D] each, strided
    pt_ptr,                                 # int32 [B, max_pages]
    lens_ptr,                               # int32 [B]
    out_ptr,                                # [B, H, D] (written when DIRECT_OUT)
    m_ws_ptr, l_ws_ptr,                     # fp32 [B, H, NUM_SPLITS] (written unless DIRECT_OUT)
    acc_ws_ptr,                             # fp32 [B, H, NUM_SPLITS, D] (written unless DIRECT_OUT)
    scale_log2,                             # softmax scale * log2(e)
    H, MAX_TOKENS, NUM_SPLITS,
    WINDOW,                                 # attend to virtual tokens [kv_len - WINDOW, kv_len)
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ptb, stride_lens,
    stride_ob, stride_oh,
    D: tl.constexpr, S: tl.constexpr, G: tl.constexpr,  # head dim, page size, query heads per kv head
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr, INTERPRETER: tl.constexpr,
    PDL: tl.constexpr = False, KV_EVICT: tl.constexpr = "",
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    heads = kvh * G + g  # [BLOCK_G] query heads of this kv head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    q = q.to(k_ptr.dtype.element_ty)

    # clamped so a kv_len past the page table cannot read outside it
    kv_len = tl.maximum(tl.minimum(tl.load(lens_ptr + b * stride_lens), MAX_TOKENS), 0)
    win_lo = tl.maximum(kv_len - WINDOW, 0)  # first attended token (0 without a window)
    blocks_per_split = tl.cdiv(tl.cdiv(kv_len - win_lo, BLOCK_N), NUM_SPLITS)
    tok_lo = win_lo + split * blocks_per_split * BLOCK_N
    tok_hi = tl.minimum(tok_lo + blocks_per_split * BLOCK_N, kv_len)
    pt_row_ptr = pt_ptr + b * stride_ptb

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of 2^(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of p * v
    if INTERPRETER:
        # triton 3.6's interpreter cannot run range() with tensor bounds under numpy >= 2.4
        # (triton-lang/triton#9171, fixed upstream after 3.6); compiled code keeps the pipelined for loop.
        start = tok_lo
        while start < tok_hi:
            m_i, l_i, acc = _attend_block(start, tok_hi, q, m_i, l_i, acc, k_ptr, v_ptr, pt_row_ptr, kvh, d, d_ok,
                                          scale_log2, stride_kp, stride_ks, stride_kh,
                                          stride_vp, stride_vs, stride_vh, S, BLOCK_N, KV_EVICT)
            start += BLOCK_N
    else:
        for start in range(tok_lo, tok_hi, BLOCK_N):
            m_i, l_i, acc = _attend_block(start, tok_hi, q, m_i, l_i, acc, k_ptr, v_ptr, pt_row_ptr, kvh, d, d_ok,
                                          scale_log2, stride_kp, stride_ks, stride_kh,
                                          stride_vp, stride_vs, stride_vh, S, BLOCK_N, KV_EVICT)

    if DIRECT_OUT:
        # l_i == 0 only when no token was seen, and then acc == 0: the output is zeros
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # [BLOCK_G, BLOCK_D]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        row = (b * H + heads) * NUM_SPLITS + split  # [BLOCK_G] row of the [B, H, NUM_SPLITS] workspace
        tl.store(m_ws_ptr + row, m_i, mask=g_ok)
        tl.store(l_ws_ptr + row, l_i, mask=g_ok)
        tl.store(acc_ws_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def paged_decode_combine_kernel(
    m_ws_ptr, l_ws_ptr,                     # fp32 [B, H, NUM_SPLITS]
    acc_ws_ptr,                             # fp32 [B, H, NUM_SPLITS, D]
    out_ptr,                                # [B, H, D]
    H, D, NUM_SPLITS,
    stride_ob, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = (b * H + h) * NUM_SPLITS + tl.arange(0, BLOCK_S)  # [BLOCK_S] workspace rows of (b, h)
    s_ok = tl.arange(0, BLOCK_S) < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    m = tl.load(m_ws_ptr + row, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    l = tl.load(l_ws_ptr + row, mask=s_ok, other=0.0)  # [BLOCK_S]
    a = tl.load(acc_ws_ptr + row[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # all splits empty: weights 2^-inf = 0
    w = tl.exp2(m - m_all)  # [BLOCK_S] rescales every split to the common max
    l_tot = tl.sum(w * l, axis=0)
    acc = tl.sum(w[:, None] * a, axis=0)  # [BLOCK_D]
    o = acc / tl.where(l_tot > 0.0, l_tot, 1.0)  # [BLOCK_D]; no token at all: acc == 0, zeros
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
