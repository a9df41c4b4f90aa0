"""Triton kernel of `hisa.ops.crc32.crc32_pages` (the arithmetic is described there).

crc32_pages_kernel, grid (N, PIECES): program (n, p) runs LANES registers side by side over piece
p of page n, lane i over the page's (zero-padded in front) words [(p LANES + i) CHUNK, ... + CHUNK),
one word per step through the slicing-by-4 tables; then shifts lane i's register past the chunks
after it in the piece (lane_cols[i]), XORs the lanes, shifts that past the pieces after it
(piece_cols[p]) and XORs it into the page's output (atomic; the output starts at zero). Piece 0
also XORs in the initial value's term Z^n ~value (tail_cols) and all ones (the final inversion).
All arithmetic on uint32 (logical shifts).
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
def _times_one(x, cols):
    """One GF(2) matrix product: the XOR of the columns cols[k] ([32]) of x's set bits k (x: a uint32)."""
    k = tl.arange(0, 32).to(tl.uint32)
    return tl.reduce(tl.where(((x >> k) & 1) != 0, cols, tl.zeros_like(cols)), 0, _xor)


@triton.jit
def crc32_pages_kernel(
    words_ptr,              # int32 [N, W] each page's words (little-endian bytes)
    value_ptr, out_ptr,     # int64 [N]: the crc each page continues from; out: int32 [N], zeroed: its crc
    table_ptr,              # int32 [4 * 256]: table m maps byte b to Z^(m + 1) b
    lane_ptr,               # int32 [LANES, 32]: lane i's shift past the rest of its piece
    piece_ptr,              # int32 [PIECES, 32]: piece p's shift past the pieces after it
    tail_ptr,               # int32 [32]: Z^(4 W)
    W, stride_page, PAD,    # words per page, between pages; zero words in front of the page
    CHUNK: tl.constexpr, LANES: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    lane = tl.arange(0, LANES)
    base = words_ptr + n * stride_page
    s = tl.zeros([LANES], dtype=tl.uint32)
    first = (p * LANES + lane) * CHUNK - PAD  # the lane's first word in the page (negative: padding)
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
    k = tl.arange(0, 32)
    cols = tl.load(lane_ptr + lane[:, None] * 32 + k[None, :]).to(tl.uint32, bitcast=True)
    piece = tl.reduce(_times(s, cols), 0, _xor)  # R(0, piece), shifted to the piece's end
    pcols = tl.load(piece_ptr + p * 32 + k).to(tl.uint32, bitcast=True)
    part = _times_one(piece, pcols)
    if p == 0:  # the initial value's term Z^(4 W) ~value, and the final inversion
        v = (tl.load(value_ptr + n) ^ 0xFFFFFFFF).to(tl.uint32)  # (~ on uint32: the interpreter refuses it)
        tail = tl.load(tail_ptr + k).to(tl.uint32, bitcast=True)
        part = part ^ _times_one(v, tail)
        part = part ^ 0xFFFFFFFF
    tl.atomic_xor(out_ptr + n, part.to(tl.int32, bitcast=True))
