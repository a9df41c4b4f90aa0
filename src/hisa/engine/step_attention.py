"""The model's attention for one engine step: the decode rows, batched, then each prefill chunk.

The model calls `forward(layer, q, k, v)` once per layer with every token of the step, decode rows
first. For the decode rows (one token each, dense and sparse alike) a layer is a few launches:
write the new K/V (device page, and host page for host-backed requests), the sparse
coordinator's attention_begin for the sparse rows (select, compose, diff + load misses), one paged
decode attention over the step's page table, attention_end (update representations). Prefill
chunks run per request: dense and resident-sparse chunks over their device pages, host-backed
chunks over the host pool (the coordinator).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from hisa.attention.paged_decode import default_num_splits, paged_decode_attention
from hisa.attention.prefill import gather_pages, prefill_attention
from hisa.engine.cpu_decode_kv import CpuDecodeStep
from hisa.engine.decode_batch import DecodeView
from hisa.kvcache.paged_cache import PagedKVCache
from hisa.kvcache.write import write_token_kv


@dataclass
class PrefillChunk:
    """One request's prefill chunk: rows [start, end) of the step, after `computed` cached tokens."""

    start: int
    end: int
    seq: object  # hisa.engine.sequence.Sequence
    computed: int
    pages: torch.Tensor | None = None  # int64 [n] its device pages up to the chunk's end (dense / resident)
    write_pages: torch.Tensor | None = None  # int64 [end - start] device page of each new token
    write_offsets: torch.Tensor | None = None  # int64 [end - start] its slot within that page


class StepAttention:
    """Attention of one step (see the module docstring). `decode` None: no decode rows."""

    def __init__(self, *, cache: PagedKVCache, scale: float, windows: list[int | None], decode: DecodeView | None,
                 prefills: list[PrefillChunk], sparse=None, cpu_kv: CpuDecodeStep | None = None):
        self.cache, self.scale, self.windows = cache, scale, windows
        self.decode, self.prefills, self.sparse = decode, prefills, sparse
        self.cpu_kv = cpu_kv  # CPU: the dense rows that attend over their contiguous copy
        self._host = sparse.manager.host if sparse is not None else None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.decode.n if self.decode is not None else 0
        if not self.prefills:
            return self._decode(layer, q, k, v)
        out = torch.empty_like(q)  # [T, H, D]
        if n:
            out[:n] = self._decode(layer, q[:n], k[:n], v[:n])
        for c in self.prefills:
            rows = slice(c.start, c.end)
            out[rows] = self._prefill(layer, c, q[rows], k[rows], v[rows])
        return out

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d = self.decode
        host = d.has_host_backed
        groups = self._row_groups(q)
        if groups:
            return self._decode_streams(layer, q, k, v, groups)
        write_token_kv(k, v, self.cache.layer_rows(layer), d.write_page, d.t, page_size=self.cache.page_size,
                       host_rows=self._host.layer_rows(layer) if host else None,
                       host_pages=d.write_host_page if host else None)
        if d.has_sparse:
            self.sparse.attention_begin(layer, q)  # the sparse rows' page lists (and their loads)
        if self.cpu_kv is not None:
            out = self.cpu_kv.attend(layer, q, k, v, self.cache.keys(layer), self.cache.values(layer), d.table,
                                     d.kv_lens, scale=self.scale, window=self.windows[layer],
                                     paged=paged_decode_attention)
        else:
            out = paged_decode_attention(q, self.cache.keys(layer), self.cache.values(layer), d.table, d.kv_lens,
                                         scale=self.scale, window=self.windows[layer])
        if d.has_sparse:
            self.sparse.attention_end(layer, k)
        return out

    def _row_groups(self, q: torch.Tensor) -> list[slice]:
        """The row groups of a decode step captured in a CUDA graph whose sparse rows are all resident
        (SparseConfig.decode_streams > 1), else [] (one stream, the order above)."""
        d, sp = self.decode, self.sparse
        if sp is None or not d.has_sparse or d.has_host_backed or not q.is_cuda:
            return []
        n = min(sp.config.decode_streams, q.shape[0])
        if n < 2:
            return []
        _streams(q.device, n)  # made by the eager run that precedes a shape's capture, not during it
        if not torch.cuda.is_current_stream_capturing():
            return []
        bounds = [q.shape[0] * i // n for i in range(n + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def _decode_streams(self, layer: int, q, k, v, groups: list[slice]) -> torch.Tensor:
        """A resident sparse step's layer on several streams (captured): the new K/V and the
        representations' update on one side stream, each row group's selection → compose → attention
        on its own, joined before the output projection. The rows are independent, so their chains of
        small latency-bound kernels (page logits, scores, top-k, compose, split attention) overlap
        instead of running one after another. The update writes only the current page's
        representation, which no selection reads (it is a recent page), so it runs beside them."""
        d, cache = self.decode, self.cache
        cuda = q.is_cuda  # (off CUDA the groups run one after another: the same results, for the tests)
        main = torch.cuda.current_stream() if cuda else None
        side = _streams(q.device, len(groups)) if cuda else [None] * len(groups)
        for s in side if cuda else ():
            s.wait_stream(main)
        with _on(side[0]):
            write_token_kv(k, v, cache.layer_rows(layer), d.write_page, d.t, page_size=cache.page_size)
            self.sparse.attention_end(layer, k)
        out = torch.empty_like(q)
        # each group's split count as for the whole batch: together they fill the GPU's one wave
        attended, window = d.table.shape[1] * cache.page_size, self.windows[layer]
        splits = default_num_splits(batch=q.shape[0], num_kv_heads=k.shape[1], block_n=64, device=q.device,
                                    max_tokens=attended if window is None else min(attended, window))
        for i, rows in enumerate(groups):
            s = main if i == 0 else side[i]
            with _on(s):
                self.sparse.attention_begin(layer, q[rows], rows=rows)
                if cuda:
                    s.wait_stream(side[0])  # the current page holds the new token
                paged_decode_attention(q[rows], cache.keys(layer), cache.values(layer), d.table[rows],
                                       d.kv_lens[rows], scale=self.scale, window=self.windows[layer],
                                       num_splits=splits, out=out[rows])
        for s in side if cuda else ():
            main.wait_stream(s)
        return out

    def _prefill(self, layer: int, c: PrefillChunk, q, k, v) -> torch.Tensor:
        seq = c.seq
        if seq.sparse and seq.host_backed:
            return self.sparse.prefill_host_backed(layer, seq, c.computed, q, k, v)
        cache, window = self.cache, self.windows[layer]
        cache.write(layer, c.write_pages, c.write_offsets, k, v)
        ctx = c.computed + q.shape[0]
        first = 0
        if window is not None:  # the chunk's first query reaches back window - 1 tokens: skip older pages
            first = max(0, c.computed - window + 1) // cache.page_size
        s = cache.page_size
        out = prefill_attention(q, gather_pages(cache.keys(layer), c.pages[first:], ctx - first * s),
                                gather_pages(cache.values(layer), c.pages[first:], ctx - first * s),
                                scale=self.scale, window=window)
        if seq.sparse:
            self.sparse.prefill_resident(layer, seq, c.computed, q.shape[0])
        return out


def _on(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def _streams(device: torch.device, n: int) -> list[torch.cuda.Stream]:
    """n side streams of the device, made once and reused by every step (and every captured graph)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    for i in range(n):
        if (idx, i) not in _STREAMS:
            _STREAMS[idx, i] = torch.cuda.Stream(device=idx)
    return [_STREAMS[idx, i] for i in range(n)]
