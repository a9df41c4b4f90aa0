"""SparseKVCacheManager: the tiers of the sparse cache and every move of KV between them.

L1 is the engine's device page pool (`PagedKVCache`), shared with dense requests: a *resident*
sparse request holds all its pages there; a *host-backed* one holds NS "buffer" pages (an LRU per
layer: each layer fills them with the pages it selects) plus a tail page for the page being
written. L2 is the pinned host pool holding the full KV of every host-backed request.

Per decode step and layer, for the host-backed rows: `resolve` runs the diff kernel (keep hits,
assign misses to least-recently-used non-selected slots, write each entry's device page into the
attention table) and then the I/O kernel reads just the missed pages from the host pool. New
tokens are written through to the host pool as they are made (`hisa.kvcache.write`), so the host
always holds the full KV and an evicted page never needs writing back. A demotion (the scheduler
moves a resident request to the host under memory pressure) copies its pages device → host once.
The prefill of a host-backed request ends by leaving in each layer's buffer the pages its first
decode step will most likely read (`warm`, from the K/V the prefill still has on the device), so
decoding does not start from empty buffers that miss every page.

Device state, preallocated and indexed by sparse slot (row SS is a sentinel for padding rows):
  buffer_lp     [layers, SS + 1, NS] int32  logical page each buffer slot holds (-1 empty)
  last_used     [layers, SS + 1, NS] int32  LRU clock
  slot_pages    [SS + 1, NS] int32          device page of each buffer slot
  host_table    [SS + 1, MAXP] int32        logical page -> host page
  misses        [layers] int64              pages loaded in the layer that needed them (read on demand)
  prefetched    [layers] int64              pages loaded ahead, by the prefetch

Hiding the misses: the pages a layer lacks are the ones its selection newly chose this step, so a
layer's own last list predicts nothing (those pages are resident already). What does predict them
is the layer just resolved: its list is this step's token looking at the same context, and the
sliding-window layers of a Gemma-3 model read exactly the same window pages. So after layer l
resolves, a side stream resolves layer l + 1 with layer l's list and loads what l + 1's buffer lacks
(`prefetch`), while layer l computes; layer l + 1's own resolve first waits for it. A wrong guess
costs bandwidth and buffer slots, never correctness: the real diff loads whatever is still missing.
"""

from __future__ import annotations

import contextlib

import torch

from hisa.kvcache.diff import DiffResult, lru_diff_mapped
from hisa.kvcache.host_pool import HostKVPool
from hisa.kvcache.io import load_pages, store_pages
from hisa.kvcache.paged_cache import PagedKVCache


class SparseKVCacheManager:
    """Owns the host pool and the per-slot residency state of the sparse requests (see module docs)."""

    def __init__(self, *, device_cache: PagedKVCache, buffer_slots: int, max_requests: int, max_pages: int,
                 host_pages: int, device: torch.device):
        c = device_cache
        self.cache = device_cache
        self.num_layers, self.page_size, self.ns = c.num_layers, c.page_size, buffer_slots
        self.max_requests, self.max_pages, self.device = max_requests, max_pages, device
        self.sentinel = max_requests  # the state row padding rows point at (never written)
        # a host page of one layer mirrors a device page of one layer (GQA: K and V; MLA: latent rows)
        self.host = HostKVPool(num_layers=c.num_layers, num_pages=host_pages, page_shape=c.page_shape, dtype=c.dtype,
                               device=torch.device("cpu"), pin=device.type == "cuda")
        self.row = self.host.row
        self.row_bytes = self.row * torch.empty((), dtype=c.dtype).element_size()
        # a device page across layers: the host row for GQA; for MLA latent rows + indexer keys (a
        # host-backed request's buffer pages are whole pages of the device pool)
        self.device_page_bytes = c.nbytes // c.num_pages
        rows, L, NS = max_requests + 1, c.num_layers, buffer_slots
        i32 = dict(dtype=torch.int32, device=device)
        self.buffer_lp = torch.full((L, rows, NS), -1, **i32)
        self.last_used = torch.zeros((L, rows, NS), **i32)
        self.slot_pages = torch.full((rows, NS), -1, **i32)
        self.host_table = torch.full((rows, max_pages), -1, **i32)
        self.misses = torch.zeros(L, dtype=torch.int64, device=device)
        self.prefetched = torch.zeros(L, dtype=torch.int64, device=device)
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready = [torch.cuda.Event() for _ in range(L)] if self._side is not None else None
        self._pending: dict[int, DiffResult] = {}  # layer -> the prefetch in flight (its outputs kept alive)
        # the LRU clock as a 0-d device tensor, advanced inside the (captured) decode step
        self.clock = torch.zeros((), **i32)
        self._free_slots = list(range(max_requests - 1, -1, -1))

    # -- sparse slots ------------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def acquire_slot(self) -> int | None:
        return self._free_slots.pop() if self._free_slots else None

    def release_slot(self, slot: int) -> None:
        self.buffer_lp[:, slot] = -1
        self.slot_pages[slot] = -1
        self.host_table[slot] = -1
        self._free_slots.append(slot)

    def begin_host_backed(self, slot: int, buffer_pages: list[int], *, holding: int | list[int] = 0) -> None:
        """Give `slot` its LRU buffer: device pages buffer_pages[:NS]. holding: an int h = the first h
        of them already hold logical pages 0..h-1 in every layer (a demotion), the rest are empty; or
        the logical page each holds (-1: empty)."""
        pages = torch.tensor(buffer_pages[: self.ns], dtype=torch.int32)
        self.slot_pages[slot] = pages.to(self.device)
        if isinstance(holding, int):
            lp = torch.arange(self.ns, dtype=torch.int32)
            lp = torch.where(lp < holding, lp, -1)
        else:
            lp = torch.tensor(holding, dtype=torch.int32)
        self.buffer_lp[:, slot] = lp.to(self.device)
        self.last_used[:, slot] = 0

    def set_host_pages(self, slot: int, start: int, pages: list[int]) -> None:
        """Record host pages `pages` as logical pages start.. of the request in `slot`."""
        if pages:
            self.host_table[slot, start:start + len(pages)] = torch.tensor(pages, dtype=torch.int32).to(self.device)

    def demote(self, slot: int, device_pages: list[int], host_pages: list[int], buffer_pages: list[int],
               holding: list[int] | None = None) -> None:
        """A resident request moves to the host pool: copy its pages (every layer) device -> host,
        record them, and keep buffer_pages[:NS] as its LRU buffer (holding: the logical page each
        holds, -1 for an empty one; None: = device_pages[:NS], holding logical 0..NS-1).
        host_pages may hold one page more than device_pages: the step's new page, still empty."""
        src = torch.tensor(device_pages, dtype=torch.int64, device=self.device)
        dst = torch.tensor(host_pages[: len(device_pages)], dtype=torch.int64, device=self.device)
        for layer in range(self.num_layers):
            store_pages(self.cache.layer_rows(layer), self.host.layer_rows(layer), src, dst)
        self.set_host_pages(slot, 0, host_pages)
        self.begin_host_backed(slot, buffer_pages, holding=self.ns if holding is None else holding)

    def copy_device_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy device pages src[i] -> dst[i] (every layer): a demoted request's tail page that other
        requests share becomes a private copy of it."""
        s = torch.tensor(src, dtype=torch.int64, device=self.device)
        d = torch.tensor(dst, dtype=torch.int64, device=self.device)
        for layer in range(self.num_layers):
            rows = self.cache.layer_rows(layer)
            rows.index_copy_(0, d, rows.index_select(0, s))

    # -- prefill of a host-backed request -----------------------------------------------------
    def read_context(self, layer: int, host_pages: list[int]) -> torch.Tensor:
        """The layer's pages of a host-backed request, device [n, *page_shape] (GQA: [n, 2, S, KVH, D];
        MLA: [n, S, latent_dim]) (I/O kernel: UVA gather)."""
        src = torch.tensor(host_pages, dtype=torch.int64).to(self.device)
        rows = torch.empty(len(host_pages), self.row, dtype=self.cache.dtype, device=self.device)
        load_pages(self.host.layer_rows(layer), rows, src, torch.arange(len(host_pages), device=self.device))
        return rows.view(-1, *self.host.page_shape)

    def write_pages(self, layer: int, rows: torch.Tensor, host_pages: list[int], tail_page: int | None) -> None:
        """Prefill: write whole pages rows [n, ROW] (device) to `host_pages`; the last one also to the
        request's tail device page, where decoding continues it."""
        dst = torch.tensor(host_pages, dtype=torch.int64).to(self.device)
        src = torch.arange(len(host_pages), device=self.device)
        store_pages(rows, self.host.layer_rows(layer), src, dst)
        if tail_page is not None:
            self.cache.layer_rows(layer)[tail_page] = rows[-1]

    def warm(self, layer: int, slot: int, logical: torch.Tensor, rows: torch.Tensor) -> None:
        """The end of a host-backed request's prefill: its first n buffer slots in `layer` hold logical
        pages `logical` (int32 [n], -1: left empty), whose rows [n, ROW] (device) the prefill still has;
        the other slots are emptied. A device-to-device copy: what the first decode step then finds
        here it does not load over PCIe (`SparseConfig.warm_start`)."""
        n = logical.shape[0]
        self.cache.layer_rows(layer).index_copy_(0, self.slot_pages[slot, :n].long(), rows)  # (an empty slot's row: unread)
        self.buffer_lp[layer, slot, :n] = logical
        self.buffer_lp[layer, slot, n:] = -1
        self.last_used[layer, slot] = 0

    # -- the per-layer hot path -----------------------------------------------------------------
    def resolve(self, layer: int, *, logical: torch.Tensor, active: torch.Tensor, sparse_slots: torch.Tensor,
                table: torch.Tensor, misses: DiffResult) -> None:
        """Make every page of `logical` (int32 [R, K], host-backed rows; -1 padded) resident in its
        row's buffer and write its device page into table[:, :K]; load the misses from the host pool.

        active: uint8 [R] host-backed rows; sparse_slots: int32 [R]; misses: preallocated int32
        outputs (slot_table is table[:, :K]). Waits for this layer's prefetch, if one is in flight.
        No host sync.
        """
        if self._pending.pop(layer, None) is not None and self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[layer])
        lru_diff_mapped(self.buffer_lp[layer], self.last_used[layer], logical, self.clock, rows=sparse_slots,
                        active=active, slot_pages=self.slot_pages, host_table=self.host_table, out=misses,
                        counter=self.misses[layer:layer + 1])
        load_pages(self.host.layer_rows(layer), self.cache.layer_rows(layer), misses.load_pages.reshape(-1),
                   misses.load_slots.reshape(-1))

    def prefetch(self, layer: int, guess: torch.Tensor, *, active: torch.Tensor, sparse_slots: torch.Tensor) -> None:
        """Start making the pages of `guess` (int32 [R, K] logical, -1 padded: the list the layer before
        just resolved) resident in layer `layer`'s buffers, on a side stream on CUDA; that layer's
        `resolve` waits for it."""
        R, width = guess.shape
        i32 = dict(dtype=torch.int32, device=self.device)
        out = DiffResult(torch.empty(R, width, **i32), torch.empty(R, width, **i32), torch.empty(R, width, **i32),
                         torch.empty(R, **i32))
        self._pending[layer] = out  # kept alive until resolve (the side stream writes it)
        side = self._side
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))  # the state as the main stream left it
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            lru_diff_mapped(self.buffer_lp[layer], self.last_used[layer], guess, self.clock, rows=sparse_slots,
                            active=active, slot_pages=self.slot_pages, host_table=self.host_table, out=out,
                            counter=self.prefetched[layer:layer + 1])
            load_pages(self.host.layer_rows(layer), self.cache.layer_rows(layer), out.load_pages.reshape(-1),
                       out.load_slots.reshape(-1))
            if side is not None:
                self._ready[layer].record(side)

    def device_kv_bytes_per_request(self) -> int:
        """Device KV bytes a host-backed request holds (buffer + tail page, all layers): fixed, not O(context)."""
        return (self.ns + 1) * self.device_page_bytes
