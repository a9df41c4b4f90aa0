"""SparseKVCacheManager: the tiers (device buffer L1, host pool L2) and the moves between them.

Per sparse request (a *slot* r in [0, max_requests)) and per layer, the device buffer holds NS
pages in an LRU. Each decode step and layer: the diff kernel compares the new selection with the
buffer, keeps hits, assigns misses to least-recently-used slots; the I/O kernel then reads just
the missed pages from the host pool. New tokens are written to the device slot of their page
(for attention) and to the host pool at the end of the step (offload), so the host always holds
the full KV and an evicted page never needs writing back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hisa.kvcache.diff import lru_diff
from hisa.kvcache.host_pool import HostKVPool
from hisa.kvcache.io import load_pages


@dataclass
class SparseStepStats:
    """Counters of one decode step (summed over layers and requests) and per layer."""

    requests: int = 0
    selected_pages: int = 0
    hits: int = 0
    misses: int = 0
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    misses_per_layer: list[int] = field(default_factory=list)
    selected_per_layer: list[int] = field(default_factory=list)
    device_bytes_in_use: int = 0  # KV buffers + representations of the running sparse requests
    host_bytes_in_use: int = 0  # host pool pages held

    @property
    def hit_rate(self) -> float:
        return self.hits / self.selected_pages if self.selected_pages else 1.0


class SparseKVCacheManager:
    """Owns the host pool, the per-request device buffers and their LRU state.

    Device tensors (preallocated, indexed by request slot):
      buffer_kv     [layers, max_requests * NS, ROW]   the L1 pages
      buffer_pages  [layers, max_requests, NS] int32   logical page held by each slot (-1 empty)
      last_used     [layers, max_requests, NS] int32   LRU clock
      host_table    [max_requests, max_pages] int64    logical page -> host pool page
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                 buffer_slots: int, max_requests: int, max_pages: int, host_pages: int,
                 dtype: torch.dtype, device: torch.device, offload: bool):
        self.num_layers, self.page_size, self.ns = num_layers, page_size, buffer_slots
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.max_requests, self.max_pages, self.device = max_requests, max_pages, device
        pool_device = torch.device("cpu") if offload else device
        self.host = HostKVPool(num_layers=num_layers, num_pages=host_pages, page_size=page_size,
                               num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=pool_device,
                               pin=offload and device.type == "cuda")
        self.row = self.host.row
        self.buffer_kv = torch.zeros(num_layers, max_requests * buffer_slots, self.row, dtype=dtype, device=device)
        self.buffer_pages = torch.full((num_layers, max_requests, buffer_slots), -1, dtype=torch.int32, device=device)
        self.last_used = torch.zeros((num_layers, max_requests, buffer_slots), dtype=torch.int32, device=device)
        self.host_table = torch.full((max_requests, max_pages), -1, dtype=torch.int64, device=device)
        self.slot_base = torch.arange(max_requests, dtype=torch.int32, device=device) * buffer_slots
        self._free_slots = list(range(max_requests - 1, -1, -1))
        self.clock = 0
        # the clock as a 0-d device tensor too: a captured decode step reads it at replay (a Python
        # int would be frozen into the CUDA graph)
        self.clock_t = torch.zeros((), dtype=torch.int32, device=device)
        self.row_bytes = self.row * self.buffer_kv.element_size()

    # -- request slots -----------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def acquire_slot(self) -> int | None:
        if not self._free_slots:
            return None
        slot = self._free_slots.pop()
        self.buffer_pages[:, slot] = -1
        self.last_used[:, slot] = 0
        self.host_table[slot] = -1
        return slot

    def release_slot(self, slot: int) -> None:
        self.buffer_pages[:, slot] = -1
        self.host_table[slot] = -1
        self._free_slots.append(slot)

    def set_host_pages(self, slot: int, start: int, pages: list[int]) -> None:
        """Record host pages `pages` as logical pages start.. of the request in `slot`."""
        if pages:
            self.host_table[slot, start:start + len(pages)] = torch.tensor(pages, dtype=torch.int64).to(self.device)

    # -- views ---------------------------------------------------------------------------------
    def buffer_pages_view(self, layer: int) -> torch.Tensor:
        """[max_requests * NS, 2, S, KVH, D] view of one layer's device buffer."""
        return self.buffer_kv[layer].view(-1, 2, self.page_size, self.num_kv_heads, self.head_dim)

    def device_kv_bytes_per_request(self) -> int:
        """KV buffer bytes one sparse request holds on the device (all layers): fixed, not O(context)."""
        return self.num_layers * self.ns * self.row_bytes

    # -- the per-layer hot path ---------------------------------------------------------------
    def tick(self) -> int:
        self.clock += 1
        self.clock_t.fill_(self.clock)
        return self.clock

    def load(self, layer: int, topk: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make every page of `topk` resident for one layer.

        topk: int32 [max_requests, K] logical pages per request slot (-1 padded; rows not `active`
        are ignored). Returns (physical page table int32 [max_requests, K] into the layer's
        buffer, num_misses int32 [max_requests]). No host sync.
        """
        slot_table, load_slots, miss_pages, num_misses = lru_diff(
            self.buffer_pages[layer], self.last_used[layer], topk, self.clock_t, active=active)
        has = miss_pages >= 0  # [R, K]
        src = torch.where(has, self.host_table.gather(1, miss_pages.clamp(min=0).long()), -1)
        dst = torch.where(has, self.slot_base[:, None].long() + load_slots.long(), -1)
        load_pages(self.host.layer_rows(layer), self.buffer_kv[layer], src.reshape(-1), dst.reshape(-1))
        physical = torch.where(slot_table >= 0, slot_table + self.slot_base[:, None], -1)
        return physical, num_misses
