"""Triton kernels of `hisa.ops.argmax`.

argmax_chunks_kernel, grid (B, C): program (b, c) reads columns [c * CHUNK, (c + 1) * CHUNK) of row
b in fp32 and writes their largest value (NaN mapped to +inf, flagged by a 1 in the top key) and
the first column holding it. argmax_merge_kernel, grid (B,): the first chunk holding the row's best
key gives the row's index (chunks are in column order, so ties keep the first column).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def argmax_chunks_kernel(x_ptr, val_ptr, idx_ptr, V, C, stride_x, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    ok = cols < V
    x = tl.load(x_ptr + b * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
    nan = x != x
    # a NaN beats every number (torch's CUDA argmax): key 2 for a NaN, 1 for a number, 0 for padding
    key = tl.where(nan, 2.0, tl.where(ok, 1.0, 0.0))
    best_key = tl.max(key, axis=0)
    x = tl.where(nan, float("inf"), x)
    best = tl.max(tl.where(key == best_key, x, float("-inf")), axis=0)
    hit = (key == best_key) & (x == best)
    first = tl.min(tl.where(hit, cols, 2147483647), axis=0)
    # one fp32 carries both: the NaN flag as +inf is not enough (a real +inf ties it), so the merge
    # reads the key from the index's sign bit: NaN chunks store -(first + 1)
    tl.store(val_ptr + b * C + c, best)
    tl.store(idx_ptr + b * C + c, tl.where(best_key == 2.0, -first - 1, first))


@triton.jit
def argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    v = tl.load(val_ptr + b * C + c, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + b * C + c, mask=ok, other=0)
    is_nan = ok & (i < 0)
    key = tl.where(is_nan, 2, tl.where(ok, 1, 0))
    best_key = tl.max(key, axis=0)
    best = tl.max(tl.where(key == best_key, v, float("-inf")), axis=0)
    hit = (key == best_key) & (v == best)
    first_c = tl.min(tl.where(hit, c, BLOCK_C), axis=0)
    j = tl.sum(tl.where(c == first_c, i, 0), axis=0)
    tl.store(out_ptr + b, tl.where(j < 0, -j - 1, j).to(tl.int64))
