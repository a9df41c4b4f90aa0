"""SparseCoordinator: the request lifecycle and the per-step order of calls of the sparse cache.

Hooks, in order: on_request_begin (admission: a device-buffer slot) → prefill (attention over the
host pool, KV written to it layer by layer; attention_end builds representations) → each decode
step: forward_begin → per layer attention_begin (retrieve top-k → diff → load misses → adapt the
page table) → attention → attention_end (update representations) → forward_end (offload the new
tokens, collect stats) → on_request_end (free host pages and the buffer slot).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from hisa.attention.paged_decode import paged_decode_attention
from hisa.attention.prefill import prefill_attention
from hisa.engine.cuda_graph import width_bucket
from hisa.engine.sequence import Sequence
from hisa.kvcache.io import load_pages, store_pages
from hisa.kvcache.manager import SparseKVCacheManager, SparseStepStats
from hisa.sparse.adaptor import BackendAdaptor
from hisa.sparse.base import SelectionContext, create_algorithm
from hisa.sparse.config import SparseConfig


@dataclass
class _DecodePlan:
    rows: torch.Tensor  # int64 [R] token rows in the step
    slots: torch.Tensor  # int64 [R] device-buffer slot of each request
    active: torch.Tensor  # bool [max_requests]
    template: torch.Tensor  # int64 [R, K]
    kv_lens: torch.Tensor  # int32 [R]
    current_index: torch.Tensor  # int64 [R] position of the written page in the row's list
    current_host_page: torch.Tensor  # int64 [R] host page of the new token
    current_offset: torch.Tensor  # int64 [R] its slot within the page
    middle_end: torch.Tensor  # int64 [R]
    num_tokens: torch.Tensor  # int64 [R]
    table_width: int
    host_pages_cpu: torch.Tensor  # int64 [R] (for the offload at forward_end)
    offsets_cpu: torch.Tensor
    num_selected: int  # pages attended per layer, summed over the rows
    # Gemma-3 sliding layers (None when the model has none): see SparseCoordinator._window_rows
    window_table: torch.Tensor | None = None  # int32 [R, window_pages] the window's logical pages, -1 padded
    window_kv_lens: torch.Tensor | None = None  # int32 [R]
    window_current_index: torch.Tensor | None = None  # int64 [R]
    window_num_selected: int = 0


# the _DecodePlan fields that live on the device (a captured decode step reads these tensors)
_DEVICE_PLAN_FIELDS = ("rows", "slots", "active", "template", "kv_lens", "current_index", "current_host_page",
                       "current_offset", "middle_end", "num_tokens", "window_table", "window_kv_lens",
                       "window_current_index")


class SparseCoordinator:
    """Runs attention for the sparse requests of each step (and delegates dense ones)."""

    def __init__(self, config: SparseConfig, *, model_config, page_size: int, max_model_len: int,
                 dtype: torch.dtype, device: torch.device, collect_stats: bool = True):
        self.config, self.page_size, self.device = config, page_size, device
        mc = model_config
        self.num_layers = mc.num_layers
        self.scale = mc.attention_scale  # Gemma-3: query_pre_attn_scalar ** -0.5; else head_dim ** -0.5
        # Gemma-3 sliding-window layers (None = a global layer). They take no part in sparse
        # selection: each step they attend to exactly the pages of their window, through the same
        # buffer (consecutive windows share all pages but the newest, so they hit), and the kernel
        # masks the tokens of the first page that fall before the window.
        self.windows = mc.layer_windows
        widest = max((w for w in self.windows if w is not None), default=None)
        self.window_pages = None if widest is None else (widest - 1) // page_size + 2  # pages a window can touch
        budget_pages = config.budget_pages(page_size)  # validates the budget
        self.adaptor = BackendAdaptor(page_size=page_size, sink_pages=config.sink_pages,
                                      recent_pages=config.recent_pages, budget_pages=budget_pages)
        elt = torch.empty((), dtype=dtype).element_size()
        page_bytes = mc.num_layers * 2 * page_size * mc.num_kv_heads * mc.head_dim * elt
        host_pages = int(config.host_pool_gb * 2**30 // page_bytes)
        max_pages = -(-max_model_len // page_size)
        if host_pages < max_pages:
            from hisa.errors import ConfigError

            raise ConfigError(f"host_pool_gb={config.host_pool_gb} holds {host_pages * page_size} tokens, less than "
                              f"one request of max_model_len={max_model_len}; raise --host-pool-gb")
        self.manager = SparseKVCacheManager(
            num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, page_size=page_size,
            # a window's pages must all fit in the buffer (the LRU diff needs K <= slots)
            buffer_slots=max(config.buffer_slots(page_size), self.window_pages or 0),
            max_requests=config.max_sparse_requests,
            max_pages=max_pages, host_pages=host_pages, dtype=dtype, device=device, offload=config.offload)
        self.algorithm = create_algorithm(
            config.algorithm, num_layers=mc.num_layers, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim, page_size=page_size, num_host_pages=host_pages, device=device, dtype=dtype)
        self.host_allocator = self.manager.host.allocator
        self.collect_stats = collect_stats
        self.history: deque[SparseStepStats] = deque(maxlen=100_000)
        self.totals = SparseStepStats(misses_per_layer=[0] * mc.num_layers,
                                      selected_per_layer=[0] * mc.num_layers)
        self._kv_token_bytes = 2 * mc.num_kv_heads * mc.head_dim * elt  # K+V of one token, one layer
        # set by hisa.engine.cuda_graph when decode steps are captured: round the table width up
        # (width_bucket) so a captured step serves many steps; eager runs read exact widths
        self.round_table_widths = False

    # -- lifecycle (called by the scheduler) ----------------------------------------------------
    def wants(self, seq: Sequence) -> bool:
        return seq.num_prompt >= self.config.min_prompt_len

    def on_request_begin(self, seq: Sequence) -> bool:
        """on_request_begin: take a device-buffer slot (False if none is free)."""
        slot = self.manager.acquire_slot()
        if slot is None:
            return False
        seq.sparse_slot, seq.host_pages_synced = slot, 0
        return True

    def on_request_end(self, seq: Sequence) -> None:
        """on_request_end (finish, abort or preemption): the slot goes back; the scheduler frees pages."""
        self.manager.release_slot(seq.sparse_slot)
        seq.sparse_slot, seq.host_pages_synced = None, 0

    # -- one step -------------------------------------------------------------------------------
    def forward_begin(self, batch, plan, dense) -> "SparseCoordinator":
        """Plan the step's sparse work (host side, once) and return self as the step's attention."""
        self._dense, self._plan = dense, plan
        self._prefills: list[tuple[int, int, Sequence, int]] = []
        decode: list[tuple[int, Sequence]] = []
        for seq, n, row in zip(batch.seqs, batch.num_new_tokens, plan.row_starts):
            if not seq.sparse:
                continue
            if seq.host_pages_synced < len(seq.pages):  # new host pages → the device-side table
                self.manager.set_host_pages(seq.sparse_slot, seq.host_pages_synced, seq.pages[seq.host_pages_synced:])
                seq.host_pages_synced = len(seq.pages)
            if n == 1 and seq.num_computed > 0:
                decode.append((row, seq))
            else:
                self._prefills.append((row, row + n, seq, seq.num_computed))
        self._decode = self._plan_decode(decode) if decode else None
        # the step's new (k, v) rows, one pair per layer, offloaded at forward_end; and the pages loaded
        # per layer (int64 [layers], on the device). A captured step swaps in its own (hisa.engine.cuda_graph).
        self.staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.misses = torch.zeros(self.num_layers, dtype=torch.int64, device=self.device)
        self.manager.tick()
        return self

    def _plan_decode(self, decode: list[tuple[int, Sequence]]) -> _DecodePlan:
        s = self.page_size
        rows, slots, templates, kv_lens, cur_idx, cur_hp, cur_off, mid_end, ntok = ([] for _ in range(9))
        width = 0
        for row, seq in decode:
            t = seq.num_computed + 1  # tokens once this one is written
            template, middle_end, kv_len, ci = self.adaptor.layout(t)
            rows.append(row), slots.append(seq.sparse_slot), templates.append(template)
            kv_lens.append(kv_len), cur_idx.append(ci), mid_end.append(middle_end), ntok.append(t)
            cur_hp.append(seq.pages[(t - 1) // s]), cur_off.append((t - 1) % s)
            width = max(width, -(-t // s))
        if self.round_table_widths:
            width = width_bucket(width, self.manager.max_pages)
        active = torch.zeros(self.manager.max_requests, dtype=torch.bool)
        active[slots] = True

        def dev(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        window = {}
        if self.window_pages is not None:
            w_tables, w_lens, w_cur = self._window_rows(ntok)
            window = dict(window_table=dev(w_tables, torch.int32), window_kv_lens=dev(w_lens, torch.int32),
                          window_current_index=dev(w_cur),
                          window_num_selected=sum(sum(1 for p in t if p != -1) for t in w_tables))
        return _DecodePlan(
            rows=dev(rows), slots=dev(slots), active=active.to(self.device), template=dev(templates),
            kv_lens=dev(kv_lens, torch.int32), current_index=dev(cur_idx), current_host_page=dev(cur_hp),
            current_offset=dev(cur_off), middle_end=dev(mid_end), num_tokens=dev(ntok), table_width=width,
            host_pages_cpu=torch.tensor(cur_hp), offsets_cpu=torch.tensor(cur_off),
            num_selected=sum(sum(1 for p in t if p != -1) for t in templates), **window)

    @property
    def graph_safe(self) -> bool:
        """Whether this step's sparse decode can be captured in a CUDA graph (the algorithm's own say)."""
        return self.algorithm.graph_safe

    @property
    def decode_plan(self) -> _DecodePlan | None:
        return self._decode

    def graph_key(self) -> tuple[int, int] | None:
        """(rows, table width) of this step's sparse decode: the shapes a captured step is tied to."""
        d = self._decode
        return None if d is None else (int(d.rows.shape[0]), d.table_width)

    def bind_decode_state(self, plan: _DecodePlan, misses: torch.Tensor) -> None:
        """Make `plan` and `misses` (the tensors a captured step reads and writes) this step's.

        Before a replay: the step's freshly planned values are copied into `plan`'s tensors (same
        shapes: the graph key matched); host-side fields come from the fresh plan. `misses` is zeroed.
        """
        fresh = self._decode
        for name in _DEVICE_PLAN_FIELDS:
            dst = getattr(plan, name)
            if dst is not None:
                dst.copy_(getattr(fresh, name), non_blocking=True)
        plan.host_pages_cpu, plan.offsets_cpu = fresh.host_pages_cpu, fresh.offsets_cpu
        plan.num_selected, plan.window_num_selected = fresh.num_selected, fresh.window_num_selected
        self._decode = plan
        misses.zero_()
        self.misses = misses

    def _window_rows(self, num_tokens: list[int]) -> tuple[list[list[int]], list[int], list[int]]:
        """Sliding layers: per row, the logical pages holding the last `window` tokens, in order.

        The pages run up to the current (partial) one, so the kernel's virtual sequence ends at
        the newest token and `window=` cuts it exactly at position num_tokens - window. Returns
        (tables padded with -1 to window_pages, kv_lens, current_index); one window for all sliding
        layers (Gemma-3 has one size).
        """
        s, widest = self.page_size, max(w for w in self.windows if w is not None)
        tables, lens, cur = [], [], []
        for t in num_tokens:
            first, last = max(0, t - widest) // s, (t - 1) // s
            pages = list(range(first, last + 1))
            tables.append(pages + [-1] * (self.window_pages - len(pages)))
            lens.append(t - first * s)
            cur.append(len(pages) - 1)
        return tables, lens, cur

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The model's attention call for one layer: dense rows, sparse prefills, sparse decodes."""
        out = torch.empty_like(q)  # [T, H, D]
        self._dense.forward_rows(layer, q, k, v, out)
        for start, end, seq, computed in self._prefills:
            out[start:end] = self._prefill(layer, seq, computed, q[start:end], k[start:end], v[start:end])
        if self._decode is not None:
            d = self._decode
            out[d.rows] = self._decode_layer(layer, q[d.rows], k[d.rows], v[d.rows])
        return out

    # -- prefill: attend over the host pool, write the chunk back to it, build representations ----
    def _prefill(self, layer, seq, computed, q, k, v):
        s, pool = self.page_size, self.manager.host
        n = q.shape[0]
        total = computed + n
        kvh, d = k.shape[1], k.shape[2]
        first_page = computed // s  # the page the chunk starts in (maybe partly written already)
        last_page = -(-total // s)
        pages = torch.tensor(seq.pages[:last_page], dtype=torch.int64)
        prev = None
        if computed > 0:  # the context so far, read back from the host pool (I/O kernel: UVA gather)
            src = pages[: -(-computed // s)].to(self.device)
            rows = torch.empty(src.numel(), pool.row, dtype=pool.data.dtype, device=self.device)
            load_pages(pool.layer_rows(layer), rows, src, torch.arange(src.numel(), device=self.device))
            prev = rows.view(-1, 2, s, kvh, d)  # [p, 2, S, KVH, D]
        if prev is not None:
            k_all = torch.cat([prev[:, 0].reshape(-1, kvh, d)[:computed], k.to(prev.dtype)])
            v_all = torch.cat([prev[:, 1].reshape(-1, kvh, d)[:computed], v.to(prev.dtype)])
        else:
            k_all, v_all = k.to(pool.data.dtype), v.to(pool.data.dtype)
        out = prefill_attention(q, k_all.to(q.dtype), v_all.to(q.dtype), scale=self.scale,
                                window=self.windows[layer])  # Gemma-3 sliding layers: their window only
        # the pages this chunk touched, padded to whole pages: written back as rows
        span = slice(first_page * s, total)
        pad = last_page * s - total
        kp = torch.nn.functional.pad(k_all[span], (0, 0, 0, 0, 0, pad))  # [P*S, KVH, D]
        vp = torch.nn.functional.pad(v_all[span], (0, 0, 0, 0, 0, pad))
        rows = torch.stack([kp.view(-1, s, kvh, d), vp.view(-1, s, kvh, d)], dim=1)  # [P, 2, S, KVH, D]
        touched = pages[first_page:last_page]
        dst = touched.to(self.device)  # offload the chunk's pages (I/O kernel: UVA scatter when pinned)
        store_pages(rows.reshape(len(touched), -1).to(pool.data.dtype), pool.layer_rows(layer),
                    torch.arange(len(touched), device=self.device), dst)
        keys = torch.nn.functional.pad(k_all[span].float(), (0, 0, 0, 0, 0, pad), value=float("nan"))
        self.algorithm.construct_representations(layer, touched.to(self.device), keys)  # attention_end
        return out

    # -- decode: the hot path ----------------------------------------------------------------------
    def _decode_layer(self, layer, q, k, v):
        table, kv_lens = self.attention_begin(layer, q, k, v)
        buf = self.manager.buffer_pages_view(layer)  # [slots, 2, S, KVH, D]
        out = paged_decode_attention(q, buf[:, 0], buf[:, 1], table, kv_lens, scale=self.scale,
                                     window=self.windows[layer])
        self.attention_end(layer, k)
        return out

    def attention_begin(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Before a layer's decode attention: select → compose → diff → load misses → physical page
        table; write the new token into its (resident) page slot. Returns (table int32 [R, K], kv_lens)."""
        d, m = self._decode, self.manager
        window = self.windows[layer]
        kv_lens, current_index = d.kv_lens, d.current_index
        if window is not None:  # Gemma-3 sliding layer: no selection, its window's pages
            topk, kv_lens, current_index = d.window_table, d.window_kv_lens, d.window_current_index
        else:
            host_table = m.host_table[d.slots, : d.table_width]  # [R, P]
            ctx = SelectionContext(host_table=host_table, middle_start=self.adaptor.sink_pages,
                                   middle_end=d.middle_end, num_select=self.adaptor.num_select,
                                   host_keys=m.host.layer_pages(layer)[:, 0], num_valid_tokens=d.num_tokens)
            middle = self.algorithm.retrieve_topk(layer, q, ctx)  # [R, num_select] logical, -1 padded
            topk = self.adaptor.compose(d.template, middle)  # int32 [R, K]
        full = torch.full((m.max_requests, topk.shape[1]), -1, dtype=torch.int32, device=self.device)
        full[d.slots] = topk
        physical, misses = m.load(layer, full, d.active)
        table = physical[d.slots]  # int32 [R, K] slots of the layer's device buffer
        cur = table.gather(1, current_index[:, None])[:, 0].long()  # the current page is recent: resident
        buf = m.buffer_pages_view(layer)
        kb, vb = k.to(buf.dtype), v.to(buf.dtype)
        buf[cur, 0, d.current_offset] = kb
        buf[cur, 1, d.current_offset] = vb
        self.staged.append((kb, vb))  # offloaded to the host pool at forward_end
        if self.collect_stats:
            self.misses[layer] += misses[d.slots].sum()
        return table, kv_lens

    def attention_end(self, layer: int, k: torch.Tensor) -> None:
        """After a layer's decode attention: fold the new keys into the algorithm's representations."""
        d = self._decode
        self.algorithm.update_representations(layer, d.current_host_page, d.current_offset, k)

    def forward_end(self) -> None:
        """Offload the step's new tokens to the host pool; record stats."""
        d = self._decode
        if d is None:
            return
        pool = self.manager.host
        k = torch.stack([kv[0] for kv in self.staged])  # [L, R, KVH, D]
        v = torch.stack([kv[1] for kv in self.staged])
        k, v = k.to(pool.data.device), v.to(pool.data.device)  # one small D2H per step
        hp, off = d.host_pages_cpu.to(pool.data.device), d.offsets_cpu.to(pool.data.device)
        view = pool.data.view(pool.data.shape[0], pool.data.shape[1], 2, self.page_size, k.shape[2], k.shape[3])
        view[:, hp, 0, off] = k
        view[:, hp, 1, off] = v
        if self.collect_stats:
            self._record(d, k)

    def _record(self, d: _DecodePlan, k: torch.Tensor) -> None:
        misses = self.misses.tolist()
        selected = [d.num_selected if w is None else d.window_num_selected for w in self.windows]
        page_row = self.manager.row_bytes
        mem = self.memory()
        stats = SparseStepStats(
            requests=len(d.rows), selected_pages=sum(selected), misses=sum(misses),
            hits=sum(selected) - sum(misses), bytes_h2d=sum(misses) * page_row,
            bytes_d2h=k.numel() * 2 * k.element_size(), misses_per_layer=misses, selected_per_layer=selected,
            device_bytes_in_use=mem["device_buffer_bytes_in_use"] + mem["metadata_bytes_in_use"],
            host_bytes_in_use=mem["host_bytes_in_use"])
        self.history.append(stats)
        t = self.totals
        t.device_bytes_in_use = max(t.device_bytes_in_use, stats.device_bytes_in_use)  # totals keep the peak
        t.host_bytes_in_use = max(t.host_bytes_in_use, stats.host_bytes_in_use)
        t.requests += stats.requests
        t.selected_pages += stats.selected_pages
        t.hits += stats.hits
        t.misses += stats.misses
        t.bytes_h2d += stats.bytes_h2d
        t.bytes_d2h += stats.bytes_d2h
        t.misses_per_layer = [a + b for a, b in zip(t.misses_per_layer, misses)]
        t.selected_per_layer = [a + b for a, b in zip(t.selected_per_layer, selected)]

    # -- accounting ---------------------------------------------------------------------------
    def summary(self) -> dict:
        """Totals since start (peaks for bytes in use) and per-step means; what `--stats` prints."""
        t, steps = self.totals, len(self.history)
        return {
            "algorithm": self.config.algorithm, "decode_steps": steps, "request_steps": t.requests,
            "selected_pages": t.selected_pages, "hits": t.hits, "misses": t.misses, "hit_rate": t.hit_rate,
            "bytes_h2d": t.bytes_h2d, "bytes_d2h": t.bytes_d2h,
            "bytes_h2d_per_step": t.bytes_h2d / steps if steps else 0.0,
            "misses_per_layer": t.misses_per_layer, "selected_per_layer": t.selected_per_layer,
            "peak_device_bytes_in_use": t.device_bytes_in_use, "peak_host_bytes_in_use": t.host_bytes_in_use,
            "device_kv_bytes_per_request": self.manager.device_kv_bytes_per_request(),
            **self.memory(),
        }

    def device_bytes(self, seq: Sequence) -> dict[str, int]:
        """Device bytes one sparse request holds: its KV buffer and its representations."""
        return {"kv_buffer": self.manager.device_kv_bytes_per_request(),
                "metadata": len(seq.pages) * self.algorithm.metadata_bytes_per_page()}

    def memory(self) -> dict[str, int]:
        m = self.manager
        return {
            "host_pool_bytes": m.host.nbytes,
            "host_bytes_in_use": m.host.allocator.num_used * m.host.page_bytes,
            "device_buffer_bytes": m.buffer_kv.numel() * m.buffer_kv.element_size(),
            "device_buffer_bytes_in_use": (m.max_requests - m.num_free_slots) * m.device_kv_bytes_per_request(),
            "metadata_bytes_in_use": m.host.allocator.num_used * self.algorithm.metadata_bytes_per_page(),
        }
