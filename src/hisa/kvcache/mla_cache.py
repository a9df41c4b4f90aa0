"""The paged cache of a DeepSeek-V3.2 (MLA + DSA) model on one device: latent rows and indexer keys.

Per token and layer MLA caches one latent row, [normed compressed KV (kv_lora_rank) | roped shared
key (qk_rope_head_dim)], shared by every attention head, and DSA's indexer caches one key
(index_head_dim). Both are paged with the same page ids as the dense cache (the scheduler and the
page allocator are unchanged); they are two tensors, not one, because the hierarchical cache keeps
them in different tiers: the indexer keys stay on the device (every step scores them all), the
latent rows go to the host pool (each step reads only the selected ones).

`latent_format="fp8"` stores each latent row packed as DeepSeek's FP8 layout (`hisa.kvcache.mla_fp8`:
e4m3 latent values with a scale per 128, bf16 rope part; 656 bytes for V3.2 instead of 1,152) and
each indexer key as e4m3 values with one scale (144 bytes with its padding instead of 256), as uint8 rows: `pack` /
`pack_index` turn new rows and keys into what the cache stores, `unpack` / `unpack_index` turn stored
ones back into values.
"""

from __future__ import annotations

import torch

from hisa.kvcache.mla_fp8 import (LATENT_FORMATS, index_key_width, pack_index_keys, pack_latent, packed_width,
                                  unpack_index_keys, unpack_latent)


class MLAKVCache:
    """Latent rows [layers, pages, page_size, row_width] (row_width = latent_dim, or the FP8 row's bytes) and
    indexer keys [layers, pages, page_size, key_width] (index_dim, or its FP8 bytes).

    Example::

        cache = MLAKVCache(num_layers=2, num_pages=8, page_size=16, latent_dim=576, index_head_dim=128,
                           dtype=torch.bfloat16, device=torch.device("cuda"))
        rows = cache.latent_rows(0)    # [8, 16, 576] view
        keys = cache.index_keys(0)     # [8, 16, 128] view
    """

    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, latent_dim: int, index_head_dim: int,
                 dtype: torch.dtype, device: torch.device, kv_lora_rank: int | None = None,
                 latent_format: str = "auto"):
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.latent_dim, self.index_head_dim = latent_dim, index_head_dim
        self.model_dtype, self.latent_format, self.kv_lora_rank = dtype, latent_format, kv_lora_rank
        self.row_width = self.stored_width(latent_dim=latent_dim, kv_lora_rank=kv_lora_rank,
                                           latent_format=latent_format)
        self.index_head_dim = index_head_dim
        self.key_width = self.stored_key_width(index_head_dim=index_head_dim, latent_format=latent_format)
        row_dtype = torch.uint8 if latent_format == "fp8" else dtype
        # Uninitialized on purpose: slots are written before they are read as valid (readers mask by length).
        self.latent = torch.empty(num_layers, num_pages, page_size, self.row_width, dtype=row_dtype, device=device)
        self.index = torch.empty(num_layers, num_pages, page_size, self.key_width, dtype=row_dtype, device=device)

    @staticmethod
    def stored_width(*, latent_dim: int, kv_lora_rank: int | None, latent_format: str) -> int:
        """Values (bytes for "fp8") of one stored latent row."""
        if latent_format not in LATENT_FORMATS:
            raise ValueError(f"latent_format must be one of {LATENT_FORMATS}, got {latent_format!r}")
        if latent_format == "auto":
            return latent_dim
        if kv_lora_rank is None:
            raise ValueError("an FP8 latent cache needs kv_lora_rank (the latent part of a row)")
        return packed_width(kv_lora_rank, latent_dim - kv_lora_rank)

    @staticmethod
    def stored_key_width(*, index_head_dim: int, latent_format: str) -> int:
        """Values (bytes for "fp8") of one stored indexer key."""
        return index_key_width(index_head_dim) if latent_format == "fp8" else index_head_dim

    @staticmethod
    def page_bytes(*, num_layers: int, page_size: int, latent_dim: int, index_head_dim: int,
                   dtype: torch.dtype, kv_lora_rank: int | None = None, latent_format: str = "auto") -> int:
        """Bytes of one page across all layers (latent rows and indexer keys)."""
        elt = torch.empty((), dtype=dtype).element_size()
        width = MLAKVCache.stored_width(latent_dim=latent_dim, kv_lora_rank=kv_lora_rank, latent_format=latent_format)
        key_width = MLAKVCache.stored_key_width(index_head_dim=index_head_dim, latent_format=latent_format)
        return num_layers * page_size * (width + key_width) * (1 if latent_format == "fp8" else elt)

    @property
    def nbytes(self) -> int:
        return self.latent.numel() * self.latent.element_size() + self.index.numel() * self.index.element_size()

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Shape of one layer's page of stored latent rows ([S, row_width]): what the host pool holds
        for a host-backed request (the indexer keys stay on the device, in the `dsa` algorithm)."""
        return (self.page_size, self.row_width)

    @property
    def dtype(self) -> torch.dtype:
        """The stored rows' dtype (uint8 for "fp8"), which the host pool copies."""
        return self.latent.dtype

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        """New latent rows [T, latent_dim] -> what the cache stores for them [T, row_width]."""
        if self.latent_format == "fp8":
            return pack_latent(rows, kv_lora_rank=self.kv_lora_rank)
        return rows.to(self.latent.dtype)

    def pack_index(self, keys: torch.Tensor) -> torch.Tensor:
        """New indexer keys [T, index_head_dim] -> what the cache stores for them [T, key_width]."""
        if self.latent_format == "fp8":
            return pack_index_keys(keys)
        return keys.to(self.index.dtype)

    def unpack_index(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored indexer keys [..., key_width] -> keys [..., index_head_dim] in the model's dtype."""
        if self.latent_format == "fp8":
            return unpack_index_keys(stored, index_head_dim=self.index_head_dim, dtype=self.model_dtype)
        return stored

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored rows [..., row_width] -> latent rows [..., latent_dim] in the model's dtype."""
        if self.latent_format == "fp8":
            return unpack_latent(stored, kv_lora_rank=self.kv_lora_rank, dtype=self.model_dtype)
        return stored

    @property
    def device(self) -> torch.device:
        return self.latent.device

    def layer_rows(self, layer: int) -> torch.Tensor:
        """[P, S * row_width] one layer's latent pages as rows: what the I/O kernels move."""
        return self.latent[layer].view(self.num_pages, -1)

    def latent_rows(self, layer: int) -> torch.Tensor:
        return self.latent[layer]  # [P, S, row_width]

    def index_keys(self, layer: int) -> torch.Tensor:
        return self.index[layer]  # [P, S, key_width] stored keys

    def write(self, layer: int, pages: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
              index_keys: torch.Tensor | None) -> None:
        """Store new tokens. pages, offsets: int64 [T]; rows: [T, row_width] stored rows (`pack`);
        index_keys: [T, key_width] stored keys (`pack_index`; None for a layer without an indexer:
        GLM-5's shared layers)."""
        if rows.shape[-1] != self.row_width:
            raise ValueError(f"rows must be stored rows [T, {self.row_width}] (see MLAKVCache.pack), got "
                             f"{tuple(rows.shape)}")
        if index_keys is not None and index_keys.shape[-1] != self.key_width:
            raise ValueError(f"index_keys must be stored keys [T, {self.key_width}] (see MLAKVCache.pack_index), got "
                             f"{tuple(index_keys.shape)}")
        self.latent[layer, pages, offsets] = rows.to(self.latent.dtype)
        if index_keys is not None:
            self.index[layer, pages, offsets] = index_keys.to(self.index.dtype)
