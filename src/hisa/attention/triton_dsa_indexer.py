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

FP8 keys (uint8 [P, S, W]: e4m3 values, then the key's fp32 scale at byte SCALE_AT, each part padded
to 16 bytes so every key loads 16 bytes at a time; `hisa.kvcache.mla_fp8.index_key_width`) come with
FP8 queries (e4m3 bytes, each head's scale already folded into its weight by the launcher). The
values go into the dot unscaled: FP8 x FP8 on the tensor cores with fp32 sums where HW_CVT (compiled
kernels), else the exact values as fp16 (`hisa.ops.triton_fp8.e4m3_values`; the interpreter, whose
fp8 conversion differs from the GPU's). Each token's score is multiplied by its key's scale
afterwards: relu(q . (e * s)) = s * relu(q . e) for s > 0, one multiply per token instead of one per
key value. At 64 heads the kernel is bound by its products (~250 TFLOP/s in bf16 on an H200, the
keys read at ~2-3.7 TB/s), which FP8 products halve.

A program wholly past its row's length stores -inf and reads nothing (a padding row, length 0,
costs only its stores); inside the last live program the tiles past the length are masked loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_fp8 import e4m3_values


@triton.jit
def dsa_indexer_scores_kernel(
    q_ptr,                          # [B, IH, ID] indexer queries, in the dot's dtype (FP8: e4m3 bytes)
    w_ptr,                          # [B, IH] per-head weights (fp32)
    cache_ptr,                      # [P, S, ID] one layer's indexer keys (any strides)
    table_ptr, len_ptr,             # int32 [B, W] pages (-1 past a row's pages), int32 [B] lengths
    out_ptr,                        # fp32 [B, N] scores out, N = W * S
    scale, N,
    stride_qb, stride_qh, stride_qd, stride_wb, stride_wh,
    stride_cp, stride_cs, stride_cd, stride_tb, stride_tw, stride_l, stride_ob,
    IH: tl.constexpr, ID: tl.constexpr, S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr = False, HW_CVT: tl.constexpr = False, SCALE_AT: tl.constexpr = 0,
):
    blk = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    length = tl.minimum(tl.load(len_ptr + r * stride_l), N)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < IH
    d_ok = d < ID
    qt = tl.load(q_ptr + r * stride_qb + h[None, :] * stride_qh + d[:, None] * stride_qd,
                 mask=d_ok[:, None] & h_ok[None, :], other=0)  # [BLOCK_D, BLOCK_H] values, or FP8 bytes
    if FP8:
        if HW_CVT:
            qt = qt.to(tl.float8e4nv, bitcast=True)
        else:
            qt = e4m3_values(qt, False).to(tl.float16)  # (exact)
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
            row = cache_ptr + page.to(tl.int64) * stride_cp + (t % S) * stride_cs  # [BLOCK_T] key starts
            k = tl.load(row[:, None] + d[None, :] * stride_cd, mask=ok[:, None] & d_ok[None, :],
                        other=0)  # [BLOCK_T, BLOCK_D] values, or FP8 bytes
            if FP8:
                if HW_CVT:  # FP8 x FP8 on the tensor cores, fp32 sums
                    s = tl.dot(k.to(tl.float8e4nv, bitcast=True), qt, out_dtype=tl.float32)
                else:
                    s = tl.dot(e4m3_values(k, False).to(tl.float16), qt, out_dtype=tl.float32)
            else:
                s = tl.dot(k.to(qt.dtype), qt, input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_H] fp32
            score = tl.sum(tl.maximum(s, 0.0) * w[None, :], axis=1)  # [BLOCK_T]
            if FP8:  # each key's scale, after the ReLU (scales are > 0)
                score *= tl.load((row + SCALE_AT).to(tl.pointer_type(tl.float32)), mask=ok, other=0.0)
            tl.store(out_row + t, tl.where(ok, score, float("-inf")), mask=t < N)
    else:  # wholly past the row's length: nothing to read
        for i in range(TILES):
            t = first + i * BLOCK_T + ts
            tl.store(out_row + t, tl.full([BLOCK_T], float("-inf"), tl.float32), mask=t < N)
