"""SparseCoordinator: the request lifecycle and the per-step order of calls of the sparse cache.

Hooks, in order: on_request_begin (admission: a sparse slot; a host-backed request's LRU buffer) →
prefill (resident: the engine's paged prefill, then representations from the written keys;
host-backed: attention over the host pool, KV written to it layer by layer, representations) →
each decode step: forward_begin (the step's layout bounds, once, on the device) → per layer
attention_begin (retrieve top-k → compose the page list → for host-backed rows, diff + load misses
→ physical page table) → attention → attention_end (update representations) → forward_end
(host-side counters) → on_request_end (free the slot; the scheduler frees the pages).

DSA models (MLA + the model's own indexer, the `dsa` algorithm) take the same hooks with latent rows
in place of K/V, called from `hisa.engine.dsa_attention`: `prefill_host_backed_mla`, and per decode
layer `write_through_mla` (the new latent row to the host pool, the new indexer key to the
representation) → `select_tokens` (the indexer) → `attention_begin_tokens` (tokens → pages → diff +
load misses → the buffer-slot table and remapped positions). The new indexer key must be in the
representation before selection (the token selects itself), so DSA updates it first, not at
attention_end.

The coordinator owns the order, not the work: the algorithm selects, the adaptor lays pages out
for the kernel, the manager moves KV between tiers. It never imports the engine; the engine hands
it the step's decode rows (`DecodeRowsView`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from hisa.attention.prefill import prefill_attention
from hisa.kvcache.diff import DiffResult
from hisa.kvcache.manager import SparseKVCacheManager
from hisa.kvcache.write import write_token_rows
from hisa.sparse.adaptor import HOST_BACKED, RESIDENT, BackendAdaptor, LayoutBounds
from hisa.sparse.base import BaseSparseAlgorithm, DecodeRows
from hisa.sparse.config import SparseConfig
from hisa.sparse.page_scores import TableLayout


@dataclass
class _RowGroup:
    """A contiguous range of a resident-only step's rows (views of the DecodeRowsView's tensors)."""

    kind: torch.Tensor
    slot: torch.Tensor
    sparse_slot: torch.Tensor
    t: torch.Tensor
    write_page: torch.Tensor
    table: torch.Tensor
    kv_lens: torch.Tensor
    block_table: torch.Tensor
    has_host_backed: bool = False


class DecodeRowsView(Protocol):
    """What the engine's decode step exposes (int32 [R] device tensors unless said otherwise)."""

    kind: torch.Tensor  # PAD -1 / DENSE 0 / RESIDENT 1 / HOST_BACKED 2
    slot: torch.Tensor  # block-table row
    sparse_slot: torch.Tensor  # sparse state row (the sentinel for other rows)
    t: torch.Tensor  # tokens once this step's token is written (0 for padding)
    write_page: torch.Tensor  # device page of this step's token (a host-backed request's tail page)
    write_host_page: torch.Tensor  # host page of this step's token (host-backed rows; -1 elsewhere)
    table: torch.Tensor  # int32 [R, W] the attention page table (dense rows filled by the engine)
    kv_lens: torch.Tensor  # int32 [R] tokens attended (dense rows filled by the engine)
    block_table: torch.Tensor  # int32 [max_seqs + 1, W] device page of each logical page
    has_host_backed: bool  # host-side: does any row have kind HOST_BACKED


@dataclass
class SparseTotals:
    """Counters since start; `misses` lives on the device and is read only when asked for."""

    decode_steps: int = 0
    request_steps: int = 0
    selected_per_layer: list[int] | None = None
    host_backed_selected_per_layer: list[int] | None = None   # the rows whose pages can miss
    peak_device_bytes_in_use: int = 0
    peak_host_bytes_in_use: int = 0


class SparseCoordinator:
    """Runs the sparse side of each step for the engine (see the module docstring)."""

    def __init__(self, config: SparseConfig, *, algorithm: BaseSparseAlgorithm, manager: SparseKVCacheManager,
                 adaptor: BackendAdaptor, windows: list[int | None], scale: float):
        """The engine builds the parts (`hisa.engine.llm_engine.build_sparse`) and hands them over.

        windows: per layer, the sliding window (Gemma-3's local layers, which take no part in
        selection: each step they attend to exactly their window's pages) or None; scale: the
        model's attention scale (prefill attention over the host pool uses it)."""
        self.config, self.algorithm, self.manager, self.adaptor = config, algorithm, manager, adaptor
        self.cache = manager.cache
        self.device = manager.device
        self.page_size = manager.page_size
        self.num_layers = manager.num_layers
        self.windows, self.scale = windows, scale
        self.max_pages = manager.max_pages
        self.host_allocator = manager.host.allocator
        self.buffer_pages = manager.ns + 1  # device pages of a host-backed request: LRU slots + the tail
        self.sink_pages = adaptor.sink_pages  # (a demotion keeps them in the buffer)
        self.residency = config.residency
        # the first dense_layers layers select nothing: their global layers read every page (resident rows)
        self.dense = [i < config.dense_layers and w is None for i, w in enumerate(self.windows)]
        self.totals = SparseTotals(selected_per_layer=[0] * self.num_layers,
                                   host_backed_selected_per_layer=[0] * self.num_layers)
        # token-level selection (DSA): pages the host-backed rows needed from their buffers, per layer
        # (data-dependent, so counted on the device and read only by summary())
        self._selected = torch.zeros(self.num_layers, dtype=torch.int64, device=self.device)
        # summary(blocking=False): pinned copies of the device counters, the copy in flight, the last landed
        self._counters_host: list[torch.Tensor] | None = None
        self._counters_copied: torch.cuda.Event | None = None
        self._counters_landed: list[list[int]] | None = None
        self._d: DecodeRowsView | None = None
        self._running: dict[int, object] = {}  # sparse slot -> the running request holding it
        # per layer: sparse slot -> tokens whose representations a resident prefill built
        self._represented: list[dict[int, int]] = [{} for _ in range(self.num_layers)]

    # -- lifecycle (called by the scheduler) ----------------------------------------------------
    @property
    def decodes_as_prefill(self) -> bool:
        """Whether a decode step's KV equals a prefill's: DSA's token-level selection is the model's own
        in both; page selection (quest, lowbit, oracle, streaming) attends less than a prefill does."""
        return self.algorithm.token_level

    def wants(self, seq) -> bool:
        return seq.num_prompt >= self.config.min_prompt_len

    def on_request_begin(self, seq) -> bool:
        """on_request_begin: take a sparse slot (False if none is free); a host-backed request gets its
        LRU buffer (seq.buffer_pages, already allocated by the scheduler)."""
        slot = self.manager.acquire_slot()
        if slot is None:
            return False
        seq.sparse_slot = slot
        self._running[slot] = seq
        if seq.host_backed:
            self.manager.begin_host_backed(slot, seq.buffer_pages)
        return True

    def on_request_end(self, seq) -> None:
        """on_request_end (finish, abort or preemption): the slot goes back; the scheduler frees pages."""
        self.manager.release_slot(seq.sparse_slot)
        self._running.pop(seq.sparse_slot, None)
        for built in self._represented:
            built.pop(seq.sparse_slot, None)
        seq.sparse_slot = None

    def apply_demotions(self, demoted) -> None:
        """Before a step: copy each demoted request's KV device -> host (scheduler.Demotion list)."""
        for d in demoted:
            seq = d.seq
            self.manager.demote(seq.sparse_slot, d.device_pages, seq.pages, seq.buffer_pages, d.holding)
            if d.copies:  # after the host copy: a copy may land on one of its own freed pages
                self.manager.copy_device_pages([src for src, _ in d.copies], [dst for _, dst in d.copies])
            if self.algorithm.token_level:  # DSA: a resident request's indexer keys lived in its device pages
                pages = torch.tensor(d.device_pages, dtype=torch.int64, device=self.device)
                for layer in range(self.num_layers):
                    keys = self.cache.index_keys(layer).index_select(0, pages)  # [P, S, ID]
                    self.algorithm.construct_representations(layer, seq.sparse_slot, 0, keys.reshape(-1, keys.shape[-1]))
            d.applied = True

    # -- prefill ------------------------------------------------------------------------------
    def prefill_resident(self, layer: int, seq, computed: int, n: int) -> None:
        """attention_end of a resident request's prefill chunk (the engine wrote its KV into device
        pages): build the representations of the pages the chunk touched, from the written keys; the
        first chunk after a shared prefix (pages the pool's prefix cache gave it) also builds those."""
        if self.windows[layer] is not None or not self.algorithm.selects or self.dense[layer]:
            return
        s = self.page_size
        first, last = self._unrepresented(layer, seq, computed, computed + n), -(-(computed + n) // s)
        pages = torch.tensor(seq.pages[first:last], dtype=torch.int64, device=self.device)
        keys = self.cache.keys(layer).index_select(0, pages).float()  # [P, S, KVH, D]
        keys = keys.reshape(-1, *keys.shape[2:])
        keys[computed + n - first * s:] = float("nan")  # slots past the written tokens
        self.algorithm.construct_representations(layer, seq.sparse_slot, first, keys)

    def _unrepresented(self, layer: int, seq, computed: int, total: int) -> int:
        """The first page of `seq` whose representation a prefill chunk over tokens [computed, total)
        builds in `layer`: the chunk's first page, or an earlier one when pages were given to the
        request with their KV (a shared prefix, an L3 load) and no chunk built theirs yet. Records
        that tokens up to `total` are represented."""
        built = self._represented[layer]
        first = min(computed, built.get(seq.sparse_slot, 0)) // self.page_size
        built[seq.sparse_slot] = total
        return first

    def prefill_host_backed(self, layer: int, seq, computed: int, q, k, v) -> torch.Tensor:
        """A host-backed request's prefill chunk: attend over the context read back from the host
        pool, write the chunk's pages to it (the last also to the tail page), build representations."""
        s, m = self.page_size, self.manager
        n = q.shape[0]
        total = computed + n
        kvh, d = k.shape[1], k.shape[2]
        first_page, last_page = computed // s, -(-total // s)
        if computed > 0:  # the context so far (I/O kernel: UVA gather of the layer's pages)
            prev = m.read_context(layer, seq.pages[: -(-computed // s)])  # [p, 2, S, KVH, D]
            k_all = torch.cat([prev[:, 0].reshape(-1, kvh, d)[:computed], k.to(prev.dtype)])
            v_all = torch.cat([prev[:, 1].reshape(-1, kvh, d)[:computed], v.to(prev.dtype)])
        else:
            k_all, v_all = k.to(self.cache.data.dtype), v.to(self.cache.data.dtype)
        out = prefill_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), scale=self.scale,
                                window=self.windows[layer])  # Gemma-3 sliding layers: their window only
        span, pad = slice(first_page * s, total), last_page * s - total
        kp = torch.nn.functional.pad(k_all[span], (0, 0, 0, 0, 0, pad))  # [P*S, KVH, D], whole pages
        vp = torch.nn.functional.pad(v_all[span], (0, 0, 0, 0, 0, pad))
        rows = torch.stack([kp.view(-1, s, kvh, d), vp.view(-1, s, kvh, d)], dim=1)  # [P, 2, S, KVH, D]
        m.write_pages(layer, rows.reshape(last_page - first_page, -1), seq.pages[first_page:last_page],
                      tail_page=seq.buffer_pages[-1])
        if self.windows[layer] is None and self.algorithm.selects and not self.dense[layer]:
            # the first chunk after a prefix shared or loaded into the host pool also builds the
            # prefix's (k_all holds the whole context then)
            first = self._unrepresented(layer, seq, computed, total)
            keys = torch.nn.functional.pad(k_all[first * s:total].float(), (0, 0, 0, 0, 0, pad), value=float("nan"))
            self.algorithm.construct_representations(layer, seq.sparse_slot, first, keys)
        self._warm_buffer(layer, seq, q[-1:], k_all, v_all, total)
        return out

    def _warm_buffer(self, layer: int, seq, q_last: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                     total: int) -> None:
        """Fill a host-backed request's LRU buffer in `layer` with the pages its first decode step will
        most likely read, from the prefill's K/V while it is still on the device: no PCIe, where an
        empty buffer would miss every page of that step (a quarter of a 48-step run's misses on
        SmolLM2). The list is the step's own layout at t = total + 1 (sinks, recent pages; a sliding
        layer's window), and in a selecting layer the middle pages the last prompt token's query ranks
        best: as many as the buffer has slots left (the first step's query is the next token's, so
        a wider list catches more of its picks). Only which pages are on the device changes: every
        page the step reads is still resolved by the diff, so outputs are the same either way. Only
        after the last chunk (decoding follows: a chunk that ends one token short of the prompt is the
        last when the request has output, its last token being a decode step's), with `warm_start` on."""
        last = total == seq.num_tokens or (total == seq.num_tokens - 1 and seq.num_output > 0)
        if not self.config.warm_start or not last:  # (a prompt's lone last token is a prefill chunk: `ModelRunner.run`)
            return
        s, a, m = self.page_size, self.adaptor, self.manager
        full = total // s  # whole pages: the one being written is the tail page, not the buffer's
        t = total + 1
        if self.windows[layer] is not None:
            first = max(0, t - a.window) // s
            pages = torch.arange(first, full, device=self.device)
        else:
            lo, hi = (min(b, full) for b in a.middle(t))  # (a prompt shorter than its sinks: pages past `full`)
            picks = min(hi - lo, max(0, m.ns - lo - (full - hi))) if self.algorithm.selects else 0
            parts = [torch.arange(lo, device=self.device)]
            if 0 < picks < hi - lo:
                i32 = dict(dtype=torch.int32, device=self.device)
                rows = DecodeRows(sparse_slots=torch.tensor([seq.sparse_slot], **i32), t=torch.tensor([t], **i32),
                                  lo=torch.tensor([lo], **i32), hi=torch.tensor([hi], **i32), num_select=picks,
                                  page_keys=lambda _layer: _whole_pages(k_all, full, s)[None])
                parts.append(self.algorithm.retrieve_topk(layer, q_last, rows)[0, :picks].long())
            elif picks:
                parts.append(torch.arange(lo, hi, device=self.device))
            parts.append(torch.arange(hi, full, device=self.device))
            pages = torch.cat(parts)
        count = min(pages.shape[0], m.ns)
        if count == 0:
            return
        pages = pages[-count:]  # (a window wider than the buffer: its newest pages)
        rows = torch.stack([_whole_pages(k_all, full, s).index_select(0, pages),
                            _whole_pages(v_all, full, s).index_select(0, pages)], dim=1)  # [count, 2, S, KVH, D]
        m.warm(layer, seq.sparse_slot, pages.to(torch.int32), rows.reshape(count, -1))

    def prefill_host_backed_mla(self, layer: int, seq, computed: int, rows: torch.Tensor,
                                index_keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A host-backed DSA request's prefill chunk (MLA): read the context's latent rows back from the
        host pool, write the chunk's pages to it (the last also to the tail page), put the chunk's
        indexer keys into the representation (device).

        rows: [n, W] the chunk's latent rows as the cache stores them (`MLAKVCache.pack`); index_keys:
        [n, KW] its indexer keys, stored likewise (`pack_index`; None on a layer without an indexer).
        Returns the whole context's stored latent rows [computed + n, W] and indexer keys
        [computed + n, KW] (None without), on the device, for the caller's attention."""
        s, m = self.page_size, self.manager
        n, width = rows.shape
        total = computed + n
        first_page, last_page = computed // s, -(-total // s)
        if computed > 0:  # the context so far (I/O kernel: UVA gather of the layer's pages)
            prev = m.read_context(layer, seq.pages[: -(-computed // s)]).reshape(-1, width)[:computed]
            latent = torch.cat([prev, rows.to(prev.dtype)])
        else:
            latent = rows.to(self.cache.dtype)
        pad = last_page * s - total
        span = torch.nn.functional.pad(latent[first_page * s:], (0, 0, 0, pad))  # [P * S, W], whole pages
        m.write_pages(layer, span.reshape(last_page - first_page, -1), seq.pages[first_page:last_page],
                      tail_page=seq.buffer_pages[-1])
        keys = None
        if index_keys is not None:
            prev_keys = self.algorithm.context_keys(layer, seq.sparse_slot, computed)
            keys = torch.cat([prev_keys, index_keys.to(prev_keys.dtype)])  # a copy: written back below
            self.algorithm.construct_representations(
                layer, seq.sparse_slot, first_page, torch.nn.functional.pad(keys[first_page * s:], (0, 0, 0, pad)))
        return latent, keys

    def warm_buffer_tokens(self, layer: int, seq, tokens: torch.Tensor | None, latent: torch.Tensor,
                           total: int) -> None:
        """DSA's `_warm_buffer`: after the last prefill chunk of a host-backed request (`total` tokens),
        fill its buffer in `layer` with the pages holding the last prompt token's picks (tokens: int
        [N] positions, -1 padded; None: it attended every token, and the newest whole pages go in),
        copied from the chunk's context rows `latent` [total, W] as stored. Device work only."""
        if not self.config.warm_start or total < seq.num_tokens - 1:  # (the last token may be a decode step's)
            return
        s, a, m = self.page_size, self.adaptor, self.manager
        full = total // s  # whole pages (the partial one is the tail page)
        if full == 0:
            return
        if tokens is None:
            logical = torch.arange(max(0, full - m.ns), full, dtype=torch.int32, device=self.device)
        else:
            t = torch.tensor([total + 1], dtype=torch.int32, device=self.device)  # the first decode step's
            logical = a.pages_or_pad(a.token_pages(tokens[None].to(torch.int32), t))[0, :m.ns]  # -1 padded
        rows = _whole_pages(latent, full, s).reshape(full, -1).index_select(0, logical.clamp(min=0).long())
        m.warm(layer, seq.sparse_slot, logical, rows)

    # -- one decode step ----------------------------------------------------------------------------
    def forward_begin(self, decode: DecodeRowsView) -> None:
        """Once per decode step, on the device (captured with the step): layout bounds, the LRU
        clock, the buffers the layers share."""
        self._d = d = decode
        self._bounds: LayoutBounds = self.adaptor.bounds(d.t, d.kind)
        self._rows = DecodeRows(sparse_slots=d.sparse_slot, t=d.t, lo=self._bounds.lo, hi=self._bounds.hi,
                                num_select=self.adaptor.num_select, page_keys=_weak_call(self._page_keys),
                                layout=self._layout(d))
        R = d.kind.shape[0]
        K = max(self.adaptor.budget_pages, self.adaptor.window_pages or 0)
        i32 = dict(dtype=torch.int32, device=self.device)
        self._logical = torch.empty(R, K, **i32)
        self._host_rows = (d.kind == HOST_BACKED).to(torch.uint8)
        if self.algorithm.token_level:  # select_tokens scores only the host-backed rows (length 0 elsewhere)
            self._select_rows = replace(self._rows, t=torch.where(self._host_rows.bool(), d.t, 0))
        self._miss = DiffResult(None, torch.empty(R, K, **i32), torch.empty(R, K, **i32), torch.empty(R, **i32))
        if d.has_host_backed:
            self.manager.clock.add_(1)

    def attention_begin(self, layer: int, q: torch.Tensor, rows: slice | None = None) -> None:
        """Before a layer's decode attention: select → compose → (host-backed) diff + load misses.
        Writes the sparse rows of the step's `table` and `kv_lens`.

        rows: only this contiguous range of the step's rows (q holds just those; a step without
        host-backed rows, whose rows are independent: the engine runs groups of rows on separate
        CUDA streams); None: every row."""
        windowed = self.windows[layer] is not None
        if rows is None:
            d, bounds, drows, logical = self._d, self._bounds, self._rows, self._logical
        else:
            d, bounds, drows, logical = self._row_group(rows)
        if self.dense[layer]:  # every page, as prepare_step laid the rows out (an earlier layer may have composed)
            resident = d.kind == RESIDENT
            d.table.copy_(torch.where(resident[:, None], d.block_table.index_select(0, d.slot.long()), d.table))
            d.kv_lens.copy_(torch.where(resident, d.t, d.kv_lens))
            return
        topk = None
        if not windowed and self.algorithm.selects and self.adaptor.num_select > 0:
            topk = self.algorithm.retrieve_topk(layer, q, drows)  # [R, num_select] logical
        K = self.adaptor.width(windowed)
        logical = logical[:, :K]
        if topk is None or drows.layout is None:  # (else the top-k kernel laid the rows out: TableLayout)
            self.adaptor.compose(kind=d.kind, slot=d.slot, t=d.t, write_page=d.write_page, bounds=bounds,
                                 topk=topk, block_table=d.block_table, table=d.table, logical=logical,
                                 kv_lens=d.kv_lens, windowed=windowed)
        if d.has_host_backed:
            miss = self._miss
            out = DiffResult(d.table[:, :K], miss.load_slots[:, :K], miss.load_pages[:, :K], miss.num_misses)
            self.manager.resolve(layer, logical=logical, active=self._host_rows, sparse_slots=d.sparse_slot,
                                 table=d.table, misses=out)
            nxt = layer + 1
            # sliding-window layers read the same window pages: the next one's list is known exactly;
            # a global layer's is only guessed from this one's (SparseConfig.prefetch)
            if nxt < self.num_layers and (self.windows[nxt] is not None and windowed
                                          or self.config.prefetch and self.windows[nxt] is None and not windowed):
                self.manager.prefetch(nxt, logical, active=self._host_rows, sparse_slots=d.sparse_slot)

    def _row_group(self, rows: slice):
        """Views of the step's row state restricted to `rows` (see attention_begin)."""
        d = self._d
        if d.has_host_backed:
            raise ValueError("a step with host-backed rows runs its sparse rows together (their loads share the "
                             "layer's buffers and counters)")
        b = self._bounds
        bounds = LayoutBounds(b.lo[rows], b.hi[rows], None if b.window_lo is None else b.window_lo[rows])
        view = _RowGroup(kind=d.kind[rows], slot=d.slot[rows], sparse_slot=d.sparse_slot[rows], t=d.t[rows],
                         write_page=d.write_page[rows], table=d.table[rows], kv_lens=d.kv_lens[rows],
                         block_table=d.block_table)
        drows = DecodeRows(sparse_slots=view.sparse_slot, t=view.t, lo=bounds.lo, hi=bounds.hi,
                           num_select=self.adaptor.num_select, page_keys=None, layout=self._layout(view))
        return view, bounds, drows, self._logical[rows]

    def _layout(self, d) -> TableLayout | None:
        """Where the algorithm's top-k may lay the resident rows out itself (no host-backed rows: their
        lists go to the diff), or None."""
        if d.has_host_backed or not self.algorithm.writes_layout:
            return None
        return TableLayout(kind=d.kind, slot=d.slot, t=d.t, block_table=d.block_table, table=d.table,
                           kv_lens=d.kv_lens, page_size=self.page_size)

    def attention_end(self, layer: int, k: torch.Tensor) -> None:
        """After a layer's decode attention: fold the new keys into the algorithm's representations."""
        if self.windows[layer] is None and self.algorithm.selects and not self.dense[layer]:
            self.algorithm.update_representations(layer, self._rows, k)

    # -- one decode step of a DSA model (token-level selection, MLA over latent rows) -----------------
    def write_through_mla(self, layer: int, rows: torch.Tensor, index_keys: torch.Tensor | None) -> None:
        """The decode rows' new latent rows [R, W] (as stored) to their host pages (host-backed rows; the
        engine wrote the tail page), their new indexer keys [R, KW] (as stored) to the representation."""
        d = self._d
        write_token_rows(rows, self.manager.host.layer_rows(layer), d.write_host_page, d.t, page_size=self.page_size)
        if index_keys is not None:
            self.algorithm.update_representations(layer, self._rows, index_keys)

    def select_tokens(self, layer: int, index) -> torch.Tensor:
        """retrieve_topk of the token-level algorithm (DSA's indexer over the representation) for every
        host-backed decode row: int32 [R, N] positions, -1 padded; every other row is scored as an empty
        context (no keys read) and gets -1s."""
        return self.algorithm.retrieve_topk(layer, index, self._select_rows)

    def attention_begin_tokens(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """Before a DSA layer's decode attention, for the host-backed rows: the pages holding the
        selected `tokens` (int32 [R, N]) → diff against the row's buffer + load the misses → the row's
        page table [buffer pages of the picks | tail page] and kv_len (K + 1) * S in the step's `table`
        / `kv_lens`. Returns the positions to attend: host-backed rows' remapped into that table, the
        other rows' unchanged. Device work only."""
        d, a = self._d, self.adaptor
        K = a.num_select
        host = self._host_rows.bool()
        pages = a.token_pages(tokens, d.t)  # [R, K] sorted, big-padded
        logical = self._logical[:, :K]
        logical.copy_(torch.where(host[:, None], a.pages_or_pad(pages), -1))
        table = d.table
        table[:, :K + 1].masked_fill_(host[:, None], -1)
        miss = self._miss
        out = DiffResult(table[:, :K], miss.load_slots[:, :K], miss.load_pages[:, :K], miss.num_misses)
        self.manager.resolve(layer, logical=logical, active=self._host_rows, sparse_slots=d.sparse_slot,
                             table=table, misses=out)
        table[:, K] = torch.where(host, d.write_page, table[:, K])
        d.kv_lens.copy_(torch.where(host, (K + 1) * self.page_size, d.kv_lens))
        self._selected[layer] += (logical >= 0).sum()
        if self.config.prefetch and layer + 1 < self.num_layers:  # guess: the next layer picks alike
            self.manager.prefetch(layer + 1, logical, active=self._host_rows, sparse_slots=d.sparse_slot)
        return torch.where(host[:, None], a.remap_tokens(tokens, pages, d.t), tokens)

    def forward_end(self, sparse_t: list[int], host_backed: list[bool]) -> None:
        """After a decode step: host-side counters (no sync). sparse_t: each sparse row's token count;
        host_backed: which of those rows are host-backed."""
        tot = self.totals
        tot.decode_steps += 1
        tot.request_steps += len(sparse_t)
        if not self.algorithm.token_level:  # token-level selection counts on the device (summary())
            host_t = [t for t, h in zip(sparse_t, host_backed) if h]
            for counts, rows in ((tot.selected_per_layer, sparse_t), (tot.host_backed_selected_per_layer, host_t)):
                if not rows:
                    continue
                sel = self.selected_pages(rows)
                every = sum(-(-t // self.page_size) for t in rows)  # a dense layer's pages
                for layer, w in enumerate(self.windows):
                    counts[layer] += every if self.dense[layer] else sel[w is not None]
        self.note_memory()

    def note_memory(self) -> None:
        """Update the peaks of device and host bytes in use (every step: forward_end on a step with sparse
        decode rows, the model runner on the others, so prefill-only steps are measured too)."""
        tot, mem = self.totals, self.memory()
        tot.peak_device_bytes_in_use = max(tot.peak_device_bytes_in_use,
                                           mem["device_kv_bytes_in_use"] + mem["metadata_bytes_in_use"])
        tot.peak_host_bytes_in_use = max(tot.peak_host_bytes_in_use, mem["host_bytes_in_use"])

    def selected_pages(self, sparse_t: list[int]) -> tuple[int, int]:
        """Pages attended in one step by rows of these token counts: (per global layer, per sliding layer)."""
        s, a = self.page_size, self.adaptor
        glob = slid = 0
        for t in sparse_t:
            n = -(-t // s)
            lo, hi = a.middle(t)
            glob += lo + min(hi - lo, a.num_select if self.algorithm.selects else 0) + (n - hi)
            if a.window is not None:
                slid += n - max(0, t - a.window) // s
        return glob, slid

    def _page_keys(self, layer: int) -> torch.Tensor:
        """Every row's context keys [R, P, S, KVH, D] (oracle): device pages for resident rows, the host
        pool for host-backed ones. Reads on the host: an eager-only path."""
        d = self._d
        kinds, slots, sslots, ts = (x.tolist() for x in (d.kind, d.slot, d.sparse_slot, d.t))
        P = max([-(-t // self.page_size) for t in ts] + [1])
        c = self.cache
        out = torch.zeros(len(ts), P, self.page_size, c.num_kv_heads, c.head_dim, dtype=c.data.dtype,
                          device=self.device)
        host = self.manager.host.layer_pages(layer)[:, 0]
        for r, (kd, sl, ss, t) in enumerate(zip(kinds, slots, sslots, ts)):
            n = -(-t // self.page_size)
            if kd == RESIDENT:
                out[r, :n] = c.keys(layer)[d.block_table[sl, :n].long()]
            elif kd == HOST_BACKED:
                hp = self.manager.host_table[ss, :n].long().to(host.device)
                out[r, :n] = host[hp].to(self.device)
        return out

    def drop_step_state(self) -> None:
        """Forget the last decode step's per-step objects (its view of the engine's decode batch and its
        DecodeRows), so nothing of a closed engine's step outlives close() (LLMEngine.close and deletion
        call it). DecodeRows reaches this coordinator only weakly (see _weak_call)."""
        self.__dict__.pop("_rows", None)
        self.__dict__.pop("_d", None)

    # -- accounting ---------------------------------------------------------------------------
    def _device_counters(self, blocking: bool) -> tuple[list[int], list[int], list[int] | None]:
        """(misses per layer, prefetched per layer, DSA's selected pages per layer or None) from the
        device counters. `blocking`: read them now (a sync on CUDA). Else (CUDA): the values of the
        last copy of them that has landed, a copy into pinned memory being issued when none is in
        flight, so the caller never waits on the device (the server reads these at every step, while
        a step runs: a sync there would serialize the overlapped host work); zeros before the first lands."""
        tensors = [self.manager.misses, self.manager.prefetched]
        if self.algorithm.token_level:
            tensors.append(self._selected)
        if blocking or self.device.type != "cuda":
            values = [t.tolist() for t in tensors]
        else:
            if self._counters_copied is not None and self._counters_copied.query():
                self._counters_landed = [h.tolist() for h in self._counters_host]
                self._counters_copied = None
            if self._counters_copied is None:
                if self._counters_host is None:
                    self._counters_host = [torch.zeros(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
                for h, t in zip(self._counters_host, tensors):
                    h.copy_(t, non_blocking=True)
                self._counters_copied = torch.cuda.Event()
                self._counters_copied.record()
            values = self._counters_landed or [[0] * t.numel() for t in tensors]
        return values[0], values[1], values[2] if self.algorithm.token_level else None

    def summary(self, *, blocking: bool = True) -> dict:
        """Totals since start (peaks for bytes in use) and per-step means; what `--stats` prints.
        Reads the device miss counters (a sync): call it between steps, not inside one; or with
        `blocking=False` (the server's gauges, at every step) take their last copy that has landed,
        which lags a step or so behind the host-side totals (`_device_counters`).

        Pages are one layer's device page (`bytes_h2d` = pages loaded x its bytes). `selected_pages`
        counts the pages every sparse row attended; hits, misses and `hit_rate` are those of the
        host-backed rows' buffers (`host_backed_selected_pages` = hits + misses): a resident row has
        every page on the device and can neither hit nor miss, so counting its pages as hits would
        flatter the buffer. For a token-level algorithm (DSA), both count the distinct pages of the
        host-backed rows' picks that had to be in the buffer (the tail page excluded)."""
        t = self.totals
        misses_per_layer, prefetched_per_layer, device_selected = self._device_counters(blocking)
        if self.algorithm.token_level:
            selected_per_layer = host_per_layer = device_selected
        else:
            selected_per_layer, host_per_layer = list(t.selected_per_layer), list(t.host_backed_selected_per_layer)
        misses, selected, host_selected = sum(misses_per_layer), sum(selected_per_layer), sum(host_per_layer)
        prefetched = sum(prefetched_per_layer)
        row = self.manager.row_bytes
        steps = t.decode_steps
        loaded = misses + prefetched
        return {
            "algorithm": self.config.algorithm, "decode_steps": steps, "request_steps": t.request_steps,
            "selected_pages": selected, "host_backed_selected_pages": host_selected,
            "hits": host_selected - misses, "misses": misses,
            "hit_rate": (host_selected - misses) / host_selected if host_selected else 1.0,
            "prefetched_pages": prefetched,  # loaded ahead on a side stream (not counted as misses)
            "bytes_h2d": loaded * row, "bytes_h2d_per_step": loaded * row / steps if steps else 0.0,
            "misses_per_layer": misses_per_layer, "selected_per_layer": selected_per_layer,
            "host_backed_selected_per_layer": host_per_layer,
            "peak_device_bytes_in_use": t.peak_device_bytes_in_use, "peak_host_bytes_in_use": t.peak_host_bytes_in_use,
            "device_kv_bytes_per_host_backed_request": self.manager.device_kv_bytes_per_request(),
            **self.memory(),
        }

    def device_bytes(self, seq) -> dict[str, int]:
        """Device bytes one sparse request holds: its KV pages (all, or its buffer) and its representations."""
        page = self.manager.device_page_bytes
        held = len(seq.buffer_pages) if seq.host_backed else len(seq.pages)
        return {"kv": held * page, "metadata": len(seq.pages) * self.algorithm.metadata_bytes_per_page()}

    def memory(self) -> dict[str, int]:
        """Host pool size and use; device KV and representation bytes of the running sparse requests."""
        m = self.manager
        held = [self.device_bytes(seq) for seq in self._running.values()]
        # device KV pages held, each once: resident requests share their cached prefix pages
        resident = _distinct_pages([seq.pages for seq in self._running.values() if not seq.host_backed])
        buffers = sum(len(seq.buffer_pages) for seq in self._running.values() if seq.host_backed)
        return {
            "host_pool_bytes": m.host.nbytes,
            "host_bytes_in_use": m.host.allocator.num_used * m.host.page_bytes,
            "device_kv_bytes_in_use": (resident + buffers) * m.device_page_bytes,
            "metadata_bytes": (m.max_requests + 1) * self.max_pages * self.algorithm.metadata_bytes_per_page(),
            "metadata_bytes_in_use": sum(h["metadata"] for h in held),
            "host_backed_requests": sum(1 for seq in self._running.values() if seq.host_backed),
            "resident_requests": sum(1 for seq in self._running.values() if not seq.host_backed),
        }


def _distinct_pages(page_lists: list[list[int]]) -> int:
    """Distinct pages of requests' page lists, without a set of every page (this runs at every step).

    Requests share pages only through the prefix cache, which shares a *leading* run: two lists that
    hold one page hold it at the same index and agree before it. So lists that differ in their first
    page share nothing, and a list adds its pages past its longest common prefix with the lists before
    it (found by bisection): O(requests^2 log pages) among requests sharing a first page, else O(1) each."""
    groups: dict[int, list[list[int]]] = {}
    for pages in page_lists:
        if pages:
            groups.setdefault(pages[0], []).append(pages)
    total = 0
    for group in groups.values():
        total += len(group[0])
        for i in range(1, len(group)):
            total += len(group[i]) - max(_common_prefix(group[i], other) for other in group[:i])
    return total


def _common_prefix(a: list[int], b: list[int]) -> int:
    lo, hi = 0, min(len(a), len(b))   # invariant: a[:lo] == b[:lo]; equality is a leading run
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _weak_call(method):
    """`method` (bound) as a function that holds its object weakly: the step's DecodeRows keeps it,
    and a strong reference would be a coordinator -> DecodeRows -> coordinator cycle that keeps a
    dropped engine's pools alive until the garbage collector runs."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        return ref()(*args, **kwargs)

    return call


def _whole_pages(x: torch.Tensor, pages: int, page_size: int) -> torch.Tensor:
    """The first `pages` whole pages of per-token rows x [T, ...] as [pages, page_size, ...]."""
    return x[: pages * page_size].reshape(pages, page_size, *x.shape[1:])
