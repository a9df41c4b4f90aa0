"""The paged cache of a DeepSeek-V3.2 (MLA + DSA) model on one device: latent rows and indexer keys.

Per token and layer MLA caches one latent row, [normed compressed KV (kv_lora_rank) | roped shared
key (qk_rope_head_dim)], shared by every attention head, and DSA's indexer caches one key
(index_head_dim). Both are paged with the same page ids as the dense cache (the scheduler and the
page allocator are unchanged); they are two tensors, not one, because the hierarchical cache keeps
them in different tiers: the indexer keys stay on the device (every step scores them all), the
latent rows go to the host pool (each step reads only the selected ones).
"""

from __future__ import annotations

import torch


class MLAKVCache:
    """Latent rows [layers, pages, page_size, latent_dim] and indexer keys [layers, pages, page_size, index_dim].

    Example::

        cache = MLAKVCache(num_layers=2, num_pages=8, page_size=16, latent_dim=576, index_head_dim=128,
                           dtype=torch.bfloat16, device=torch.device("cuda"))
        rows = cache.latent_rows(0)    # [8, 16, 576] view
        keys = cache.index_keys(0)     # [8, 16, 128] view
    """

    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, latent_dim: int, index_head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.latent_dim, self.index_head_dim = latent_dim, index_head_dim
        # Uninitialized on purpose: slots are written before they are read as valid (readers mask by length).
        self.latent = torch.empty(num_layers, num_pages, page_size, latent_dim, dtype=dtype, device=device)
        self.index = torch.empty(num_layers, num_pages, page_size, index_head_dim, dtype=dtype, device=device)

    @staticmethod
    def page_bytes(*, num_layers: int, page_size: int, latent_dim: int, index_head_dim: int,
                   dtype: torch.dtype) -> int:
        """Bytes of one page across all layers (latent rows and indexer keys)."""
        elt = torch.empty((), dtype=dtype).element_size()
        return num_layers * page_size * (latent_dim + index_head_dim) * elt

    @property
    def nbytes(self) -> int:
        return (self.latent.numel() + self.index.numel()) * self.latent.element_size()

    @property
    def page_shape(self) -> tuple[int, ...]:
        """Shape of one layer's page of latent rows ([S, latent_dim]): what the host pool holds for
        a host-backed request (the indexer keys stay on the device, in the `dsa` algorithm)."""
        return (self.page_size, self.latent_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.latent.dtype

    @property
    def device(self) -> torch.device:
        return self.latent.device

    def layer_rows(self, layer: int) -> torch.Tensor:
        """[P, S * latent_dim] one layer's latent pages as rows: what the I/O kernels move."""
        return self.latent[layer].view(self.num_pages, -1)

    def latent_rows(self, layer: int) -> torch.Tensor:
        return self.latent[layer]  # [P, S, latent_dim]

    def index_keys(self, layer: int) -> torch.Tensor:
        return self.index[layer]  # [P, S, index_head_dim]

    def write(self, layer: int, pages: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
              index_keys: torch.Tensor | None) -> None:
        """Store new tokens. pages, offsets: int64 [T]; rows: [T, latent_dim]; index_keys: [T, index_dim]
        (None for a layer without an indexer: GLM-5's shared layers)."""
        self.latent[layer, pages, offsets] = rows.to(self.latent.dtype)
        if index_keys is not None:
            self.index[layer, pages, offsets] = index_keys.to(self.index.dtype)
