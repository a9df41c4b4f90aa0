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

from dataclasses import dataclass

import torch

from hisa.attention.paged_decode import paged_decode_attention
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
