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
capacity (with several areas, a quarter more: see below): a lookup takes rows after waiting for the
copies of rows given back; one larger than the capacity (allowed when it is alone) grows it once no
row is in use.

**Areas.** The rows may live in memory an L3 backend lends (its `host_buffer`: a Mooncake store
process's shared pool, which that store's reads fill without a copy). Pages spread over several
such stores (`ShardedBackend`) each land only in their own store's pool, so the rows are then cut
into one area per store (`lenders`), each holding a share of the capacity plus a margin for the
uneven spread of keys, and a lookup asks for each page's row in the area of the store that holds
it (`take(n, areas=...)`); a page whose area is full takes a row of another, which its store then
reads through a scratch area and a copy (slower, not wrong). A run of rows (`runs`) never
crosses from one area into the next.

Example::

    rows = LoadRows(page_bytes, capacity=1024, pin=True)
    taken = rows.take(3)                       # engine thread: [0, 1, 2] (None: not enough free)
    store.get_into(keys, rows.views(taken))    # I/O thread: pages read and checked in place
    ...                                        # engine thread: copy rows.pages(0, 3, ...) to the device
    rows.give_back(taken, event=copy_done)     # reusable once the copy has finished
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

log = logging.getLogger("hisa.l3")

# areas > 1: each area holds this much more than its even share of the capacity (keys spread over N
# stores by a hash: a 1,024-page lookup over 4 stores puts 256 +- ~14 (one sigma) pages on each)
AREA_MARGIN = 1.25


class Lender(Protocol):
    """An L3 backend that lends host memory its reads fill without a copy (MooncakeBackend)."""

    def host_buffer(self, nbytes: int) -> memoryview | None: ...

    def release_host_buffer(self, view: memoryview) -> None: ...


class LoadRows:
    """`capacity` rows of `page_bytes` bytes in host memory (pinned if `pin`), taken and given back
    by index. The memory is allocated on the first `reserve` or `take`."""

    def __init__(self, page_bytes: int, *, capacity: int, pin: bool, lenders: Sequence[Lender | None] = (None,)):
        """lenders: one per area of rows: where that area's memory comes from when it can (the backend's
        `host_buffer`, pinned here by registering it with CUDA; told by `release_host_buffer` when the
        area is no longer used: the rows grew, or closed), or None / a None from it: memory of our own.
        Several lenders cut the rows into areas (see the module's doc)."""
        if page_bytes <= 0 or capacity <= 0:
            raise ValueError(f"page_bytes and capacity must be positive, got {page_bytes}, {capacity}")
        if not lenders:
            raise ValueError("lenders: at least one (None: memory of our own)")
        self.page_bytes, self.pin, self.lenders = page_bytes, pin, list(lenders)
        self.per_area = self._per_area(capacity)
        self._lock = threading.Lock()
        self._data: list[torch.Tensor] | None = None   # per area [per_area, page_bytes] uint8
        self._lent: list[memoryview | None] = [None] * self.areas   # each area's lent memory, if lent
        self._registered: list[int] = []   # addresses of areas registered with CUDA
        self._free: set[int] = set(range(self.capacity))
        self._retired: list[tuple[list[int], object]] = []   # (rows, the CUDA event of the copy reading them)

    @property
    def areas(self) -> int:
        return len(self.lenders)

    @property
    def capacity(self) -> int:
        return self.per_area * self.areas

    def _per_area(self, rows: int) -> int:
        return rows if self.areas == 1 else math.ceil(rows * AREA_MARGIN / self.areas)

    @property
    def in_use(self) -> int:
        """Rows taken and not yet free again (given back rows whose copy is still running count)."""
        with self._lock:
            return self.capacity - len(self._free)

    def reserve(self) -> None:
        """Allocate the rows now (the engine does at start-up on CUDA: pinning is slow)."""
        with self._lock:
            self._allocate(0)

    def has_free(self, n: int) -> bool:
        """Whether `take(n)` would find `n` rows now (after the same waits for the copies of rows given
        back). Engine thread only."""
        with self._lock:
            return self._room(n)

    def take(self, n: int, *, areas: Sequence[int] | None = None) -> list[int] | None:
        """`n` free rows, lowest first (so a lookup's rows tend to be one run; with `areas`, lowest
        first within each area, so each area's rows tend to be one run), or None if not that
        many are free even after waiting for the copies of those given back (rows held by lookups
        in flight). `areas`: the area each row should come from (one per row; with several areas:
        a page's store), any area's lowest free row where its own has none left. Engine thread only."""
        if areas is not None and len(areas) != n:
            raise ValueError(f"{len(areas)} areas for {n} rows")
        with self._lock:
            if not self._room(n):
                return None
            if self._data is None or len(self._free) < n:
                self._allocate(n)   # nothing allocated yet, or none in use: allocate (or grow) at once
            free = sorted(self._free)
            if areas is None or self.areas == 1:
                taken = free[:n]
            else:
                by_area: list[list[int]] = [[] for _ in range(self.areas)]
                for r in reversed(free):   # (each list lowest last: pop() takes the lowest)
                    by_area[r // self.per_area].append(r)
                taken, short = [], []
                for i, a in enumerate(areas):
                    if not 0 <= a < self.areas:
                        raise ValueError(f"area {a} of {self.areas}")
                    if by_area[a]:
                        taken.append(by_area[a].pop())
                    else:
                        taken.append(-1)
                        short.append(i)
                rest = sorted(r for lst in by_area for r in lst)
                for i, r in zip(short, rest):
                    taken[i] = r
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
        hosts = [d.numpy() for d in self._data]   # per area [per_area, page_bytes] uint8, the same memory
        return [memoryview(hosts[r // self.per_area][r % self.per_area]) for r in rows]

    def pages(self, first: int, end: int, *, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Rows first..end-1 (of one area: a run of `runs`) as pages: a view [end - first, *shape] of
        `dtype` (no copy)."""
        a, i = divmod(first, self.per_area)
        if (end - 1) // self.per_area != a:
            raise ValueError(f"rows {first}..{end - 1} cross from one area into the next")
        return self._data[a][i:i + end - first].view(dtype).view(end - first, *shape)

    def runs(self, rows: list[int]) -> list[tuple[int, int, int]]:
        """`runs(rows)` (module function), each run also within one area: what `pages` takes."""
        if self.areas == 1:
            return runs(rows)
        out = []
        for pos, first, end in runs(rows):
            while first < end:
                stop = min(end, (first // self.per_area + 1) * self.per_area)
                out.append((pos, first, stop))
                pos, first = pos + stop - first, stop
        return out

    def spans(self, rows: list[int]) -> list[tuple[list[int], int, int]]:
        """The rows as runs in row order (each within one area): (the positions in `rows` of rows
        first..end-1, first, end). Rows taken from several areas come in runs of a page or two in
        `rows`' (page) order, but in one run per area in row order: copy them by these, each to
        its positions."""
        where = {r: i for i, r in enumerate(rows)}
        return [([where[r] for r in range(first, end)], first, end) for _, first, end in self.runs(sorted(rows))]

    @property
    def backend_memory(self) -> bool:
        """Whether some of the rows live in memory a lender lent."""
        return any(v is not None for v in self._lent)

    @property
    def all_lent(self) -> bool:
        """Whether every area of the rows lives in memory a lender lent (False before they are allocated)."""
        return self._data is not None and all(v is not None for v in self._lent)

    def close(self) -> None:
        """Wait for the copies reading the rows, then let their memory go (unregistered from CUDA
        first where it was registered): before the backend that lent it closes."""
        with self._lock:
            self._reclaim(wait=True)
            self._drop()

    def _allocate(self, rows: int) -> None:
        """Allocate the areas (none yet), or grow them for a lookup of `rows` rows (all free)."""
        per = max(self.per_area, self._per_area(rows))
        if self._data is not None and per == self.per_area:
            return
        self._drop()   # the old rows are all free: drop them before pinning the new ones
        nbytes = per * self.page_bytes
        data = []
        for a, lender in enumerate(self.lenders):
            lent = lender.host_buffer(nbytes) if lender is not None else None
            if lent is not None:
                area = torch.frombuffer(lent, dtype=torch.uint8).view(per, self.page_bytes)
                if self.pin:
                    rc = torch.cuda.cudart().cudaHostRegister(area.data_ptr(), nbytes, 0)
                    if int(rc) != 0:
                        log.warning("L3: cudaHostRegister of the %d bytes of load rows the backend lent failed (%s): "
                                    "pinned memory of our own instead", nbytes, rc)
                        lender.release_host_buffer(lent)
                        lent = None
                    else:
                        self._registered.append(area.data_ptr())
            if lent is None:
                area = torch.empty(per, self.page_bytes, dtype=torch.uint8, pin_memory=self.pin)
            self._lent[a] = lent
            data.append(area)
        self._data, self.per_area = data, per
        self._free = set(range(self.capacity))

    def _drop(self) -> None:
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered = []
        self._data = None
        for a, lent in enumerate(self._lent):
            if lent is not None:
                self._lent[a] = None
                self.lenders[a].release_host_buffer(lent)

    def _room(self, n: int) -> bool:
        """(Under the lock.) Whether `n` rows can be taken: free after the copies of rows given back
        (waiting for them only if need be), or by allocating or growing the rows, which happens only
        when none is in use."""
        self._reclaim(wait=False)
        if len(self._free) < n:
            self._reclaim(wait=True)
        return len(self._free) >= n or self._data is None or len(self._free) == self.capacity

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
