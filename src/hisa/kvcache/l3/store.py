"""L3Store: checksums, an LRU capacity bound and fault handling over one storage backend.

A backend only moves opaque values (`exists/get/set/delete`, batched; file, redis, mooncake). This
class is what the engine talks to; it adds what every backend needs alike:

- every page is framed with a checksum (`record.py`) and verified on every read: a missing or
  corrupt page reads as a miss (counted; a corrupt one is also deleted), never as KV;
- `capacity_bytes` (`--l3-gb`) bounds the bytes this process keeps in the store, evicting its least
  recently used pages (written or read) first; a backend that can list its pages seeds the order
  at start-up (file: by modification time; redis: in scan order);
- a backend error (the server went away, the disk failed) never reaches the engine: the call returns
  misses / stores nothing, a warning is logged, `stats.failures` counts it and the store is
  unavailable ("no L3") until `retry_after_s` has passed, when the next call tries again.

Torch-free. Not thread-safe: one thread calls it, the engine's L3 I/O thread (`worker.py`), or the
engine thread itself in the synchronous mode (a `get` or `get_into` reads and checks its pages on a
pool of threads of its own, one per core up to 32: file reads and crc32 release the GIL).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence, TypeVar

from hisa.kvcache.l3 import record
from hisa.kvcache.l3.threads import THREADS, LazyThreads

log = logging.getLogger("hisa.l3")
T = TypeVar("T")
# several stores read at once (`get_into_chunked`): the bytes of pages each store reads per call; each
# call's pages are checked on the reader threads while the next are read
CHUNK_BYTES = 16 << 20


class L3Backend(Protocol):
    """What a storage backend provides. Values are opaque bytes; keys are short ASCII strings."""
    name: str
    errors: tuple[type[BaseException], ...]   # what a failing backend raises; anything else is a bug

    def exists(self, keys: Sequence[str]) -> list[bool]: ...
    def get(self, keys: Sequence[str]) -> list[bytes | None]: ...
    # Optional (file, redis, mooncake have it): `get_into(keys, buffers) -> list[int | None]` reads
    # each value straight into its writable buffers (a list of memoryviews, filled in order) if it is
    # exactly as long as they are, and returns its length (not read if it differs) or None if absent.
    # L3Store.get_into uses it where present, else `get` and a copy: one page per call on its reader
    # threads (the backend's get_into must then be callable from several threads at once), or the
    # whole batch in one call where the backend sets `get_into_batched = True` (mooncake: its client
    # moves a batch's pages in parallel itself).
    def set(self, keys: Sequence[str], values: Sequence[bytes]) -> None: ...
    def delete(self, keys: Sequence[str]) -> None: ...
    def listing(self) -> list[tuple[str, int]]: ...   # (key, stored bytes), oldest first; [] if unknown
    def close(self) -> None: ...


@dataclass(slots=True)
class L3Stats:
    """Counters since the store was opened (pages unless the name says bytes)."""
    hits: int = 0
    misses: int = 0           # asked for and absent
    corrupt: int = 0          # present but failed the checksum (read as a miss; deleted)
    unavailable: int = 0      # asked for while the backend was down (read as a miss)
    failures: int = 0         # backend calls that raised
    pages_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class L3Store:
    """Pages keyed by content in one backend, checked, bounded and fault-tolerant.

    Example::

        store = L3Store(FileBackend("/tmp/hisa-l3"), capacity_bytes=8 << 30)
        store.set(["key0", "key1"], [page0_bytes, page1_bytes])
        store.exists(["key0", "key9"])       # [True, False]
        store.get(["key0", "key9"])          # [memoryview of page0, None]
    """

    def __init__(self, backend: L3Backend, *, capacity_bytes: int | None = None, retry_after_s: float = 30.0,
                 read_threads: int = THREADS, clock: Callable[[], float] = time.monotonic):
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive or None, got {capacity_bytes}")
        self.backend = backend
        self.capacity_bytes = capacity_bytes
        self.retry_after_s = retry_after_s
        self.stats = L3Stats()
        self._clock = clock
        # reads and checksums of a batch of pages (`readers.workers`: how many threads)
        self.readers = LazyThreads("hisa-l3-read", read_threads)
        self._down_until: float | None = None      # None: available
        self._lru: OrderedDict[str, int] = OrderedDict()  # key -> stored bytes, oldest first
        self._used = 0
        if capacity_bytes is not None:
            ok, listing = self._call("listing", backend.listing)
            for key, nbytes in listing if ok else ():
                self._touch(key, nbytes)
            self._evict(keep=())

    # -- state -------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the backend is considered down (until the retry time)."""
        return self._down_until is None or self._clock() >= self._down_until

    @property
    def used_bytes(self) -> int:
        """Bytes of the pages this process knows to be stored (what `capacity_bytes` bounds)."""
        return self._used

    # -- the interface -----------------------------------------------------------------------
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each page is stored (cheap; not checksummed: `get` is the only verdict)."""
        if not keys:
            return []
        ok, found = self._call("exists", lambda: self.backend.exists(keys))
        return list(found) if ok else [False] * len(keys)

    def get(self, keys: Sequence[str]) -> list[memoryview | None]:
        """The verified payload of each page, or None for a miss (absent, corrupt or L3 down)."""
        if not keys:
            return []
        ok, records = self._call("get", lambda: self.backend.get(keys))
        if not ok:
            self.stats.unavailable += len(keys)
            return [None] * len(keys)
        self._check_count(records, keys)
        # the checksums, several threads at once (crc32 releases the GIL)
        payloads = self.readers.map(record.decode, keys, records)
        self._tally(keys, [None if r is None else len(r) for r in records], [p is not None for p in payloads])
        return payloads

    def get_into(self, keys: Sequence[str], payloads: Sequence[memoryview]) -> list[bool]:
        """Read each page's payload straight into `payloads[i]` (a writable buffer exactly one page
        long, e.g. a row of a pinned host tensor) and check it there: True where it now holds a
        verified page, False for a miss (absent, corrupt, of another length, or L3 down; counted as
        `get` counts them), whose buffer holds garbage.

        A backend with `get_into` (file, redis) reads each page on one of the store's threads, which
        then checks it while it is warm in the cache: no bytes object, no copy; mooncake reads the
        batch in one call, then the threads check it. Others `get` the batch; each page is then
        copied into its buffer and checked on those threads.

        Example::

            rows = numpy.empty((2, page_bytes), numpy.uint8)
            store.get_into(["key0", "key9"], [memoryview(rows[0]), memoryview(rows[1])])   # [True, False]
        """
        results = self._read_into(keys, payloads, check=True)
        if results is None:
            return [False] * len(keys)
        sizes, good = zip(*results) if results else ((), ())
        return self._tally(keys, list(sizes), list(good))

    def get_into_unchecked(self, keys: Sequence[str], payloads: Sequence[memoryview]) -> list[int | None]:
        """`get_into` less the payloads' checksums, for a caller that checks them elsewhere (on the GPU
        once they have landed there: `hisa.ops.crc32.crc32_pages`): for each page the crc32 its
        payload must have, continued from `record.key_crc(key)`, where it was read whole into its
        buffer with a sound head, else None (a miss, counted as `get_into` counts it). The pages
        returned count as hits until the caller reports those whose payload failed the check
        (`corrupt_found`)."""
        results = self._read_into(keys, payloads, check=False)
        if results is None:
            return [None] * len(keys)
        sizes, wants = zip(*results) if results else ((), ())
        self._tally(keys, list(sizes), [w is not None for w in wants])
        return list(wants)

    def corrupt_found(self, keys: Sequence[str], payload_bytes: int) -> None:
        """Pages that `get_into_unchecked` returned and whose payload (`payload_bytes` each) then
        failed its checksum: counted as corrupt instead of as hits, and deleted."""
        if not keys:
            return
        self.stats.hits -= len(keys)
        self.stats.bytes_read -= len(keys) * payload_bytes
        self.stats.corrupt += len(keys)
        log.warning("L3 (%s): %d corrupt page(s) read as misses and deleted", self.backend.name, len(keys))
        self.delete(keys)

    def set(self, keys: Sequence[str], pages: Sequence[bytes | bytearray | memoryview]) -> int:
        """Store pages (overwriting); returns how many were stored (0 while L3 is down). A page
        larger than the whole capacity is skipped."""
        if len(keys) != len(pages):
            raise ValueError(f"{len(keys)} keys for {len(pages)} pages")
        records = [record.encode(k, p) for k, p in zip(keys, pages)]
        if self.capacity_bytes is not None:
            fits = [i for i, r in enumerate(records) if len(r) <= self.capacity_bytes]
            keys, records = [keys[i] for i in fits], [records[i] for i in fits]
        if not keys:
            return 0
        if not self._call("set", lambda: self.backend.set(keys, records))[0]:
            return 0
        for key, rec in zip(keys, records):
            self._touch(key, len(rec))
            self.stats.bytes_written += len(rec) - record.HEADER_BYTES - len(key)
        self.stats.pages_written += len(keys)
        self._evict(keep=set(keys))
        return len(keys)

    def delete(self, keys: Sequence[str]) -> bool:
        """Remove pages (absent ones are ignored); False if the backend could not be reached."""
        if not keys:
            return True
        ok, _ = self._call("delete", lambda: self.backend.delete(keys))
        if ok:
            for key in keys:
                self._forget(key)
        return ok

    def close(self) -> None:
        self._call("close", self.backend.close)
        self.readers.close()

    # -- internals ---------------------------------------------------------------------------
    def _read_into(self, keys: Sequence[str], payloads: Sequence[memoryview], *, check: bool) -> list[tuple] | None:
        """Read each page into its payload buffer on the reader threads: (stored length or None if
        absent, verdict) per page, the verdict being `_verdict`'s; None while L3 is down (counted)."""
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} keys for {len(payloads)} buffers")
        if not keys:
            return []
        payloads = [memoryview(p).cast("B") for p in payloads]
        heads = [bytearray(record.head_bytes(k)) for k in keys]
        read_into = getattr(self.backend, "get_into", None)
        chunked = getattr(self.backend, "get_into_chunked", None) if getattr(self.backend, "get_into_batched", False) \
            else None
        if chunked is not None:   # several stores read batches at once: each call's pages checked as it returns
            def verdict(i: int, size: int | None) -> tuple:
                return size, _verdict(keys[i], heads[i], payloads[i], size == len(heads[i]) + len(payloads[i]), check)

            def sharded() -> list[tuple]:
                checks: dict[int, Future] = {}
                lock = threading.Lock()

                def on_read(idx: list[int], sizes: list) -> None:
                    with lock:
                        for i, size in zip(idx, sizes):
                            checks[i] = self.readers.submit(verdict, i, size)
                try:
                    self._check_count(chunked(keys, [[h, p] for h, p in zip(heads, payloads)],
                                              chunk=max(1, CHUNK_BYTES // max(1, len(payloads[0]))),
                                              on_read=on_read), keys)
                finally:
                    wait(list(checks.values()))   # (none left reading a caller's buffer)
                return [checks[i].result() for i in range(len(keys))]

            ok, results = self._call("get", sharded)
        elif read_into is not None and getattr(self.backend, "get_into_batched", False):
            def batch() -> list[tuple]:
                sizes = read_into(keys, [[h, p] for h, p in zip(heads, payloads)])
                self._check_count(sizes, keys)
                return self.readers.map(
                    lambda key, size, head, payload: (size, _verdict(key, head, payload,
                                                                     size == len(head) + len(payload), check)),
                    keys, sizes, heads, payloads)

            ok, results = self._call("get", batch)
        elif read_into is not None:
            def one(key: str, head: bytearray, payload: memoryview) -> tuple:
                size = read_into([key], [[head, payload]])[0]
                return size, _verdict(key, head, payload, size == len(head) + len(payload), check)

            ok, results = self._call("get", lambda: self.readers.map(one, keys, heads, payloads))
        else:
            ok, records = self._call("get", lambda: self.backend.get(keys))
            if ok:
                self._check_count(records, keys)
                results = self.readers.map(functools.partial(_copy_in, check=check), keys, records, heads, payloads)
        if not ok:
            self.stats.unavailable += len(keys)
            return None
        return results

    def _check_count(self, records: Sequence, keys: Sequence[str]) -> None:
        if len(records) != len(keys):
            raise RuntimeError(f"L3 backend {self.backend.name} returned {len(records)} pages for {len(keys)} keys")

    def _tally(self, keys: Sequence[str], sizes: list[int | None], good: list[bool]) -> list[bool]:
        """Count a read's pages (`sizes`: their stored lengths, None if absent; `good`: passed the
        checks), forget the absent ones, delete the corrupt ones; returns `good`."""
        bad: list[str] = []
        for key, size, ok in zip(keys, sizes, good):
            if size is None:
                self.stats.misses += 1
                self._forget(key)
            elif not ok:
                self.stats.corrupt += 1
                bad.append(key)
            else:
                self.stats.hits += 1
                self.stats.bytes_read += size - record.head_bytes(key)
                self._touch(key, size)
        if bad:
            log.warning("L3 (%s): %d corrupt page(s) read as misses and deleted", self.backend.name, len(bad))
            self.delete(bad)
        return good

    def _call(self, op: str, fn: Callable[[], T]) -> tuple[bool, T | None]:
        """(True, fn()) or (False, None): a backend error marks L3 down for `retry_after_s` (warned,
        counted), and while it is down no call is made."""
        if not self.available:
            return False, None
        was_down = self._down_until is not None
        try:
            result = fn()
        except self.backend.errors as e:
            self.stats.failures += 1
            self._down_until = self._clock() + self.retry_after_s
            log.warning("L3 (%s) %s failed: %s: %s; running without L3 for %.0f s", self.backend.name, op,
                        type(e).__name__, e, self.retry_after_s)
            return False, None
        if was_down:
            self._down_until = None
            log.warning("L3 (%s) is back", self.backend.name)
        return True, result

    def _touch(self, key: str, nbytes: int) -> None:
        old = self._lru.pop(key, None)
        self._used += nbytes - (old or 0)
        self._lru[key] = nbytes

    def _forget(self, key: str) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._used -= old

    def _evict(self, *, keep) -> None:
        if self.capacity_bytes is None or self._used <= self.capacity_bytes:
            return
        victims: list[str] = []
        freed = 0
        for key, nbytes in self._lru.items():   # oldest first
            if self._used - freed <= self.capacity_bytes:
                break
            if key in keep:
                continue
            victims.append(key)
            freed += nbytes
        if victims and self.delete(victims):
            self.stats.evictions += len(victims)


def _verdict(key: str, head: bytearray, payload: memoryview, whole: bool, check: bool):
    """check: whether the page read is intact (bool); else the crc its payload must have, or None if
    it was not read whole or its head is not sound."""
    if check:
        return whole and record.check(key, head, payload)
    return record.expected_crc(key, head, len(payload)) if whole else None


def _copy_in(key: str, rec: bytes | None, head: bytearray, payload: memoryview, *, check: bool) -> tuple:
    """(stored length or None, `_verdict`) of a record a backend returned whole, copied into `head`
    + `payload` first (when it has their length)."""
    if rec is None:
        return None, _verdict(key, head, payload, False, check)
    whole = len(rec) == len(head) + len(payload)
    if whole:
        view = memoryview(rec)
        head[:] = view[:len(head)]
        payload[:] = view[len(head):]
    return len(rec), _verdict(key, head, payload, whole, check)
