"""Attention of a DeepSeek-V3.2 (MLA + DSA) model for one engine step, everything on the device.

This is "dense mode" for a DSA model: the model's own sparse attention, as the model defines it,
with the whole latent and indexer caches in device pages (`MLAKVCache`). Per layer:

  1. the new tokens' latent rows and indexer keys go to their page slots;
  2. selection: each query's indexer top-`index_topk` tokens among those it sees (causal). While a
     query sees at most `index_topk` tokens it attends to all of them, so the indexer is skipped
     when the step's longest context fits (decided from shapes: the page-table width);
  3. MLA over the selection in the absorbed form: decode rows through the paged Triton kernel
     (`mla_decode_attention`, -1-padded top-k positions), prefill chunks in torch
     (`mla_prefill_attention`).

The decode path reads only the step plan's device tensors and shapes (no host sync), so a pure
decode step can be captured in a CUDA graph like a dense one.

Hierarchical DSA (`sparse`, a SparseCoordinator running the `dsa` algorithm): a *host-backed*
request keeps its latent rows in the host pool and its indexer keys in the algorithm's
representation (device). Its decode rows, per layer: the new latent row goes to the tail page and,
write-through, to its host page; the new indexer key to the representation; the indexer selects
over the representation; the coordinator maps the selected tokens to pages, diffs them against the
request's LRU buffer, loads the misses and rewrites the row's page table and positions to buffer
slots; then the same kernel call as every other row. Its prefill chunks attend over the context
read back from the host pool layer by layer. Dense and resident sparse requests run exactly as
without `sparse` (everything on the device). See docs/dsa.md.
"""

from __future__ import annotations

import torch

from hisa.attention.dsa_indexer import indexer_topk, indexer_topk_prefill
from hisa.attention.mla_decode import mla_decode_attention
from hisa.attention.mla_prefill import mla_prefill_attention
from hisa.attention.prefill import gather_pages
from hisa.kvcache.mla_cache import MLAKVCache
from hisa.models.config import ModelConfig
from hisa.models.deepseek_v32 import IndexerStep
from hisa.sparse.adaptor import HOST_BACKED


class DSAAttention:
    """The `forward_mla` attention object of one step (built by ModelRunner in place of StepAttention).

    decode: the step's decode rows (`DecodeView`: rows [0, n) of the step, their page table and
    lengths prepared on the device), or None; prefills: the step's prefill chunks (`PrefillChunk`).

    Example::

        attn = DSAAttention(cache, model.config, decode=view, prefills=chunks)
        hidden = model(input_ids, positions, attn, max_position)
    """

    def __init__(self, cache: MLAKVCache, config: ModelConfig, *, decode=None, prefills=(), sparse=None):
        d = config.dsa
        self.cache, self.decode, self.prefills, self.sparse = cache, decode, list(prefills), sparse
        self.scale = config.attention_scale
        self.kv_lora_rank, self.topk = d.kv_lora_rank, d.index_topk
        self.index_scale = d.index_head_dim ** -0.5
        # GLM-5's shared layers reuse the last full layer's selection: (decode, per prefill chunk)
        self._last: tuple[torch.Tensor | None, list[torch.Tensor | None]] = (None, [])

    def indexer_topk(self, layer: int, index: IndexerStep, rows: torch.Tensor, page_table: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
        """Decode selection of `rows` [B] of the step: int32 [B, min(index_topk, W * S)] token positions,
        -1 padded, from the layer's cached indexer keys (the new tokens' already written)."""
        return indexer_topk(index.q[rows], index.weights[rows], self.cache.index_keys(layer), page_table, lengths,
                            topk=self.topk, scale=self.index_scale)

    def forward_mla(self, layer: int, q: torch.Tensor, kv: torch.Tensor, index: IndexerStep | None) -> torch.Tensor:
        """q: [T, H, Dl + Dr] absorbed queries; kv: [T, Dl + Dr] new latent rows → [T, H, Dl]."""
        cache, d = self.cache, self.decode
        out = q.new_zeros(q.shape[0], q.shape[1], self.kv_lora_rank)  # [T, H, Dl]
        latent = cache.latent_rows(layer)  # [P, S, W] stored rows (W = Dl + Dr, or the FP8 row's bytes)
        kv = cache.pack(kv)  # the new rows as stored: everything below moves stored rows and keys
        new_keys = None if index is None else cache.pack_index(index.keys)
        last_decode, last_prefill = self._last
        decode_sel = None
        n = d.n if d is not None else 0
        if n:
            # padding rows (t == 0) write into the engine's scratch page, never read
            offsets = (torch.clamp(d.t - 1, min=0) % cache.page_size).long()
            cache.write(layer, d.write_page.long(), offsets, kv[:n], None if index is None else new_keys[:n])
            table, lens = d.table, d.kv_lens
            rows = torch.arange(n, device=q.device)
            hier = self.sparse if d.has_host_backed else None
            if hier is not None:  # host-backed rows: latent row to the host too, indexer key to the representation
                hier.write_through_mla(layer, kv[:n], None if index is None else new_keys[:n])
            if index is None:
                decode_sel = last_decode
            elif hier is not None:  # the host-backed rows' indexer runs over the representation
                decode_sel = hier.select_tokens(layer, IndexerStep(q=index.q[:n], weights=index.weights[:n],
                                                                   keys=index.keys[:n]))
                if d.has_on_device:  # the other rows' indexer over the device cache (host-backed rows: length 0)
                    host = (d.kind == HOST_BACKED)[:, None]
                    decode_sel = torch.where(host, decode_sel, self.indexer_topk(
                        layer, index, rows, table, torch.where(host[:, 0], 0, lens)))
            elif table.shape[1] * cache.page_size > self.topk:  # some context may exceed the selection
                decode_sel = self.indexer_topk(layer, index, rows, table, lens)
            # host-backed rows: their picks' pages into the buffer, table and positions remapped to its slots
            attend = decode_sel if hier is None else hier.attention_begin_tokens(layer, decode_sel)
            out[:n] = mla_decode_attention(q[:n], latent, table, lens, scale=self.scale,
                                           kv_lora_rank=self.kv_lora_rank, indices=attend)
        prefill_sel = []
        for i, c in enumerate(self.prefills):
            start, end = c.start, c.end
            ctx = c.computed + end - start
            chunk_keys = None if index is None else new_keys[start:end]
            if c.seq.sparse and c.seq.host_backed:  # the context comes back from the host pool, layer by layer
                stored, keys = self.sparse.prefill_host_backed_mla(layer, c.seq, c.computed, kv[start:end], chunk_keys)
                context = cache.unpack(stored)
            else:
                cache.write(layer, c.write_pages, c.write_offsets, kv[start:end], chunk_keys)
                context = cache.unpack(gather_pages(latent, c.pages, ctx))  # [ctx, Dl + Dr]
                keys = None if index is None or ctx <= self.topk else gather_pages(cache.index_keys(layer), c.pages, ctx)
            keys = None if keys is None else cache.unpack_index(keys)
            sel = None
            if index is None:
                sel = last_prefill[i]
            elif ctx > self.topk:
                sel = indexer_topk_prefill(index.q[start:end], index.weights[start:end], keys, topk=self.topk,
                                           scale=self.index_scale)  # [n, topk]
            prefill_sel.append(sel)
            if c.seq.sparse and c.seq.host_backed:  # the last chunk: its last token's picks into the buffer
                self.sparse.warm_buffer_tokens(layer, c.seq, None if sel is None else sel[-1], stored, ctx)
            out[start:end] = mla_prefill_attention(q[start:end], context, scale=self.scale,
                                                   kv_lora_rank=self.kv_lora_rank, indices=sel)
        if index is not None:
            self._last = (decode_sel, prefill_sel)
        return out
