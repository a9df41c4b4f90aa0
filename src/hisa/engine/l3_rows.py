"""LoadRows: the host memory L3 lookups read pages into, allocated once and reused.

A lookup (on the L3 I/O thread) takes rows, one page each, and `L3Store.get_into` reads and checks
the pages straight into them; the engine thread then copies the rows it uses into device pages and
gives them all back. On CUDA the rows are pinned (one `cudaHostAlloc`, made on the I/O thread when
the engine starts: a 2 GiB one cost ~1 s on the H200 machine, too much for a lookup to pay), so a
run of rows crosses to the device in one asynchronous copy with no host copy before it; rows given
back with a CUDA event are reused only once the copy reading them has finished. On the CPU the rows
are plain memory and the copies are synchronous.

Rows are taken on the I/O thread and given back on the engine thread (or on the I/O thread, by a
dropped lookup's done-callback), so every change holds a lock. The engine bounds the bytes its
lookups in flight may read (`max_lookup_bytes`), which is the capacity here: a lookup finds rows
free, after waiting for the copies of rows given back. One larger than the capacity (allowed when
it is alone) grows it, once no row is in use; one that still finds too few rows reads the leading
pages it got rows for (the rest prefills).

Example::

    rows = LoadRows(page_bytes, capacity=1024, pin=True)
    taken = rows.take(3)                       # on the I/O thread: [0, 1, 2]
    store.get_into(keys, rows.views(taken))    # pages read and checked in place
    ...                                        # engine thread: copy rows.pages(0, 3, ...) to the device
    rows.give_back(taken, event=copy_done)     # reusable once the copy has finished
"""

from __future__ import annotations

import threading

import torch


class LoadRows:
    """`capacity` rows of `page_bytes` bytes in host memory (pinned if `pin`), taken and given back
    by index. The memory is allocated on the first `reserve` or `take`."""

    def __init__(self, page_bytes: int, *, capacity: int, pin: bool):
        if page_bytes <= 0 or capacity <= 0:
            raise ValueError(f"page_bytes and capacity must be positive, got {page_bytes}, {capacity}")
        self.page_bytes, self.capacity, self.pin = page_bytes, capacity, pin
        self._lock = threading.Lock()
        self._data: torch.Tensor | None = None   # [capacity, page_bytes] uint8
        self._free: set[int] = set(range(capacity))
        self._retired: list[tuple[list[int], object]] = []   # (rows, the CUDA event of the copy reading them)

    @property
    def in_use(self) -> int:
        """Rows taken and not yet free again (given back rows whose copy is still running count)."""
        with self._lock:
            return self.capacity - len(self._free)

    @property
    def allocated(self) -> bool:
        return self._data is not None

    def reserve(self) -> None:
        """Allocate the rows now (the engine does it on the I/O thread at start-up, pinned on CUDA)."""
        with self._lock:
            self._allocate(self.capacity)

    def take(self, n: int) -> list[int]:
        """Up to `n` free rows, lowest first (so a lookup's rows tend to be one contiguous run)."""
        with self._lock:
            self._reclaim(wait=False)
            if len(self._free) < n:
                self._reclaim(wait=True)
            if self._data is None or (len(self._free) < n and len(self._free) == self.capacity):
                self._allocate(max(n, self.capacity))   # nothing in use: grow (or allocate) at once
            taken = sorted(self._free)[:n]
            self._free.difference_update(taken)
            return taken

    def give_back(self, rows: list[int], *, event=None) -> None:
        """Free `rows`; with a CUDA `event`, only once it has completed (the copy reading them)."""
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

    def _allocate(self, capacity: int) -> None:
        if self._data is not None and capacity <= self._data.shape[0]:
            return
        self._data = None   # the old rows are all free: drop them before pinning the new ones
        self._data = torch.empty(capacity, self.page_bytes, dtype=torch.uint8, pin_memory=self.pin)
        self.capacity = capacity
        self._free = set(range(capacity))

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
