"""Triton kernel of DSA's decode indexer scores over paged keys. Launcher and torch reference:
`hisa.attention.dsa_indexer` (`indexer_scores`, `indexer_scores_ref`).

dsa_indexer_scores_kernel, grid (cdiv(N, BLOCK_T * TILES), B) with N = W * S: program (b, r) scores
tokens [b * BLOCK_T * TILES, (b + 1) * BLOCK_T * TILES) of row r, TILES tiles of BLOCK_T tokens.
It loads the row's query once, transposed, as a [BLOCK_D, BLOCK_H] tile and its per-head weights
(times `scale`: relu(scale * x) = scale * relu(x) for scale > 0). Per tile it gathers the tokens'
keys through the page table (page = table[t // S], offset t % S) into a [BLOCK_T, BLOCK_D] tile,
and one tl.dot (fp32 accumulation) gives every head's product [BLOCK_T, BLOCK_H]: tokens are the
dot's rows, so the weighted sum over heads after the ReLU reduces along a row (within a warp). It
stores fp32 scores; -inf for tokens past the row's length or on a -1 page (those keys are never
dereferenced). Heads and channels are padded with zeros to BLOCK_H, BLOCK_D >= 16 (tl.dot's
smallest dims), so any IH and ID take this one path. No [B, IH, N] tensor exists anywhere.

A program wholly past its row's length stores -inf and reads nothing (a padding row, length 0,
costs only its stores); inside the last live program the tiles past the length are masked loads.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dsa_indexer_scores_kernel(
    q_ptr,                          # [B, IH, ID] indexer queries, in the dot's dtype
    w_ptr,                          # [B, IH] per-head weights (fp32)
    cache_ptr,                      # [P, S, ID] one layer's indexer keys (any strides)
    table_ptr, len_ptr,             # int32 [B, W] pages (-1 past a row's pages), int32 [B] lengths
    out_ptr,                        # fp32 [B, N] scores out, N = W * S
    scale, N,
    stride_qb, stride_qh, stride_qd, stride_wb, stride_wh,
    stride_cp, stride_cs, stride_cd, stride_tb, stride_tw, stride_l, stride_ob,
    IH: tl.constexpr, ID: tl.constexpr, S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    length = tl.minimum(tl.load(len_ptr + r * stride_l), N)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < IH
    d_ok = d < ID
    qt = tl.load(q_ptr + r * stride_qb + h[None, :] * stride_qh + d[:, None] * stride_qd,
                 mask=d_ok[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_H]
    w = tl.load(w_ptr + r * stride_wb + h * stride_wh, mask=h_ok, other=0.0).to(tl.float32) * scale  # [BLOCK_H]
    first = blk * (BLOCK_T * TILES)
    ts = tl.arange(0, BLOCK_T)
    out_row = out_ptr + r * stride_ob
    table_row = table_ptr + r * stride_tb
    if first < length:
        # a constant trip count (the compiler pipelines the loads); tokens past the length are masked
        for i in range(TILES):
            t = first + i * BLOCK_T + ts  # [BLOCK_T] token positions
            page = tl.load(table_row + (t // S) * stride_tw, mask=t < length, other=-1)
            ok = (t < length) & (page >= 0)
            k = tl.load(cache_ptr + page.to(tl.int64)[:, None] * stride_cp + (t % S)[:, None] * stride_cs
                        + d[None, :] * stride_cd, mask=ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            s = tl.dot(k.to(qt.dtype), qt, input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_H] fp32
            score = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)  # [BLOCK_T]
            tl.store(out_row + t, tl.where(ok, score, float("-inf")), mask=t < N)
    else:  # wholly past the row's length: nothing to read
        for i in range(TILES):
            t = first + i * BLOCK_T + ts
            tl.store(out_row + t, tl.full([BLOCK_T], float("-inf"), tl.float32), mask=t < N)
