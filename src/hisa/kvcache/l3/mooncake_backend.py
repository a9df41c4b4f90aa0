"""L3 backend `mooncake`: pages as objects in a Mooncake Store (PyPI mooncake-transfer-engine-non-cuda).

A Mooncake Store is a master (`mooncake_master`, which here also serves the transfer engine's
metadata over HTTP) plus store processes that lend memory segments (`mooncake_client
--global_segment_size=...`). hisa joins as a client lending none by default (`segment_bytes=0`)
and moves pages over TCP (no RDMA hardware is needed). Calls return status codes; a negative one
other than "not found" is raised as MooncakeError, which L3Store turns into "no L3".

Loads (`get_into`) go straight into the caller's buffers (`batch_get_into_multi_buffers`: the
record's head into a small buffer, the page into its row of the pinned host rows), a batch per
call. `L3Store.get_into` of 200 pages of 2 MiB on loopback, on this project's 2-core machine: 1.22-1.27
GB/s, against 0.55-0.58 GB/s through `get_batch` (bytes objects via the client's local buffer) and a
copy into the rows.

**Through a store process on the same host** (`client="HOST:PORT"`, `--l3
mooncake://MASTER?client=HOST:PORT`: the port of that store process's client service, its
`--port`): hisa joins as that process's *dummy client* (`setup_dummy`) and the pages move through
shared memory instead of TCP: a memory pool of `pool_bytes` that both processes map, into which the
store process copies each page it holds. Reads land only in buffers inside that pool, so the
backend offers the pool to the caller (`host_buffer`: the engine puts its L3 load rows there) and
stages any other buffer through a scratch area of its own (the records' small heads always; a copy
more). 192 pages of 2 MiB on the 2-core machine: 7.6-10.1 GB/s through the pool against 1.7-1.8
GB/s over TCP in the same run; on the H200 machine's host 4.6-5.0 against 2.6-3.4 GB/s. Mooncake
cannot free a pool area, so those of a closed backend are kept for the next backend of the same
store process in this process (`_SPARE_AREAS`) instead of mapping more.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Sequence

try:
    from mooncake.store import MooncakeDistributedStore
except ImportError as e:  # pragma: no cover - depends on the optional package
    MooncakeDistributedStore = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

log = logging.getLogger("hisa.l3")

# mooncake-store/include/types.h ErrorCode
OBJECT_NOT_FOUND = -704
_BATCH_BYTES = 32 << 20   # bytes per put call: a batch goes through the client's local buffer
_SCRATCH_BYTES = 32 << 20  # dummy client: the pool area other buffers are staged through (heads, pages)
_WARM_BLOCK, _WARM_KEYS = 2 << 20, 16   # dummy client: a fresh pool area is written once in these (`_warm`)
# Dummy clients: the shared-pool areas a closed backend held, by store process (its client address):
# (start, bytes). Mooncake has no call that frees an `alloc_from_mem_pool` area (each is a shared-memory
# segment this process keeps mapped), so the next backend of that store process in this process takes
# them instead of mapping more (an engine closed and made again, a test per backend). An area works
# with a later dummy client of the same store process once registered with it.
_SPARE_AREAS: dict[str, list[tuple[int, int]]] = {}
_SPARE_LOCK = threading.Lock()


class MooncakeError(RuntimeError):
    """A Mooncake Store call returned an error code."""


class MooncakeBackend:
    """One Mooncake Store, reached through its master.

    Example::

        b = MooncakeBackend(master="127.0.0.1:50051", metadata="http://127.0.0.1:8080/metadata")
        b.set(["ab12"], [b"..."]); b.get(["ab12"])   # [b"..."]
    """
    name = "mooncake"
    errors: tuple[type[BaseException], ...] = (MooncakeError,)
    get_into_batched = True   # L3Store hands get_into a whole batch: the client moves its pages in parallel

    def __init__(self, *, master: str, metadata: str, local_hostname: str = "127.0.0.1",
                 segment_bytes: int = 0, local_buffer_bytes: int = 128 << 20, protocol: str = "tcp",
                 client: str | None = None, pool_bytes: int = 4 << 30):
        if MooncakeDistributedStore is None:
            raise ImportError(f"the mooncake backend needs the package mooncake-transfer-engine-non-cuda "
                              f"({_IMPORT_ERROR})")
        self.store = MooncakeDistributedStore()
        self._pool: list[tuple[int, int]] = []   # dummy client: (start, end) of the pool areas it holds
        self._lent: set[int] = set()             # dummy client: starts of the areas lent (`host_buffer`)
        self._scratch = 0                        # dummy client: start of the scratch area (0: none yet)
        self._pool_left = 0
        self.staged_bytes = 0   # dummy client: bytes read through the scratch area and copied out (heads, pages)
        self._client = client
        if client is None:
            rc = self.store.setup(local_hostname, metadata, segment_bytes, local_buffer_bytes, protocol, "", master)
            if rc != 0:
                raise MooncakeError(f"could not join the Mooncake Store at master {master} (metadata {metadata}): "
                                    f"setup returned {rc}")
        else:
            if pool_bytes < _SCRATCH_BYTES:
                raise ValueError(f"pool_bytes must be at least {_SCRATCH_BYTES}, got {pool_bytes}")
            rc = self.store.setup_dummy(pool_bytes, local_buffer_bytes, client)
            if rc != 0:
                raise MooncakeError(f"could not reach the Mooncake store process at {client} (its client "
                                    f"service, mooncake_client --port): setup_dummy returned {rc}")
            self._pool_left = pool_bytes
            try:
                self._scratch = self._alloc(_SCRATCH_BYTES)[0]
            except BaseException:
                self.store.close()
                raise
            self._scratch_lock = threading.Lock()
        self._closed = False
        self._page_bytes = 1 << 20   # the largest page seen (a guess until then): sizes get batches

    @property
    def lends_host_memory(self) -> bool:
        """Whether `host_buffer` lends memory (a dummy client: its store process's shared pool)."""
        return bool(self._pool)

    def host_buffer(self, nbytes: int) -> memoryview | None:
        """Dummy client: `nbytes` of the shared pool, which reads fill without a copy (the engine's L3
        load rows), or None when there is no pool, not that much of it is left, or the store process
        refuses it (warned: the caller uses memory of its own). Lent until `release_host_buffer` or
        this backend's close."""
        if not self._pool:
            return None
        try:
            ptr, fresh = self._alloc(nbytes)
        except MooncakeError as e:
            log.warning("L3 (mooncake): no %.2f GB of the shared pool for the load rows (%s): pages will be "
                        "read through its scratch area and copied (raise pool_gb)", nbytes / 1e9, e)
            return None
        if fresh:
            self._warm(ptr, nbytes)
        self._lent.add(ptr)
        return memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")

    def release_host_buffer(self, view: memoryview) -> None:
        """A `host_buffer` area no longer used: a later `host_buffer` of this backend may take it."""
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if ptr not in self._lent:
            raise ValueError("release_host_buffer: not an area this backend lent")
        self._lent.discard(ptr)

    def _warm(self, ptr: int, nbytes: int) -> None:
        """Have the store process write every block of a fresh pool area once. Its first write into a
        part of the shared pool is slow whatever our side did to it (this 2-core machine: 1.7-1.8 GB/s
        into fresh rows, 7.7-9.9 GB/s into rows it wrote before, with keys new or old; the H200 host:
        1.7 against 4.8-5.1), so without this a fresh engine's first lookups pay it. The blocks come
        from `_WARM_KEYS` distinct keys of our own, stored for this and deleted after (one key asked
        for several times in one batch is read once: the other buffers stay cold). Best effort: a
        store with no room for them leaves the area cold."""
        block = min(_WARM_BLOCK, nbytes)
        keys = [f"hisa-warm-{os.getpid()}-{ptr:x}-{j}" for j in range(_WARM_KEYS)]
        try:   # (removed whatever happens: a batch stored in part leaves keys too)
            if self.store.upsert_batch(keys, [bytes(block)] * len(keys)) != 0:
                log.warning("L3 (mooncake): could not warm the shared pool's load rows; the first lookups read "
                            "slower")
                return
            offsets = list(range(0, nbytes - block + 1, block))
            for i in range(0, len(offsets), len(keys)):
                part = offsets[i:i + len(keys)]
                self.store.batch_get_into(keys[:len(part)], [ptr + o for o in part], [block] * len(part))
        finally:
            self.store.batch_remove(keys, True)

    def _alloc(self, nbytes: int) -> tuple[int, bool]:
        """(start, whether it is freshly mapped) of a pool area of at least `nbytes`: an area of this
        backend that is not lent, else a spare one a closed backend of the same store process held
        (`_SPARE_AREAS`, registered with this client), else a new one, within `pool_bytes`."""
        mine = [(a, b - a) for a, b in self._pool if a != self._scratch and a not in self._lent]
        fit = min((x for x in mine if x[1] >= nbytes), key=lambda x: x[1], default=None)
        if fit is not None:
            return fit[0], False
        with _SPARE_LOCK:
            spare = _SPARE_AREAS.get(self._client, [])
            fit = min((x for x in spare if x[1] >= nbytes), key=lambda x: x[1], default=None)
            if fit is not None:
                spare.remove(fit)
        fresh = fit is None
        if fresh:
            if nbytes > self._pool_left:
                raise MooncakeError(f"the shared pool has {self._pool_left} of its pool_bytes left, not {nbytes}")
            ptr = self.store.alloc_from_mem_pool(nbytes)
            if not ptr:
                raise MooncakeError(f"the shared pool has no {nbytes} bytes left")
            size = nbytes
        else:
            ptr, size = fit
        rc = self.store.register_buffer(ptr, size)
        if rc != 0:
            with _SPARE_LOCK:   # (mapped all the same: the next backend may register it)
                _SPARE_AREAS.setdefault(self._client, []).append((ptr, size))
            raise MooncakeError(f"register_buffer of the shared pool returned {rc}")
        self._pool.append((ptr, ptr + size))
        if fresh:
            self._pool_left -= size
        return ptr, fresh

    def _in_pool(self, ptr: int, size: int) -> bool:
        return any(a <= ptr and ptr + size <= b for a, b in self._pool)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        codes = self.store.batch_is_exist(list(keys))
        bad = [c for c in codes if c < 0]
        if bad:
            raise MooncakeError(f"batch_is_exist returned {bad[0]}")
        return [c == 1 for c in codes]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        # get_batch gives b"" for a page it does not find; a page is never empty (it has a header).
        # Batches go through the client's local buffer too: as many keys per call as fit in
        # _BATCH_BYTES at the size of the largest page seen so far.
        out: list[bytes | None] = []
        start = 0
        while start < len(keys):
            step = max(1, _BATCH_BYTES // max(self._page_bytes, 1))
            part = list(keys[start:start + step])
            values = self.store.get_batch(part)
            if len(values) != len(part):
                raise MooncakeError(f"get_batch returned {len(values)} values for {len(part)} keys")
            for v in values:
                self._page_bytes = max(self._page_bytes, len(v))
                out.append(v if len(v) else None)
            start += len(part)
        return out

    def get_into(self, keys: Sequence[str], buffers: Sequence[Sequence[memoryview]]) -> list[int | None]:
        """Read each key's value straight into its writable `buffers` (filled in order; e.g. a small
        head buffer and a row of the pinned host rows) if it is exactly as long as they are: its
        length, or None if absent. One `batch_get_into_multi_buffers` call (the client writes each
        value across its buffers itself: no bytes object, no copy through the local buffer); a value
        of another length is not read and its length is asked for (`get_size`)."""
        keys = list(keys)
        if not keys:
            return []
        holders = [[(ctypes.c_char * len(v)).from_buffer(v) for v in map(_bytes_view, bufs)] for bufs in buffers]
        ptrs = [[ctypes.addressof(h) for h in hs] for hs in holders]
        sizes = [[len(h) for h in hs] for hs in holders]
        codes = self._get_through_pool(keys, ptrs, sizes) if self._pool else \
            self.store.batch_get_into_multi_buffers(keys, ptrs, sizes)
        if len(codes) != len(keys):
            raise MooncakeError(f"batch_get_into_multi_buffers returned {len(codes)} codes for {len(keys)} keys")
        out: list[int | None] = []
        for key, code, want in zip(keys, codes, sizes):
            if code == OBJECT_NOT_FOUND:
                out.append(None)
            elif code >= 0:
                out.append(code)
            else:   # a value that does not fit the buffers reads as an error code: which, its size says
                size = self.store.get_size(key)
                if size == OBJECT_NOT_FOUND:
                    out.append(None)
                elif size < 0 or size == sum(want):
                    raise MooncakeError(f"batch_get_into_multi_buffers returned {code} for a page of {size} bytes")
                else:
                    out.append(size)
        return out

    def _get_through_pool(self, keys: list[str], ptrs: list[list[int]], sizes: list[list[int]]) -> list[int]:
        """batch_get_into_multi_buffers of a dummy client, which reads only into its shared pool: buffers
        inside it are read into directly, the others through the scratch area (in as many calls as
        it takes) and copied out."""
        codes: list[int] = []
        with self._scratch_lock:
            start = 0
            while start < len(keys):
                used, staged, call_ptrs, end = 0, [], [], start
                while end < len(keys):
                    row, outside, at = [], [], used   # this key's buffers: in the pool, or at scratch + at
                    for p, n in zip(ptrs[end], sizes[end]):
                        if self._in_pool(p, n):
                            row.append(p)
                        else:
                            row.append(self._scratch + at)
                            outside.append((self._scratch + at, p, n))
                            at += n
                    if at - used > _SCRATCH_BYTES:
                        raise MooncakeError(f"a page of {at - used} bytes does not fit the {_SCRATCH_BYTES}-byte "
                                            f"scratch area")
                    if at > _SCRATCH_BYTES:
                        break   # (this key goes first in the next call)
                    call_ptrs.append(row)
                    staged += outside
                    used = at
                    end += 1
                got = self.store.batch_get_into_multi_buffers(keys[start:end], call_ptrs, sizes[start:end])
                for src, dst, n in staged:
                    ctypes.memmove(dst, src, n)
                    self.staged_bytes += n
                codes.extend(got)
                start = end
        return codes

    def set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        start, size = 0, 0
        for i, value in enumerate(values):
            size += len(value)
            self._page_bytes = max(self._page_bytes, len(value))
            if size >= _BATCH_BYTES or i == len(values) - 1:
                rc = self.store.upsert_batch(list(keys[start:i + 1]), list(values[start:i + 1]))
                if rc != 0:
                    raise MooncakeError(f"upsert_batch of {i + 1 - start} page(s) returned {rc}")
                start, size = i + 1, 0

    def delete(self, keys: Sequence[str]) -> None:
        # force: a page read a moment ago is leased to its reader (5 s by default) and would refuse
        # removal; a reader racing with the removal gets a torn page, which the checksum rejects.
        codes = self.store.batch_remove(list(keys), True)
        bad = [c for c in codes if c not in (0, OBJECT_NOT_FOUND)]
        if bad:
            raise MooncakeError(f"batch_remove returned {bad[0]}")

    def listing(self) -> list[tuple[str, int]]:
        return []   # the store does not list keys; capacity counts what this process writes

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for a, _ in self._pool:
                self.store.unregister_buffer(a)
            self.store.close()
            if self._pool:   # kept mapped by this process whatever we do: for the next backend of this store
                with _SPARE_LOCK:
                    _SPARE_AREAS.setdefault(self._client, []).extend((a, b - a) for a, b in self._pool)
                self._pool, self._lent = [], set()


def _bytes_view(buf) -> memoryview:
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise ValueError("get_into needs writable buffers")
    return view
