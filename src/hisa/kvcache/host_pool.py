"""L2: the host pool holding the full KV of every sparse request (pinned when CUDA is used)."""

from __future__ import annotations

import torch

from hisa.kvcache.page_allocator import PageAllocator


class HostKVPool:
    """`data` [layers, pages, ROW] with ROW = 2 * page_size * kv_heads * head_dim (K then V).

    One layer's pool is contiguous and a page of one layer is one row, so the per-layer load of a
    request's missing pages is a row gather (what the I/O kernel does). Page ids are shared across
    layers: host page p of layer l is `data[l, p]`.

    Example::

        pool = HostKVPool(num_layers=2, num_pages=64, page_size=16, num_kv_heads=2, head_dim=64,
                          dtype=torch.float16, device=torch.device("cpu"), pin=False)
        rows = pool.layer_rows(0)          # [64, ROW]
    """

    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, pin: bool):
        self.page_size, self.num_kv_heads, self.head_dim = page_size, num_kv_heads, head_dim
        self.row = 2 * page_size * num_kv_heads * head_dim
        # Uninitialized on purpose (a multi-GB memset costs seconds): a token slot is always written
        # before any kernel reads it as valid, and every reader masks by length.
        self.data = torch.empty(num_layers, num_pages, self.row, dtype=dtype, device=device, pin_memory=pin)
        self.allocator = PageAllocator(num_pages)
        self.pinned = pin

    @property
    def num_pages(self) -> int:
        return self.data.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers."""
        return self.data.shape[0] * self.row * self.data.element_size()

    def layer_rows(self, layer: int) -> torch.Tensor:
        return self.data[layer]  # [pages, ROW]

    def layer_pages(self, layer: int) -> torch.Tensor:
        """[pages, 2, S, KVH, D] view of one layer."""
        return self.data[layer].view(-1, 2, self.page_size, self.num_kv_heads, self.head_dim)
