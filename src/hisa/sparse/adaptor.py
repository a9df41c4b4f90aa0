"""BackendAdaptor: each sparse row's attended pages, laid out as the paged-decode kernel reads them.

Layout of a row's list: [sink pages | selected middle pages | recent pages ... current page], or for
a sliding-window layer (Gemma-3) the pages of its window. The partially written page is last, so
the kernel's `kv_lens` (tokens of the virtual concatenation) masks exactly its unwritten tail.

Per step, `bounds` turns each row's token count into the layout's bounds (device tensors, torch
ops, no host sync); per layer, `compose` fills the physical page table in one launch: for a
resident request every page is on the device already (its block-table row); for a host-backed
request the list goes to the manager's LRU diff, which finds or loads each page in the request's
buffer and writes the device page into the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hisa.ops import pdl

# a row's kind in a decode step (int32 in the step plan)
PAD, DENSE, RESIDENT, HOST_BACKED = -1, 0, 1, 2


@dataclass
class LayoutBounds:
    """Per decode row (int32 [R] device tensors): sinks end `lo` and recent start `hi` (the middle
    range is [lo, hi)); the first page of the sliding window (`window_lo`, None without windows)."""

    lo: torch.Tensor
    hi: torch.Tensor
    window_lo: torch.Tensor | None


class BackendAdaptor:
    """Lays out each sparse row's pages (see the module docstring) for our Triton paged-decode kernel.

    budget_pages: pages attended per row per global layer (sinks + selected + recent + current);
    window: the widest sliding window in tokens (None without sliding layers).
    """

    def __init__(self, *, page_size: int, sink_pages: int, recent_pages: int, budget_pages: int,
                 window: int | None = None):
        self.page_size, self.sink_pages, self.recent_pages = page_size, sink_pages, recent_pages
        self.budget_pages = budget_pages
        self.num_select = budget_pages - sink_pages - recent_pages
        self.window = window
        self.window_pages = None if window is None else (window - 1) // page_size + 2  # pages a window touches

    def width(self, windowed: bool) -> int:
        """Entries of a row's list in a layer: the budget, or the pages a window can touch."""
        return self.window_pages if windowed else self.budget_pages

    def middle(self, t: int) -> tuple[int, int]:
        """`bounds` of one row of t tokens, on the host: (lo, hi), its middle range of pages."""
        n = -(-t // self.page_size)
        lo = min(n, self.sink_pages)
        return lo, max(lo, n - self.recent_pages)

    def bounds(self, t: torch.Tensor, kind: torch.Tensor) -> LayoutBounds:
        """t: int32 [R] tokens once this step's is written; kind: int32 [R]. Rows that are not sparse
        get an empty middle range (lo = hi = 0), so selection skips them."""
        s = self.page_size
        n = (t + s - 1) // s
        lo = torch.clamp(n, max=self.sink_pages)
        hi = torch.maximum(lo, n - self.recent_pages)
        sparse = kind > 0
        zero = torch.zeros_like(lo)
        window_lo = None if self.window is None else torch.clamp(t - self.window, min=0) // s
        return LayoutBounds(torch.where(sparse, lo, zero).to(torch.int32), torch.where(sparse, hi, zero).to(torch.int32),
                            None if window_lo is None else window_lo.to(torch.int32))

    def compose(self, *, kind, slot, t, write_page, bounds: LayoutBounds, topk: torch.Tensor | None,
                block_table, table, logical, kv_lens, windowed: bool, use_triton: bool | None = None) -> None:
        """Fill `table` (int32 [R, W], physical pages) for resident rows, the tail entry of host-backed
        rows and `logical` (int32 [R, K]) with the other pages of host-backed rows (-1 elsewhere), and
        `kv_lens` (int32 [R]) of every sparse row. topk: int [R, num_select] middle picks (None for
        windowed layers or algorithms that select nothing)."""
        K = self.width(windowed)
        nsel = 0 if windowed or topk is None else self.num_select
        lo = bounds.window_lo if windowed else bounds.lo
        R = kind.shape[0]
        if R == 0:
            return
        if use_triton is None:
            use_triton = kind.is_cuda
        if not use_triton:
            _compose_ref(kind, slot, t, write_page, lo, bounds.hi, topk if nsel else None, block_table, table,
                         logical, kv_lens, page_size=self.page_size, num_select=nsel, K=K, windowed=windowed)
            return
        from hisa.sparse.triton_compose import compose_kernel

        tk = topk if nsel else kind
        compose_kernel[(R,)](
            kind, slot, t, write_page, lo, bounds.hi, tk, block_table, table, logical, kv_lens,
            tk.stride(0) if nsel else 0, block_table.stride(0), table.stride(0), logical.stride(0),
            S=self.page_size, NSEL=nsel, K=K, BLOCK_K=_next_pow2(K), WINDOWED=windowed, num_warps=1,
            **pdl.launch_kwargs(table, "selection"))


    # -- token-level selection (DSA) ------------------------------------------------------------------
    def token_pages(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """tokens: int32 [R, N] selected positions (-1 padded); t: int32 [R] tokens of each row.
        Returns int64 [R, num_select]: the distinct logical pages holding them, ascending, the current
        page (t - 1) // S left out, padded with a large sentinel (> any page) that `remap_tokens` searches
        and `pages_or_pad` turns into -1. Device ops only (two sorts), no host sync. num_select must be at
        least the distinct pages a row can pick (the engine sizes it min(index_topk, pages - 1))."""
        s, big = self.page_size, _BIG_PAGE
        cur = (torch.clamp(t.long() - 1, min=0) // s)[:, None]  # [R, 1]
        lp = torch.where(tokens >= 0, tokens.long() // s, big)
        lp = torch.where(lp == cur, big, lp).sort(dim=1).values  # [R, N]
        dup = torch.zeros_like(lp, dtype=torch.bool)
        dup[:, 1:] = lp[:, 1:] == lp[:, :-1]
        lp = torch.where(dup, big, lp).sort(dim=1).values  # distinct pages first
        k = self.num_select
        if lp.shape[1] < k:
            lp = torch.nn.functional.pad(lp, (0, k - lp.shape[1]), value=big)
        return lp[:, :k]

    @staticmethod
    def pages_or_pad(pages: torch.Tensor) -> torch.Tensor:
        """token_pages' output as the diff's int32 list (-1 padded)."""
        return torch.where(pages == _BIG_PAGE, -1, pages).to(torch.int32)

    def remap_tokens(self, tokens: torch.Tensor, pages: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """int32 [R, N]: each selected position p as j * S + p % S, j = p's page's entry in `pages`
        (token_pages' output) or num_select for the current page (the tail, last in the table); -1 kept.
        The row's kv_len for the kernel is then (num_select + 1) * S."""
        s = self.page_size
        tk = tokens.long()
        page = torch.clamp(tk, min=0) // s
        cur = (torch.clamp(t.long() - 1, min=0) // s)[:, None]
        j = torch.searchsorted(pages.contiguous(), page)  # [R, N]
        j = torch.where(page == cur, self.num_select, j)
        return torch.where(tokens >= 0, j * s + tk % s, -1).to(torch.int32)


_BIG_PAGE = 1 << 40  # pads token_pages' sorted lists (larger than any logical page)


def _compose_ref(kind, slot, t, write_page, lo, hi, topk, block_table, table, logical, kv_lens, *,
                 page_size: int, num_select: int, K: int, windowed: bool) -> None:
    """Plain-torch compose (row by row on the host: the reference, not the hot path)."""
    s = page_size
    logical[:, :K] = -1
    for r, (kd, sl, tt) in enumerate(zip(kind.tolist(), slot.tolist(), t.tolist())):
        if kd <= 0:
            continue
        n = -(-tt // s)
        first = int(lo[r])
        if windowed:
            pages = list(range(first, n))
        else:
            h = int(hi[r])
            nmid = min(h - first, num_select)
            mid = topk[r, :nmid].tolist() if nmid > 0 else []
            pages = list(range(first)) + mid + list(range(h, n))
        kv_lens[r] = (len(pages) - 1) * s + (tt - (n - 1) * s)
        idx = torch.tensor(pages, dtype=torch.long, device=table.device)
        if kd == RESIDENT:
            table[r, : len(pages)] = block_table[sl, idx]
        else:
            logical[r, : len(pages) - 1] = idx[:-1].to(torch.int32)
            table[r, len(pages) - 1] = write_page[r]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
