"""Triton kernel of the I/O step: row gather/scatter between the host pool and the device buffer.

Launcher: `hisa.kvcache.io`. Rows are reinterpreted as 4/2/1-byte units by the launcher, so the
kernel only copies bits and works for every dtype. When one side is pinned host memory, its
pointer is a UVA address: the GPU reads (or writes) host memory over PCIe directly, with no
staging copy. Program (i, c) copies chunk c (BLOCK units) of pair i; pairs with a -1 are masked.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def copy_rows_kernel(
    src_ptr, dst_ptr,            # [*, W] units, last dim contiguous; row strides below
    src_rows_ptr, dst_rows_ptr,  # int32/int64 [N]; pair i is copied when both are >= 0
    W, src_stride, dst_stride,   # row width and row strides, in units
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(src_rows_ptr + i).to(tl.int64)
    d = tl.load(dst_rows_ptr + i).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m = (offs < W) & (s >= 0) & (d >= 0)
    x = tl.load(src_ptr + s * src_stride + offs, mask=m)
    tl.store(dst_ptr + d * dst_stride + offs, x, mask=m)
