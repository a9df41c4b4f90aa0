"""Triton kernel of `hisa.ops.crc32.crc32_pages` (the arithmetic is described there).

crc32_pages_kernel, grid (N,): program n runs LANES registers side by side over page n, lane i
over the page's (zero-padded in front) words [i * CHUNK, (i + 1) * CHUNK), one word per step
through the slicing-by-4 tables; then shifts lane i's register past the chunks after it (its
matrix's 32 columns, lane_cols[i]), XORs the lanes, adds the initial value's term Z^n ~value
(tail_cols) and writes ~R as the page's crc. All arithmetic on uint32 (logical shifts).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _times(x, cols):
    """The GF(2) matrix products: for each x[i] (uint32 [L]) the XOR of the columns cols[i, k]
    ([L, 32]) of its set bits k, [L]."""
    k = tl.arange(0, 32).to(tl.uint32)
    bit = ((x[:, None] >> k[None, :]) & 1) != 0
    return tl.reduce(tl.where(bit, cols, tl.zeros_like(cols)), 1, _xor)


@triton.jit
def crc32_pages_kernel(
    words_ptr,              # int32 [N, W] each page's words (little-endian bytes)
    value_ptr, out_ptr,     # int64 [N]: the crc each page continues from; out: its crc
    table_ptr,              # int32 [4 * 256]: table m maps byte b to Z^(m + 1) b
    lane_ptr,               # int32 [LANES, 32]: lane i's shift past the chunks after it
    tail_ptr,               # int32 [32]: Z^(4 W)
    W, stride_page, PAD,    # words per page, between pages; zero words in front of the page
    CHUNK: tl.constexpr, LANES: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, LANES)
    base = words_ptr + n * stride_page
    s = tl.zeros([LANES], dtype=tl.uint32)
    first = lane * CHUNK - PAD  # the lane's first word in the page (negative: padding)
    for j in range(CHUNK):
        t = first + j
        w = tl.load(base + t, mask=(t >= 0) & (t < W), other=0).to(tl.uint32, bitcast=True)
        x = s ^ w
        b0 = (x & 255).to(tl.int32)
        b1 = ((x >> 8) & 255).to(tl.int32)
        b2 = ((x >> 16) & 255).to(tl.int32)
        b3 = (x >> 24).to(tl.int32)
        s = (tl.load(table_ptr + 768 + b0) ^ tl.load(table_ptr + 512 + b1) ^ tl.load(table_ptr + 256 + b2)
             ^ tl.load(table_ptr + b3)).to(tl.uint32, bitcast=True)
    cols = tl.load(lane_ptr + lane[:, None] * 32 + tl.arange(0, 32)[None, :]).to(tl.uint32, bitcast=True)
    raw = tl.reduce(_times(s, cols), 0, _xor)
    # the initial value's term: Z^(4 W) applied to ~value
    v = (tl.load(value_ptr + n) ^ 0xFFFFFFFF).to(tl.uint32)  # (~ on uint32: the interpreter refuses it)
    k = tl.arange(0, 32)
    tail = tl.load(tail_ptr + k).to(tl.uint32, bitcast=True)
    raw = raw ^ tl.reduce(tl.where(((v >> k.to(tl.uint32)) & 1) != 0, tail, tl.zeros_like(tail)), 0, _xor)
    tl.store(out_ptr + n, raw.to(tl.int64) ^ 0xFFFFFFFF)
