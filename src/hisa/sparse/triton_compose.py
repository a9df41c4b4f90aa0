"""Triton kernel composing each sparse row's attended page list. Launcher and reference:
`hisa.sparse.adaptor.BackendAdaptor.compose`.

Program r builds row r's logical list [sinks | middle picks | recent ... current] (or, for a
sliding-window layer, the window's pages first_w .. current) as a [BLOCK_K] vector, then:
  * resident rows (kind 1): every page is on the device: table[r, k] = block_table[slot, L[k]];
  * host-backed rows (kind 2): the current page is the request's tail page (write_page[r]); the
    others go to `logical` for the LRU diff, which writes their device pages into the table.
The attended length kv_lens[r] counts whole pages and the written part of the current one.
Other rows (dense, padding) are left alone.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_pdl import pdl_enter


@triton.jit
def compose_kernel(
    kind_ptr, slot_ptr, t_ptr, write_page_ptr,  # int32 [R]
    lo_ptr, hi_ptr,                 # int32 [R]: sinks end / recent start (WINDOWED: lo = first window page)
    topk_ptr,                       # int [R, NSEL] middle picks, best first (read when NSEL > 0)
    block_table_ptr,                # int32 [*, MAXP] device page of each logical page (resident rows)
    table_ptr,                      # int32 [R, W] out: physical page list
    logical_ptr,                    # int32 [R, K] out: logical pages for the diff (-1 = none)
    kv_lens_ptr,                    # int32 [R] out
    stride_tk, stride_bt, stride_tb, stride_lg,
    S: tl.constexpr, NSEL: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr, WINDOWED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_enter(PDL)  # before any read of step data or any write (hisa.ops.pdl)
    r = tl.program_id(0).to(tl.int64)
    kind = tl.load(kind_ptr + r)
    if kind > 0:
        t = tl.load(t_ptr + r)
        n = (t + S - 1) // S  # pages of the context
        lo = tl.load(lo_ptr + r)
        k = tl.arange(0, BLOCK_K)
        if WINDOWED:
            lp = lo + k
            cnt = n - lo
        else:
            hi = tl.load(hi_ptr + r)
            nmid = tl.minimum(hi - lo, NSEL)
            is_mid = (k >= lo) & (k < lo + nmid)
            if NSEL > 0:
                pick = tl.load(topk_ptr + r * stride_tk + (k - lo), mask=is_mid, other=-1).to(tl.int32)
            else:
                pick = tl.full([BLOCK_K], -1, tl.int32)
            lp = tl.where(k < lo, k, tl.where(is_mid, pick, hi + (k - lo - nmid)))
            cnt = lo + nmid + (n - hi)
        valid = (k < cnt) & (k < K)
        tl.store(kv_lens_ptr + r, (cnt - 1) * S + (t - (n - 1) * S))
        slot = tl.load(slot_ptr + r).to(tl.int64)
        if kind == 1:
            phys = tl.load(block_table_ptr + slot * stride_bt + lp, mask=valid, other=-1)
            tl.store(table_ptr + r * stride_tb + k, phys, mask=valid)
        else:
            current = k == cnt - 1
            tl.store(logical_ptr + r * stride_lg + k, tl.where(valid & ~current, lp, -1), mask=k < K)
            tail = tl.load(write_page_ptr + r)
            tl.store(table_ptr + r * stride_tb + k, tl.full([BLOCK_K], 0, tl.int32) + tail, mask=valid & current)


@triton.jit
def scatter_resident_row(p, take, pos, r, kind_ptr, slot_ptr, t_ptr, lo, hi, block_table_ptr, table_ptr,
                         kv_lens_ptr, stride_bt, stride_tb, S: tl.constexpr, NSEL: tl.constexpr):
    """compose's resident branch written from a top-k search's lanes (one per logical page p of row r;
    `take` marks the middle picks, `pos` their rank in page order): the row's list [sinks | picks |
    recent ... current] mapped through its block table into table[r], and kv_lens[r]. select_pages
    runs it in place of a compose launch (`hisa.sparse.page_scores.TableLayout`). Rows that are not
    resident are left alone."""
    kind = tl.load(kind_ptr + r)
    if kind == 1:
        t = tl.load(t_ptr + r)
        n = (t + S - 1) // S
        nmid = tl.minimum(hi - lo, NSEL)
        cnt = lo + nmid + (n - hi)
        at = tl.where(p < lo, p, tl.where(take, lo + pos, lo + nmid + (p - hi)))  # the list position of page p
        keep = (p < lo) | take | ((p >= hi) & (p < n))
        slot = tl.load(slot_ptr + r).to(tl.int64)
        phys = tl.load(block_table_ptr + slot * stride_bt + p, mask=keep, other=-1)
        tl.store(table_ptr + r * stride_tb + at, phys, mask=keep)
        tl.store(kv_lens_ptr + r, (cnt - 1) * S + (t - (n - 1) * S))
