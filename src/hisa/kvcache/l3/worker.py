"""L3Worker: the one thread that calls an L3Store, so that a slow backend never stalls the engine.

The engine hands it calls (a lookup; a write of pages already copied off the device) and goes on.
They run one at a time, in the order handed over, on a thread named `hisa-l3-io`. That order is the
consistency rule: a lookup handed over after a write sees what the write stored (a request parked
and then looked up again finds its pages). Another engine or process sharing the store sees a
write once it has run; `drain()` waits for that.

Pending writes hold their pages' bytes in host memory; `max_pending_bytes` bounds them. A write
that would pass the bound is refused (`room_for` says so before the caller copies anything): L3 is
a cache, the engine never waits for it, and the caller counts what it dropped. A write is always
taken when nothing is pending, so one write larger than the bound (a long request's parking) is
never refused for its size alone, as in the synchronous mode.

`threaded=False` is the synchronous mode: each call runs at once on the caller's thread and its
exception, if any, is raised there (a slow backend then delays the caller again).

An exception from a call on the thread (a bug: L3Store turns backend failures into misses) is
logged, kept and raised by the next `check()`, which the engine calls before each schedule.

Torch-free.
"""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

log = logging.getLogger("hisa.l3")
T = TypeVar("T")
MAX_PENDING_BYTES = 2 << 30


class L3Worker:
    """Runs L3 calls in order on one background thread (or inline), with pending writes bounded.

    Example::

        io = L3Worker(max_pending_bytes=1 << 30)
        if io.room_for(len(page)):
            io.submit(lambda: store.set(["key0"], [page]), nbytes=len(page))
        found = io.submit(lambda: store.exists(["key0"]))   # runs after the write
        found.result()                                     # [True]
        io.close()                                         # runs what is queued, then joins the thread
    """

    def __init__(self, *, threaded: bool = True, max_pending_bytes: int = MAX_PENDING_BYTES):
        if max_pending_bytes <= 0:
            raise ValueError(f"max_pending_bytes must be positive, got {max_pending_bytes}")
        self.threaded = threaded
        self.max_pending_bytes = max_pending_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hisa-l3-io") if threaded else None
        self._lock = threading.Lock()   # the counters below change on both threads
        self._pending_calls = 0
        self._pending_bytes = 0
        self._failure: BaseException | None = None

    @property
    def pending_calls(self) -> int:
        """Calls handed over that have not ended (queued or running)."""
        return self._pending_calls

    @property
    def pending_bytes(self) -> int:
        """Bytes the pending calls hold (the `nbytes` they were submitted with: pages to write)."""
        return self._pending_bytes

    def room_for(self, nbytes: int) -> bool:
        """Whether a write of `nbytes` may be submitted now (nothing pending, or within the bound)."""
        with self._lock:
            return self._pending_bytes == 0 or self._pending_bytes + nbytes <= self.max_pending_bytes

    def submit(self, fn: Callable[[], T], *, nbytes: int = 0) -> Future[T]:
        """Run `fn` after every call submitted before it; `nbytes`: the host bytes it holds until it ends."""
        if self._pool is None:
            future: Future[T] = Future()
            future.set_result(fn())
            return future
        with self._lock:
            self._pending_calls += 1
            self._pending_bytes += nbytes
        future = self._pool.submit(fn)
        future.add_done_callback(functools.partial(self._ended, nbytes=nbytes))   # also when cancelled
        return future

    def check(self) -> None:
        """Raise (once) the exception of a call that failed on the thread since the last check."""
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def drain(self) -> None:
        """Wait until every call submitted so far has ended."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def close(self) -> None:
        """Run the calls still queued, then join the thread. Idempotent. Called on the thread itself
        (an engine collected there by the garbage collector), it does not wait for itself."""
        if self._pool is not None:
            self._pool.shutdown(wait=not threading.current_thread().name.startswith("hisa-l3-io"))

    def _ended(self, future: Future, *, nbytes: int) -> None:
        error = None if future.cancelled() else future.exception()
        with self._lock:
            self._pending_calls -= 1
            self._pending_bytes -= nbytes
            if error is not None and self._failure is None:
                self._failure = error
        if error is not None:
            log.error("an L3 call failed on the I/O thread: %r", error, exc_info=error)
