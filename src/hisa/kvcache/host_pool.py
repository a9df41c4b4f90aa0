"""L2: the host pool holding the full KV of every host-backed sparse request (pinned when CUDA is used).

One pinned allocation per layer instead of one for the whole pool: single pinned allocations of
~50 GB and more fail on the lent GPU machines, while 112 GiB pinned in 4 GiB pieces works. The
per-layer piece is also the unit the hot path reads: a decode step loads one layer's missed pages
at a time, so a kernel only ever needs that layer's tensor.

Pinning registers ordinary host memory with CUDA (`cudaHostRegister`) instead of going through
torch's caching host allocator (`pin_memory=True`), which rounds every block up to a power of two and
keeps freed blocks cached for reuse: a 2.9 GiB layer took 4 GiB, so a pool sized to 75% of the RAM
asked for all of it (an H200 machine's 128K-context run was killed by the kernel's OOM killer), and a
closed engine's pool stayed pinned. Registered memory is exactly the pool's size and is unpinned and
freed when the pool goes.

Each layer's tensor is registered in pieces of at most 4 GiB (`PIN_PIECE_BYTES`), cut at OS page
boundaries: a 4-layer model's pool of ~90 GiB has 22 GiB layers, and single pinned regions that large
are what failed on the lent machines. The pieces are adjacent, so the layer is still one tensor and
one address range for the GPU (a mapped registration's device address is its host address).
"""

from __future__ import annotations

import os
import weakref

import torch

from hisa.errors import ConfigError
from hisa.kvcache.page_allocator import PageAllocator


class HostKVPool:
    """Per layer `layers[l]` [pages, ROW] with ROW = prod(page_shape): one layer's page of the device
    cache as one row (GQA: [2, S, KVH, D], K then V; MLA: [S, latent_dim], the latent rows).

    A page of one layer is one row, so the per-layer load of a request's missing pages is a row
    gather (what the I/O kernel does). Page ids are shared across layers: host page p of layer l is
    `layers[l][p]`.

    Example::

        pool = HostKVPool(num_layers=2, num_pages=64, page_shape=(2, 16, 2, 64),
                          dtype=torch.float16, device=torch.device("cpu"), pin=False)
        rows = pool.layer_rows(0)          # [64, ROW]
    """

    def __init__(self, *, num_layers: int, num_pages: int, page_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, pin: bool):
        self.page_shape = tuple(page_shape)
        self.row = 1
        for n in self.page_shape:
            self.row *= n
        self.dtype = dtype
        self.pinned = pin
        self.layers: list[torch.Tensor] = []
        for layer in range(num_layers):
            try:
                # Uninitialized on purpose (a multi-GB memset costs seconds): a token slot is always
                # written before any kernel reads it as valid, and every reader masks by length.
                self.layers.append(host_tensor((num_pages, self.row), dtype, pin=pin, owner=self))
            except (RuntimeError, torch.OutOfMemoryError) as e:
                self.layers.clear()
                piece = num_pages * self.row * torch.empty((), dtype=dtype).element_size()
                raise ConfigError(
                    f"could not {'pin' if pin else 'allocate'} the host KV pool: layer {layer} of {num_layers} "
                    f"({piece / 2**30:.2f} GiB each, {num_layers * piece / 2**30:.1f} GiB in all) failed "
                    f"({type(e).__name__}); lower --host-pool-gb (this machine has "
                    f"{available_host_bytes() / 2**30:.1f} GiB available)") from e
        self.allocator = PageAllocator(num_pages)

    @property
    def num_pages(self) -> int:
        return self.layers[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers."""
        return self.num_layers * self.row * self.layers[0].element_size()

    def layer_rows(self, layer: int) -> torch.Tensor:
        return self.layers[layer]  # [pages, ROW]

    def layer_pages(self, layer: int) -> torch.Tensor:
        """[pages, *page_shape] view of one layer (GQA: [pages, 2, S, KVH, D])."""
        return self.layers[layer].view(-1, *self.page_shape)


PIN_PIECE_BYTES = 4 * 2**30  # most bytes one cudaHostRegister call pins (see the module docstring)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool, owner: object,
                piece_bytes: int = PIN_PIECE_BYTES) -> torch.Tensor:
    """An uninitialized host tensor of exactly its size; with `pin`, page-locked and mapped for the GPU
    (cudaHostRegister, portable + mapped: a kernel may read it through its UVA address), registered in
    pieces of at most `piece_bytes` (`pin_ranges`).

    `owner` is the object that keeps the tensor (a pool): when it is collected, the memory is
    unregistered before the owner's attributes, and so the tensor, are released (a weakref callback
    runs first). A view that outlives the owner keeps plain pageable memory, which stays valid.

    Raises RuntimeError when CUDA refuses to pin it (e.g. the RAM is not there); pieces already
    registered are unregistered first."""
    t = torch.empty(shape, dtype=dtype)
    if not pin or t.numel() == 0:
        return t
    cudart = torch.cuda.cudart()
    size = t.numel() * t.element_size()
    done: list[int] = []
    for start, length in pin_ranges(t.data_ptr(), size, piece_bytes=piece_bytes):
        err = cudart.cudaHostRegister(start, length, 3)  # cudaHostRegisterPortable | cudaHostRegisterMapped
        if int(err) != 0:
            for p in done:
                cudart.cudaHostUnregister(p)
            raise RuntimeError(f"cudaHostRegister of {length / 2**30:.2f} GiB (a piece of {size / 2**30:.2f} GiB) "
                               f"failed (CUDA error {int(err)})")
        done.append(start)
    weakref.finalize(owner, _unregister, cudart, done)
    return t


def _unregister(cudart, starts: list[int]) -> None:
    for p in starts:
        cudart.cudaHostUnregister(p)


def pin_ranges(ptr: int, size: int, *, piece_bytes: int = PIN_PIECE_BYTES, page: int = 4096) -> list[tuple[int, int]]:
    """[ptr, ptr + size) as (start, length) pieces of at most piece_bytes bytes, cut at multiples
    of `page` (two registrations never share an OS page), in address order, covering it exactly.

    Example::

        pin_ranges(64, 10 * 2**30, piece_bytes=4 * 2**30)   # 3 pieces: 4 GiB - 64 B, 4 GiB, 2 GiB + 64 B
    """
    if piece_bytes < page:
        raise ValueError(f"piece_bytes ({piece_bytes}) must be at least one page ({page})")
    end, out, start = ptr + size, [], ptr
    while start < end:
        cut = (start + piece_bytes) // page * page  # the next page boundary at most piece_bytes on
        if cut <= start:
            cut = start + piece_bytes
        cut = min(cut, end)
        out.append((start, cut - start))
        start = cut
    return out


def available_host_bytes() -> int:
    """Host memory the pool may use: MemAvailable from /proc/meminfo (the physical size elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_host_pool_bytes(*, headroom: float = 0.25) -> int:
    """The host pool's default size: 75% of the RAM available now (the rest for the process, the OS
    page cache, a GGUF being read) — so by default the pool uses the machine's RAM, not a fixed figure."""
    return int(available_host_bytes() * (1.0 - headroom))
