"""LoadRows: the host memory L3 lookups read pages into, allocated once and reused.

The engine thread takes rows (one page each) for a lookup when it hands it over; the L3 I/O thread
reads and checks pages straight into them (`L3Store.get_into`); the engine thread then copies them
to the device (as they become ready, or when the lookup is back) and gives them back. On CUDA the
rows are pinned, one `cudaHostAlloc` made when the engine starts (2 GiB cost ~1 s on the H200
machine, too much for a lookup to pay), so a run of rows crosses to the device in one asynchronous
copy with no host copy before it; rows given back with a CUDA event are reused only once the copy
reading them has finished. On the CPU the rows are plain memory and the copies synchronous.

Every CUDA call here (allocation, event query and wait) is made on the engine thread: the I/O
thread only reads into rows and, for a dropped lookup, gives its rows back without an event (a
lock guards the free set), so it never makes a CUDA call that a CUDA graph capture on the engine
thread could trip over.

The engine bounds the bytes its lookups in flight may read (`max_lookup_bytes`), which is the
capacity: a lookup takes rows after waiting for the copies of rows given back; one larger than
the capacity (allowed when it is alone) grows it once no row is in use.

Example::

    rows = LoadRows(page_bytes, capacity=1024, pin=True)
    taken = rows.take(3)                       # engine thread: [0, 1, 2] (None: not enough free)
    store.get_into(keys, rows.views(taken))    # I/O thread: pages read and checked in place
    ...                                        # engine thread: copy rows.pages(0, 3, ...) to the device
    rows.give_back(taken, event=copy_done)     # reusable once the copy has finished
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger("hisa.l3")


class LoadRows:
    """`capacity` rows of `page_bytes` bytes in host memory (pinned if `pin`), taken and given back
    by index. The memory is allocated on the first `reserve` or `take`."""

    def __init__(self, page_bytes: int, *, capacity: int, pin: bool,
                 host_buffer: Callable[[int], memoryview | None] | None = None,
                 release_host_buffer: Callable[[memoryview], None] | None = None):
        """host_buffer: where the rows' memory comes from when it can (the L3 backend's, e.g. a Mooncake
        store process's shared pool, which its reads fill without a copy; pinned here by registering
        it with CUDA), or None / a None from it: memory of our own. release_host_buffer: told when an
        area host_buffer lent is no longer used (the rows grew, or closed)."""
        if page_bytes <= 0 or capacity <= 0:
            raise ValueError(f"page_bytes and capacity must be positive, got {page_bytes}, {capacity}")
        self.page_bytes, self.capacity, self.pin = page_bytes, capacity, pin
        self.host_buffer, self.release_host_buffer = host_buffer, release_host_buffer
        self._lent: memoryview | None = None   # host_buffer's area the rows live in
        self._lock = threading.Lock()
        self._data: torch.Tensor | None = None   # [capacity, page_bytes] uint8
        self._registered: int | None = None   # the data's address, while it is registered with CUDA
        self._free: set[int] = set(range(capacity))
        self._retired: list[tuple[list[int], object]] = []   # (rows, the CUDA event of the copy reading them)

    @property
    def in_use(self) -> int:
        """Rows taken and not yet free again (given back rows whose copy is still running count)."""
        with self._lock:
            return self.capacity - len(self._free)

    def reserve(self) -> None:
        """Allocate the rows now (the engine does at start-up on CUDA: pinning is slow)."""
        with self._lock:
            self._allocate(self.capacity)

    def take(self, n: int) -> list[int] | None:
        """`n` free rows, lowest first (so a lookup's rows tend to be one run), or None if not that
        many are free even after waiting for the copies of those given back (rows held by lookups
        in flight). Engine thread only."""
        with self._lock:
            self._reclaim(wait=False)
            if len(self._free) < n:
                self._reclaim(wait=True)
            if self._data is None or (len(self._free) < n and len(self._free) == self.capacity):
                self._allocate(max(n, self.capacity))   # nothing in use: grow (or allocate) at once
            if len(self._free) < n:
                return None
            taken = sorted(self._free)[:n]
            self._free.difference_update(taken)
            return taken

    def give_back(self, rows: list[int], *, event=None) -> None:
        """Free `rows`; with a CUDA `event` (engine thread), only once it has completed (the copy
        reading them). Without one, from any thread."""
        if not rows:
            return
        with self._lock:
            if event is None:
                self._free.update(rows)
            else:
                self._retired.append((list(rows), event))

    def views(self, rows: list[int]) -> list[memoryview]:
        """A writable memoryview of each row (`page_bytes` bytes), for `L3Store.get_into`."""
        if not rows:
            return []
        host = self._data.numpy()   # [capacity, page_bytes] uint8, the same memory
        return [memoryview(host[r]) for r in rows]

    def pages(self, first: int, end: int, *, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Rows first..end-1 as pages: a view [end - first, *shape] of `dtype` (no copy)."""
        return self._data[first:end].view(dtype).view(end - first, *shape)

    @property
    def backend_memory(self) -> bool:
        """Whether the rows live in memory host_buffer lent."""
        return self._lent is not None

    def close(self) -> None:
        """Wait for the copies reading the rows, then let their memory go (unregistered from CUDA
        first where it was registered): before the backend that lent it closes."""
        with self._lock:
            self._reclaim(wait=True)
            self._drop()

    def _allocate(self, capacity: int) -> None:
        if self._data is not None and capacity <= self._data.shape[0]:
            return
        self._drop()   # the old rows are all free: drop them before pinning the new ones
        nbytes = capacity * self.page_bytes
        lent = self.host_buffer(nbytes) if self.host_buffer is not None else None
        if lent is not None:
            data = torch.frombuffer(lent, dtype=torch.uint8).view(capacity, self.page_bytes)
            if self.pin:
                rc = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), nbytes, 0)
                if int(rc) != 0:
                    log.warning("L3: cudaHostRegister of the %d bytes of load rows the backend lent failed (%s): "
                                "pinned memory of our own instead", nbytes, rc)
                    if self.release_host_buffer is not None:
                        self.release_host_buffer(lent)
                    lent = None
                else:
                    self._registered = data.data_ptr()
        if lent is not None:
            self._data, self._lent = data, lent
        else:
            self._data = torch.empty(capacity, self.page_bytes, dtype=torch.uint8, pin_memory=self.pin)
        self.capacity = capacity
        self._free = set(range(capacity))

    def _drop(self) -> None:
        if self._registered is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None
        self._data = None
        if self._lent is not None:
            lent, self._lent = self._lent, None
            if self.release_host_buffer is not None:
                self.release_host_buffer(lent)

    def _reclaim(self, *, wait: bool) -> None:
        keep = []
        for rows, event in self._retired:
            if wait:
                event.synchronize()
            if wait or event.query():
                self._free.update(rows)
            else:
                keep.append((rows, event))
        self._retired = keep


def runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(position in `rows`, first row, end row) of each run of consecutive rows: [4, 5, 6, 9] ->
    [(0, 4, 7), (3, 9, 10)]."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            out.append((start, rows[start], rows[i - 1] + 1))
            start = i
    return out


@dataclass(slots=True)
class LoadedRun:
    """The pages one lookup read, in order: first those already copied to the device (`landed`, CUDA:
    each a tensor [n, layers, 2, S, KVH, D] and the event recorded after its copy on the landing
    stream), then those still in host `rows` of a LoadRows."""
    landed: list[tuple[torch.Tensor, object]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(t.shape[0] for t, _ in self.landed) + len(self.rows)

    def slice(self, a: int, b: int) -> "LoadedRun":
        """Pages a..b-1 (views of the landed tensors, no copy)."""
        landed, pos = [], 0
        for pages, event in self.landed:
            n = pages.shape[0]
            lo, hi = max(a, pos), min(b, pos + n)
            if lo < hi:
                landed.append((pages[lo - pos:hi - pos], event))
            pos += n
        return LoadedRun(landed, self.rows[max(0, a - pos):max(0, b - pos)])
