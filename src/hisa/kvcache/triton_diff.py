"""Triton kernel of the diff (LRU) step: one program per request row. Launcher: `hisa.kvcache.diff`.

Algorithm (identical to `diff.lru_diff_reference`, see there for the policy):
  * the request's slot state (buffer_pages, last_used) lives in registers as [BLOCK_NS] vectors;
  * the top-k row is streamed in N_CHUNKS = cdiv(K, CHUNK_K) chunks (a constexpr trip count: the
    interpreter cannot loop to a runtime bound under numpy 2); hits come from a [CHUNK_K, BLOCK_NS]
    equality tile, so registers never hold a K x NS tile at once;
  * victims: one int64 key per slot, (occupied, last_used, slot) packed as
    occupied << 52 | (last_used + 2**31) << 20 | slot, non-candidates = INT64_MAX; `tl.sort`
    gives the victim order, and the j-th miss (in top-k order, a running cumsum) takes the slot
    at sorted position j.
Every output is an integer, so the kernel and the torch reference agree bitwise.

Options for the sparse decode step (`hisa.kvcache.manager.resolve_host_backed`), all constexpr:
  * HAS_ROWS: top-k row r uses state row rows[r] (the request's sparse slot), so the state stays
    indexed by slot while the batch is in step order;
  * MAP_PAGES: outputs are addresses, not local slots: slot_table gets the device page of each
    entry's slot (slot_pages[row, slot]; entries with no slot are left untouched, so a caller may
    pre-write some of them), load_slots the device page to fill and load_pages the host page to
    read (host_table[row, page]): exactly the row pairs the I/O kernel copies;
  * HAS_COUNTER: the row's misses are added to counter[0] (a device statistic, read on demand).
"""

from __future__ import annotations

import triton
import triton.language as tl


# step_val must not be specialized: a step of 1 would otherwise become a compile-time constant.
@triton.jit(do_not_specialize=["step_val"])
def lru_diff_kernel(
    bp_ptr, lu_ptr,                    # int32 [R, NS] state, updated in place
    topk_ptr,                          # int32 [R, K]
    active_ptr,                        # uint8/int32 [R] (read when HAS_ACTIVE)
    step_ptr, step_val,                # step from a 0-d device tensor (STEP_FROM_PTR) or an int
    slot_ptr, lslot_ptr, lpage_ptr,    # int32 [R, K] outputs
    nmiss_ptr,                         # int32 [R] output
    rows_ptr,                          # int32 [R] state row of each top-k row (HAS_ROWS)
    slot_pages_ptr, host_table_ptr,    # int32 [*, NS] / int [*, MAXP] (MAP_PAGES)
    counter_ptr,                       # int64 [1] (HAS_COUNTER)
    NS, K,
    stride_bp, stride_lu, stride_tk, stride_slot, stride_ls, stride_lp, stride_sp, stride_ht,
    HAS_ACTIVE: tl.constexpr, STEP_FROM_PTR: tl.constexpr,
    BLOCK_NS: tl.constexpr, CHUNK_K: tl.constexpr, N_CHUNKS: tl.constexpr,
    HAS_ROWS: tl.constexpr = False, MAP_PAGES: tl.constexpr = False, HAS_COUNTER: tl.constexpr = False,
):
    r = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        srow = tl.load(rows_ptr + r).to(tl.int64)
    else:
        srow = r
    s_idx = tl.arange(0, BLOCK_NS)
    s_ok = s_idx < NS
    bp = tl.load(bp_ptr + srow * stride_bp + s_idx, mask=s_ok, other=-1)  # [BLOCK_NS]
    lu = tl.load(lu_ptr + srow * stride_lu + s_idx, mask=s_ok, other=0)  # [BLOCK_NS]
    if HAS_ACTIVE:
        act = tl.load(active_ptr + r) != 0
    else:
        act = True
    if STEP_FROM_PTR:
        step = tl.load(step_ptr).to(tl.int32)
    else:
        step = step_val.to(tl.int32)

    # Pass 1: which slots hold a selected page (not victims), and how many misses there are.
    sel = tl.zeros([BLOCK_NS], dtype=tl.int32)
    n_miss = tl.zeros([], dtype=tl.int32)
    for c in range(N_CHUNKS):
        k_idx = c * CHUNK_K + tl.arange(0, CHUNK_K)
        tk = tl.load(topk_ptr + r * stride_tk + k_idx, mask=(k_idx < K) & act, other=-1)  # [CHUNK_K]
        eq = ((tk[:, None] == bp[None, :]) & (tk[:, None] >= 0)).to(tl.int32)  # [CHUNK_K, BLOCK_NS]
        sel = tl.maximum(sel, tl.max(eq, axis=0))
        hit = tl.max(eq, axis=1)
        n_miss += tl.sum(((tk >= 0) & (hit == 0)).to(tl.int32), axis=0)

    # Pass 2: victim order = candidates sorted by (occupied, last_used, slot).
    cand = s_ok & (sel == 0)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)
    key = ((bp >= 0).to(tl.int64) << 52) | ((lu.to(tl.int64) + 2147483648) << 20) | s_idx.to(tl.int64)
    key = tl.where(cand, key, 9223372036854775807)
    sorted_slot = (tl.sort(key) & 1048575).to(tl.int32)  # [BLOCK_NS]: slot at victim position j
    # Every thread's reads of the old state are done before anyone writes the new state.
    tl.debug_barrier()

    # Pass 3: slots for hits and misses, compacted miss lists, in-place state update.
    base = tl.zeros([], dtype=tl.int32)
    for c in range(N_CHUNKS):
        k_idx = c * CHUNK_K + tl.arange(0, CHUNK_K)
        k_ok = k_idx < K
        tk = tl.load(topk_ptr + r * stride_tk + k_idx, mask=k_ok & act, other=-1)  # [CHUNK_K]
        eq = (tk[:, None] == bp[None, :]) & (tk[:, None] >= 0)  # [CHUNK_K, BLOCK_NS]
        hit_slot = tl.max(tl.where(eq, s_idx[None, :], -1), axis=1)  # [CHUNK_K]
        miss = (tk >= 0) & (hit_slot < 0)
        midx = base + tl.cumsum(miss.to(tl.int32), axis=0) - 1  # position among this row's misses
        victim = tl.max(tl.where(s_idx[None, :] == midx[:, None], sorted_slot[None, :], -1), axis=1)
        victim = tl.where(miss & (midx < n_cand), victim, -1)
        slot = tl.where(hit_slot >= 0, hit_slot, victim)
        if MAP_PAGES:
            sp_row = slot_pages_ptr + srow * stride_sp
            slot_page = tl.load(sp_row + slot, mask=slot >= 0, other=-1)
            tl.store(slot_ptr + r * stride_slot + k_idx, slot_page, mask=k_ok & (slot >= 0))
            miss_dst = tl.load(sp_row + victim, mask=victim >= 0, other=-1)
            miss_src = tl.load(host_table_ptr + srow * stride_ht + tk, mask=miss & (victim >= 0), other=-1)
            tl.store(lslot_ptr + r * stride_ls + midx, miss_dst.to(tl.int32), mask=miss)
            tl.store(lpage_ptr + r * stride_lp + midx, miss_src.to(tl.int32), mask=miss)
        else:
            tl.store(slot_ptr + r * stride_slot + k_idx, slot, mask=k_ok)
            tl.store(lslot_ptr + r * stride_ls + midx, victim, mask=miss)
            tl.store(lpage_ptr + r * stride_lp + midx, tk, mask=miss)
        tail = k_ok & (k_idx >= n_miss)  # positions past the last miss: padding
        tl.store(lslot_ptr + r * stride_ls + k_idx, tl.full([CHUNK_K], -1, tl.int32), mask=tail)
        tl.store(lpage_ptr + r * stride_lp + k_idx, tl.full([CHUNK_K], -1, tl.int32), mask=tail)
        tl.store(bp_ptr + srow * stride_bp + victim, tk, mask=victim >= 0)
        tl.store(lu_ptr + srow * stride_lu + slot, tl.full([CHUNK_K], 0, tl.int32) + step, mask=slot >= 0)
        base += tl.sum(miss.to(tl.int32), axis=0)
    tl.store(nmiss_ptr + r, n_miss)
    if HAS_COUNTER:
        tl.atomic_add(counter_ptr, n_miss.to(tl.int64))
