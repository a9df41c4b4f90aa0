"""Triton kernel writing each decode row's new K/V into its device page and, for host-backed rows,
into its host page too (UVA store into pinned memory). Launcher: `hisa.kvcache.write`.

Program r copies row r's K and V ([KVH * D] values each) once from registers to both places, so the
write-through to the host pool costs no extra read and no device-to-host copy by the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter


@triton.jit
def write_token_kv_kernel(
    k_ptr, v_ptr,                  # [R, KVH * D] rows (row strides below, inner dims contiguous)
    dev_ptr,                       # [P, ROW] one layer of the device pool, ROW = 2 * S * KVH * D
    host_ptr,                      # [HP, ROW] the layer's host pool (read only when HAS_HOST)
    page_ptr, host_page_ptr,       # int32 [R]: device / host page of the row's token (-1: skip)
    t_ptr,                         # int32 [R]: tokens once this one is written (its offset is (t-1) % S)
    stride_k, stride_v, dev_stride, host_stride,
    KD: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, HAS_HOST: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    r = tl.program_id(0)
    page = tl.load(page_ptr + r).to(tl.int64)
    t = tl.load(t_ptr + r)
    offs = tl.arange(0, BLOCK)
    m = offs < KD
    tok = ((t - 1) % S).to(tl.int64) * KD  # the token's slot within the K half (V is S * KD further)
    k = tl.load(k_ptr + r * stride_k + offs, mask=m)
    v = tl.load(v_ptr + r * stride_v + offs, mask=m)
    ok = (page >= 0) & (t > 0)
    base = dev_ptr + page * dev_stride + tok
    tl.store(base + offs, k.to(dev_ptr.dtype.element_ty), mask=m & ok)
    tl.store(base + S * KD + offs, v.to(dev_ptr.dtype.element_ty), mask=m & ok)
    if HAS_HOST:
        hp = tl.load(host_page_ptr + r).to(tl.int64)
        hok = (hp >= 0) & (t > 0)
        hbase = host_ptr + hp * host_stride + tok
        tl.store(hbase + offs, k.to(host_ptr.dtype.element_ty), mask=m & hok)
        tl.store(hbase + S * KD + offs, v.to(host_ptr.dtype.element_ty), mask=m & hok)
