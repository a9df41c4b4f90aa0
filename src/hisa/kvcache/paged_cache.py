"""The dense paged KV cache on one device: one tensor [layers, pages, 2, page_size, kv_heads, head_dim]."""

from __future__ import annotations

import torch


class PagedKVCache:
    """K and V of every layer in fixed-size pages.

    A page of one layer holds K then V for `page_size` tokens and all KV heads, contiguous, so that
    one layer's page is a single row (what the host pool and the I/O kernel move as a unit).

    Example::

        cache = PagedKVCache(num_layers=2, num_pages=8, page_size=16, num_kv_heads=2, head_dim=64,
                             dtype=torch.float32, device=torch.device("cpu"))
        k = cache.keys(0)    # [8, 16, 2, 64] view
    """

    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        # Uninitialized on purpose: slots are written before they are read as valid (readers mask by length).
        self.data = torch.empty(num_layers, num_pages, 2, page_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    @staticmethod
    def page_bytes(*, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one page across all layers."""
        return num_layers * 2 * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Shape of one layer's page ([2, S, KVH, D]): a host pool mirrors it row for row."""
        return tuple(self.data.shape[2:])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def layer(self, layer: int) -> torch.Tensor:
        return self.data[layer]  # [P, 2, S, KVH, D]

    def layer_rows(self, layer: int) -> torch.Tensor:
        """[P, ROW] one layer's pages as rows (ROW = 2 * S * KVH * D): what the I/O kernels move."""
        return self.data[layer].view(self.num_pages, -1)

    def keys(self, layer: int) -> torch.Tensor:
        return self.data[layer, :, 0]  # [P, S, KVH, D], stride(0) = 2*S*KVH*D

    def values(self, layer: int) -> torch.Tensor:
        return self.data[layer, :, 1]

    def write(self, layer: int, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens. pages, offsets: int64 [T]; k, v: [T, KVH, D]."""
        lay = self.data[layer]
        lay[pages, 0, offsets] = k.to(lay.dtype)
        lay[pages, 1, offsets] = v.to(lay.dtype)
