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
"""

from __future__ import annotations

import ctypes
from typing import Sequence

try:
    from mooncake.store import MooncakeDistributedStore
except ImportError as e:  # pragma: no cover - depends on the optional package
    MooncakeDistributedStore = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

# mooncake-store/include/types.h ErrorCode
OBJECT_NOT_FOUND = -704
_BATCH_BYTES = 32 << 20   # bytes per put call: a batch goes through the client's local buffer


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
                 segment_bytes: int = 0, local_buffer_bytes: int = 128 << 20, protocol: str = "tcp"):
        if MooncakeDistributedStore is None:
            raise ImportError(f"the mooncake backend needs the package mooncake-transfer-engine-non-cuda "
                              f"({_IMPORT_ERROR})")
        self.store = MooncakeDistributedStore()
        rc = self.store.setup(local_hostname, metadata, segment_bytes, local_buffer_bytes, protocol, "", master)
        if rc != 0:
            raise MooncakeError(f"could not join the Mooncake Store at master {master} (metadata {metadata}): "
                                f"setup returned {rc}")
        self._closed = False
        self._page_bytes = 1 << 20   # the largest page seen (a guess until then): sizes get batches

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
        codes = self.store.batch_get_into_multi_buffers(keys, ptrs, sizes)
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
            self.store.close()


def _bytes_view(buf) -> memoryview:
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise ValueError("get_into needs writable buffers")
    return view
