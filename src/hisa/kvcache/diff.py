"""Diff (LRU) step of the device buffer: which selected pages are resident, which must be loaded where.

State of one layer's device buffer (the caller keeps one per layer, preallocated [max_reqs, NS]
and indexed by request slot):
  buffer_pages int32 [R, NS]  logical page held by each local slot, -1 = empty
  last_used    int32 [R, NS]  step at which each slot was last selected (the LRU clock)

Policy, per request row (deterministic; the Triton kernel matches it bitwise):
  1. hit: a top-k page already held by a slot keeps that slot and is never reloaded;
  2. candidates for eviction: the slots holding no page selected this step;
  3. they are ranked by the key (occupied, last_used, slot) ascending: empty slots first, then the
     least recently used, ties to the lowest slot index;
  4. the j-th miss, counting misses in top-k order, takes the candidate of rank j.
  Every slot selected this step (hit or miss) gets last_used = step.

Requirements: K <= NS; a top-k row holds distinct pages (padding -1 anywhere); a buffer row
holds distinct pages (lru_diff keeps it so). Should a corrupt state leave fewer candidates than
misses, the extra misses get slot -1 (load_slots -1, so the I/O step skips them).

`lru_diff` is the public entry point; no host sync, no `.item()`, so a decode step calling it can be
captured in a CUDA graph (pass `step` as a 0-d device tensor then, since a Python int is frozen
into the graph). Three implementations, bitwise equal:
  * "triton": one program per row, the hits found by a [K, NS] equality tile in registers: the
    fastest for page-sized selections (K in the tens to hundreds);
  * "sorted": torch ops over all rows, the hits found by sorting each buffer row and a binary
    search of every top-k entry (O(R (K + NS) log NS)): for token-sized selections (DSA: K = 2,048
    of NS = 4,096 slots, where the tile costs K x NS compares per row: 3.8 ms per layer for 163
    rows on an H200; sorted, every sort of the step together took ~1 ms for its 4 layers);
  * "torch" (`lru_diff_reference`): the plain statement of the policy, [R, K, NS] memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_SLOT_BITS = 20  # the victim key packs the slot index in 20 bits
MAX_SLOTS = 1 << _SLOT_BITS
MAX_TRITON_SLOTS = 4096  # a request's slot state lives in a program's registers (tested up to here)
_TILE = 8192  # elements of one [CHUNK_K, BLOCK_NS] comparison tile in the kernel
_SORTED_FROM = 1 << 20  # "auto" takes the sorted implementation from this many K x NS compares per row
_INT64_MAX = (1 << 63) - 1


class DiffResult(NamedTuple):
    """Outputs of one diff step (all int32 and on the state's device).

    slot_table [R, K]: local slot (0..NS-1) of each top-k entry after the step, -1 for padding.
    load_slots [R, K]: slots to fill, compacted to the front of the row (n_miss valid, rest -1).
    load_pages [R, K]: logical pages to load into them, same positions as load_slots.
    num_misses [R]:    misses per row (0 for inactive rows).
    """

    slot_table: torch.Tensor
    load_slots: torch.Tensor
    load_pages: torch.Tensor
    num_misses: torch.Tensor


def lru_diff(buffer_pages: torch.Tensor, last_used: torch.Tensor, topk: torch.Tensor,
             step: int | torch.Tensor, *, active: torch.Tensor | None = None,
             out: DiffResult | None = None, backend: str = "auto") -> DiffResult:
    """Make the top-k pages resident in each request's buffer (bookkeeping only; no data moves).

    buffer_pages, last_used: int32 [R, NS], updated in place (last dim contiguous).
    topk: int32 [R, K] logical page ids per row, distinct within a row, -1 padded; K <= NS.
    step: the LRU clock value of this step, an int or a 0-d integer tensor on the device.
    active: optional bool/uint8/int32 [R]; rows where it is 0 are untouched and output -1 / 0.
    out: optional preallocated DiffResult to write into.
    backend: "auto" (`_auto_backend`), "triton" (on CPU only under TRITON_INTERPRET=1), "sorted" or
      "torch" (the module docstring says what each is for).

    Example::

        bp = torch.full((2, 4), -1, dtype=torch.int32); lu = torch.zeros(2, 4, dtype=torch.int32)
        res = lru_diff(bp, lu, torch.tensor([[7, 3], [-1, 5]], dtype=torch.int32), 1)
        # res.slot_table == [[0, 1], [-1, 0]], res.num_misses == [2, 1], bp[0] == [7, 3, -1, -1]
    """
    R, NS, K = _validate(buffer_pages, last_used, topk, step, active, out)
    backend = _auto_backend(buffer_pages, NS, K) if backend == "auto" else backend
    if out is None:
        out = _allocate(R, K, buffer_pages.device)
    if backend == "torch":
        return lru_diff_reference(buffer_pages, last_used, topk, step, active=active, out=out)
    if backend == "sorted":
        return lru_diff_sorted(buffer_pages, last_used, topk, step, active=active, out=out)
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton', 'sorted' or 'torch', got {backend!r}")
    _launch_triton(buffer_pages, last_used, topk, step, active, out, R, NS, K)
    return out


def _auto_backend(buffer_pages: torch.Tensor, NS: int, K: int) -> str:
    """sorted for large selections (K x NS >= _SORTED_FROM, or too many slots for Triton's registers);
    else Triton on CUDA, the reference elsewhere."""
    if K * NS >= _SORTED_FROM or (buffer_pages.is_cuda and NS > MAX_TRITON_SLOTS):
        return "sorted"
    return "triton" if buffer_pages.is_cuda else "torch"


def lru_diff_mapped(buffer_pages: torch.Tensor, last_used: torch.Tensor, topk: torch.Tensor,
                    step: torch.Tensor, *, rows: torch.Tensor, active: torch.Tensor, slot_pages: torch.Tensor,
                    host_table: torch.Tensor, out: DiffResult, counter: torch.Tensor | None = None,
                    backend: str = "auto") -> DiffResult:
    """lru_diff for the sparse decode step: state rows chosen per top-k row, addresses out.

    buffer_pages, last_used: int32 [N, NS] state of N request slots, updated in place.
    topk: int32 [R, K] logical pages per batch row (-1 padded); rows: int32 [R] the state row of each
      batch row (active rows must not share one); active: bool/uint8 [R].
    slot_pages: int32 [N, NS] device page of each buffer slot; host_table: int32 [N, MAXP] host
      page of each logical page.
    out (preallocated, int32): slot_table [R, K] gets the device page of each entry that has a
      slot (others are left as they were: a view of the attention table whose other entries the
      caller wrote); load_slots / load_pages get the device page to fill and the host page to read
      of each miss, compacted and -1 padded (the I/O kernel's row pairs); num_misses [R].
    counter: optional int64 [1], incremented by the step's misses. No host sync on CUDA.
    """
    R, K = topk.shape
    NS = buffer_pages.shape[1]
    backend = _auto_backend(buffer_pages, NS, K) if backend == "auto" else backend
    if backend == "triton":
        _launch_triton(buffer_pages, last_used, topk, step, active, out, R, NS, K,
                       mapped=(rows, slot_pages, host_table, counter))
        return out
    if backend not in ("sorted", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton', 'sorted' or 'torch', got {backend!r}")
    srow = rows.long()
    act = active.to(torch.bool)
    bp, lu = buffer_pages[srow], last_used[srow]  # [R, NS] copies
    local = (lru_diff_sorted if backend == "sorted" else lru_diff_reference)(bp, lu, topk, step, active=act)
    # every row back, no boolean indexing (a host sync): the diff leaves inactive rows as they were, so
    # padding rows that share the sentinel row all write its unchanged state
    buffer_pages.index_copy_(0, srow, bp)
    last_used.index_copy_(0, srow, lu)
    sp = slot_pages[srow]  # [R, NS]
    has = local.slot_table >= 0
    out.slot_table.copy_(torch.where(has, sp.gather(1, local.slot_table.clamp(min=0).long()), out.slot_table))
    ls, lp = local.load_slots, local.load_pages
    out.load_slots.copy_(torch.where(ls >= 0, sp.gather(1, ls.clamp(min=0).long()), -1))
    host = host_table[srow].gather(1, lp.clamp(min=0).long()).to(torch.int32)
    out.load_pages.copy_(torch.where((ls >= 0) & (lp >= 0), host, -1))
    out.num_misses.copy_(local.num_misses)
    if counter is not None:
        counter += local.num_misses.sum()
    return out


def lru_diff_reference(buffer_pages: torch.Tensor, last_used: torch.Tensor, topk: torch.Tensor,
                       step: int | torch.Tensor, *, active: torch.Tensor | None = None,
                       out: DiffResult | None = None) -> DiffResult:
    """Plain-torch lru_diff (same arguments and results; all rows at once, [R, K, NS] memory)."""
    NS = buffer_pages.shape[1]
    tk = _selected(topk, active)
    valid = tk >= 0  # [R, K]
    s_idx = torch.arange(NS, dtype=torch.int32, device=buffer_pages.device)
    eq = (tk[:, :, None] == buffer_pages[:, None, :]) & valid[:, :, None]  # [R, K, NS]
    hit_slot = torch.where(eq, s_idx, -1).amax(2)  # [R, K] (slots hold distinct pages: <= 1 match)
    sel = eq.any(1)  # [R, NS] slots holding a selected page
    return _assign(buffer_pages, last_used, tk, hit_slot, sel, step, out)


def lru_diff_sorted(buffer_pages: torch.Tensor, last_used: torch.Tensor, topk: torch.Tensor,
                    step: int | torch.Tensor, *, active: torch.Tensor | None = None,
                    out: DiffResult | None = None) -> DiffResult:
    """lru_diff with the hits found by sorting each buffer row and a binary search per top-k entry:
    O(R (K + NS)) memory and O(R (K + NS) log NS) work, for large K (same arguments and results)."""
    R, NS = buffer_pages.shape
    tk = _selected(topk, active)
    valid = tk >= 0  # [R, K]
    held, slot_of = torch.sort(buffer_pages, dim=1)  # [R, NS]: pages ascending (-1 first), their slots
    pos = torch.searchsorted(held, tk).clamp_(max=max(NS - 1, 0))  # [R, K] int64
    found = valid & (held.gather(1, pos) == tk)
    hit_slot = torch.where(found, slot_of.gather(1, pos).to(torch.int32), -1)  # [R, K]
    sel = torch.zeros((R, NS + 1), dtype=torch.bool, device=buffer_pages.device)
    sel.scatter_(1, torch.where(found, hit_slot, NS).long(), True)  # column NS: a dump for non-hits
    return _assign(buffer_pages, last_used, tk, hit_slot, sel[:, :NS], step, out)


def _selected(topk: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    tk = topk.to(torch.int32)
    if active is not None:
        tk = torch.where(active.to(torch.bool)[:, None], tk, -1)  # inactive rows select nothing
    return tk


def _assign(buffer_pages, last_used, tk, hit_slot, sel, step, out) -> DiffResult:
    """The policy past the hits: victims for the misses, the compacted loads, the state update.
    hit_slot [R, K]: each entry's slot, -1 for a miss or padding; sel [R, NS]: slots holding a
    selected page."""
    R, NS = buffer_pages.shape
    K = tk.shape[1]
    dev = buffer_pages.device
    if out is None:
        out = _allocate(R, K, dev)
    valid = tk >= 0
    s_idx = torch.arange(NS, dtype=torch.int32, device=dev)
    miss = valid & (hit_slot < 0)
    midx = miss.to(torch.int32).cumsum(1) - 1  # [R, K] rank of each miss within its row
    n_cand = (~sel).sum(1, keepdim=True)  # [R, 1]

    key = ((buffer_pages >= 0).long() << 52) | ((last_used.long() + (1 << 31)) << _SLOT_BITS) | s_idx.long()
    key = torch.where(sel, _INT64_MAX, key)  # [R, NS]
    order = torch.sort(key, dim=1, stable=True).indices.to(torch.int32)  # slot of victim rank j
    victim = order.gather(1, midx.clamp(0, max(NS - 1, 0)).long())  # [R, K]
    victim = torch.where(miss & (midx < n_cand), victim, -1)
    slot = torch.where(hit_slot >= 0, hit_slot, victim)

    pos = torch.where(miss, midx, K).long()  # column K is a dump for non-misses
    compact = torch.full((R, K + 1), -1, dtype=torch.int32, device=dev)
    out.load_slots.copy_(compact.scatter(1, pos, victim)[:, :K])
    out.load_pages.copy_(compact.scatter(1, pos, tk)[:, :K])
    out.slot_table.copy_(slot)
    out.num_misses.copy_(miss.sum(1))

    if isinstance(step, torch.Tensor):
        step_src = step.to(device=dev, dtype=torch.int32).reshape(()).expand(R, K)
    else:
        step_src = torch.full((R, K), step, dtype=torch.int32, device=dev)
    dump = torch.full((R, 1), -1, dtype=torch.int32, device=dev)
    new_pages = torch.cat([buffer_pages, dump], 1).scatter(1, torch.where(victim >= 0, victim, NS).long(), tk)
    new_used = torch.cat([last_used, dump], 1).scatter(1, torch.where(slot >= 0, slot, NS).long(), step_src)
    buffer_pages.copy_(new_pages[:, :NS])
    last_used.copy_(new_used[:, :NS])
    return out


def to_physical(slot_table: torch.Tensor, slot_base: torch.Tensor) -> torch.Tensor:
    """Local slots -> physical pages of the device pool.

    slot_table: int32 [R, K] local slots (-1 padding); slot_base: int32/int64 [R], first global
    slot of each request. Returns int32 [R, K]: slot_base[r] + slot_table[r, k], -1 kept.
    """
    return torch.where(slot_table >= 0, slot_table + slot_base.to(slot_table.dtype)[:, None], -1)


# -- internals -----------------------------------------------------------------------------------
def _allocate(R: int, K: int, device: torch.device) -> DiffResult:
    def new(*shape):
        return torch.empty(shape, dtype=torch.int32, device=device)

    return DiffResult(new(R, K), new(R, K), new(R, K), new(R))


def _validate(buffer_pages, last_used, topk, step, active, out) -> tuple[int, int, int]:
    for name, t in (("buffer_pages", buffer_pages), ("last_used", last_used), ("topk", topk)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 tensor of 2 dims, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    R, NS = buffer_pages.shape
    K = topk.shape[1]
    dev = buffer_pages.device
    if last_used.shape != (R, NS) or topk.shape[0] != R:
        raise ValueError(f"shapes disagree: buffer_pages {tuple(buffer_pages.shape)}, last_used "
                         f"{tuple(last_used.shape)}, topk {tuple(topk.shape)} (want [R, NS], [R, NS], [R, K])")
    if K > NS:
        raise ValueError(f"top-k width K={K} exceeds the buffer's NS={NS} slots per request; "
                         "give each request at least K slots")
    if not 1 <= NS <= MAX_SLOTS:
        raise ValueError(f"NS={NS} slots per request is outside 1..{MAX_SLOTS}")
    if last_used.device != dev or topk.device != dev:
        raise ValueError(f"buffer_pages ({dev}), last_used ({last_used.device}) and topk ({topk.device}) "
                         "must be on one device")
    if active is not None and (active.shape != (R,) or active.device != dev or active.is_floating_point()):
        raise ValueError(f"active must be a bool/integer [R={R}] tensor on {dev}, got "
                         f"{active.dtype} {tuple(active.shape)} on {active.device}")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_floating_point() or step.device != dev:
            raise ValueError(f"step tensor must hold one integer on {dev}, got {step.dtype} "
                             f"{tuple(step.shape)} on {step.device}")
    elif not isinstance(step, int) or not -(1 << 31) <= step < (1 << 31):
        raise ValueError(f"step must be an int32-range int or a 0-d tensor, got {step!r}")
    if out is not None:
        want = ((R, K), (R, K), (R, K), (R,))
        for name, t, shape in zip(DiffResult._fields, out, want):
            if t.shape != shape or t.dtype != torch.int32 or t.device != dev:
                raise ValueError(f"out.{name} must be int32 {shape} on {dev}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
    return R, NS, K


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _launch_triton(buffer_pages, last_used, topk, step, active, out, R, NS, K, mapped=None) -> None:
    from hisa.kvcache.triton_diff import lru_diff_kernel

    if NS > MAX_TRITON_SLOTS:
        raise ValueError(f"the Triton diff kernel holds a request's slots in registers: NS={NS} > "
                         f"{MAX_TRITON_SLOTS}; use backend='torch' or fewer slots per request")
    for name, t in (("buffer_pages", buffer_pages), ("last_used", last_used), *zip(DiffResult._fields, out)):
        if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride {t.stride()})")
    if out.num_misses.stride(0) != 1 and R > 1:
        raise ValueError("out.num_misses must be contiguous")
    topk = topk if K <= 1 or topk.stride(1) == 1 else topk.contiguous()
    if active is not None:
        active = active.view(torch.uint8) if active.dtype == torch.bool else active
        if R > 1 and active.stride(0) != 1:
            active = active.contiguous()
    step_is_tensor = isinstance(step, torch.Tensor)
    block_ns = max(2, _next_pow2(NS))
    chunk_k = max(2, min(_next_pow2(K), _TILE // block_ns))
    lru_diff_kernel[(R,)](
        buffer_pages, last_used, topk,
        active if active is not None else buffer_pages,
        step if step_is_tensor else buffer_pages, 0 if step_is_tensor else int(step),
        out.slot_table, out.load_slots, out.load_pages, out.num_misses,
        *(mapped[:3] if mapped else (buffer_pages,) * 3),  # rows, slot_pages, host_table
        mapped[3] if mapped and mapped[3] is not None else buffer_pages,  # the miss counter
        NS, K,
        buffer_pages.stride(0), last_used.stride(0), topk.stride(0),
        out.slot_table.stride(0), out.load_slots.stride(0), out.load_pages.stride(0),
        mapped[1].stride(0) if mapped else 0, mapped[2].stride(0) if mapped else 0,
        HAS_ACTIVE=active is not None, STEP_FROM_PTR=step_is_tensor,
        HAS_ROWS=mapped is not None, MAP_PAGES=mapped is not None,
        HAS_COUNTER=mapped is not None and mapped[3] is not None,
        BLOCK_NS=block_ns, CHUNK_K=chunk_k, N_CHUNKS=-(-K // chunk_k), num_warps=4 if block_ns <= 512 else 8,
    )
