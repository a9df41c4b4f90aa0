"""`dsa`: DeepSeek Sparse Attention's own selection, as a sparse algorithm of the hierarchical cache.

The representation is the indexer key cache: one key [index_head_dim] per token and layer of every
host-backed request, kept on the device for the whole context (the indexer scores every token each
step, so these keys must not leave the device; the latent rows, 4.5x larger, live in the host pool
and only the selected ones come back). `retrieve_topk` is the model's lightning indexer
(`hisa.attention.dsa_indexer.indexer_topk`): it returns TOKEN positions, not pages; the adaptor
turns them into the pages that hold them and the diff loads the missing ones.

Layout, indexed like every representation by (sparse slot, logical page):
  keys [layers, max_requests + 1, max_pages, page_size, W]  (row max_requests: the sentinel)
with W = index_head_dim values, or with `fp8_keys` the keys as the cache stores them in FP8
(`hisa.kvcache.mla_fp8.pack_index_keys`: uint8, `index_key_width` bytes, 144 at V3.2's 128 values).
Keys come in and go out as stored (the caller packs them).
"""

from __future__ import annotations

import torch

from hisa.attention.dsa_indexer import indexer_topk
from hisa.kvcache.mla_cache import MLAKVCache
from hisa.sparse.base import BaseSparseAlgorithm, DecodeRows, register


@register("dsa")
class DSAAlgorithm(BaseSparseAlgorithm):
    """The model's indexer over the device-resident indexer keys (see the module docstring).

    Needs a DSA model (DeepSeek-V3.2, GLM-5): index_head_dim and index_topk come from its config.
    retrieve_topk(layer, index, rows) takes the step's `IndexerStep` (q [R, IH, ID], weights fp32
    [R, IH]) in place of an attention query and returns int32 [R, min(index_topk, max_pages * S)]
    token positions, best first, -1 padded.

    Example::

        algo = create_algorithm("dsa", index_head_dim=128, index_topk=2048, **common)
        tokens = algo.retrieve_topk(layer, index_step, rows)   # [R, 2048]
    """

    graph_safe = True  # device work only: the indexer, an index_put of the new keys
    token_level = True  # retrieve_topk returns token positions; the adaptor maps them to pages

    def __init__(self, *, index_head_dim: int, index_topk: int, fp8_keys: bool = False, **common):
        super().__init__(**common)
        self.index_head_dim, self.index_topk = index_head_dim, index_topk
        self.index_scale = index_head_dim ** -0.5
        self.key_width = MLAKVCache.stored_key_width(index_head_dim=index_head_dim,
                                                     latent_format="fp8" if fp8_keys else "auto")
        rows, P, S = self.max_requests + 1, self.max_pages, self.page_size
        # zeros, not empty: a sentinel row (dense and padding rows) is scored too, then ignored (packed
        # zeros are zero keys too: e4m3 0 with scale 0)
        self.keys = torch.zeros(self.num_layers, rows, P, S, self.key_width,
                                dtype=torch.uint8 if fp8_keys else self.dtype, device=self.device)
        # each slot's logical pages as rows of keys[layer].view(-1, S, ID): the indexer's page table
        self._table = (torch.arange(rows, dtype=torch.int32, device=self.device)[:, None] * P
                       + torch.arange(P, dtype=torch.int32, device=self.device))  # [rows, P]

    def metadata_bytes_per_page(self) -> int:
        return self.num_layers * self.page_size * self.key_width * self.keys.element_size()

    def construct_representations(self, layer: int, slot: int, first_page: int, keys: torch.Tensor) -> None:
        """keys [n * S, W] (stored): the indexer keys of logical pages first_page.. (page-aligned, tail ignored)."""
        pages = keys.view(-1, self.page_size, self.key_width)
        self.keys[layer, slot, first_page:first_page + pages.shape[0]] = pages.to(self.keys.dtype)

    def context_keys(self, layer: int, slot: int, num_tokens: int) -> torch.Tensor:
        """The first num_tokens indexer keys of the request in `slot`, [num_tokens, W] as stored (a view)."""
        return self.keys[layer, slot].view(-1, self.key_width)[:num_tokens]

    def update_representations(self, layer: int, rows: DecodeRows, keys: torch.Tensor) -> None:
        """keys [R, W] (stored): each row's new indexer key, at token t - 1 (padding rows, t == 0, write into the
        sentinel row, never read as valid)."""
        pos = torch.clamp(rows.t - 1, min=0).long()
        s = self.page_size
        self.keys[layer, rows.sparse_slots.long(), pos // s, pos % s] = keys.to(self.keys.dtype)

    def retrieve_topk(self, layer: int, q, rows: DecodeRows) -> torch.Tensor:
        """q: the step's IndexerStep for the R decode rows → int32 [R, K] token positions (-1 padded)."""
        table = self._table.index_select(0, rows.sparse_slots.long())  # [R, P]
        return indexer_topk(q.q, q.weights, self.keys[layer].view(-1, self.page_size, self.key_width), table,
                            rows.t, topk=self.index_topk, scale=self.index_scale)
