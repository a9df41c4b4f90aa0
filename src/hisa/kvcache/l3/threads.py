"""A thread pool made on first use: the L3 parts that fan work out (file reads, checksum checks)
pay for threads only once they have enough work, and close them with the store."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
# Page reads and checksums release the GIL, so threads move pages in parallel (one thread reads and
# checks ~3 GB/s from the page cache on the H200 machine's host). Half the cores, at most 16: the
# memory bus saturates before every core reads, and the engine thread, the L3 I/O thread and the
# CUDA driver need cores of their own. There, 800 pages of 2 MiB read and checked at 17.4 GB/s
# (median) on 8 threads and 10.1 GB/s on 16 (bench/results/l3_read_h200_zlibng.json); on a 2-core
# machine both cores read.
_CPUS = os.cpu_count() or 1
THREADS = max(min(2, _CPUS), min(16, _CPUS // 2))
MIN_ITEMS = 4  # fewer items than this run on the caller's thread (a thread hop costs more)


class LazyThreads:
    """`map` over a pool of `workers` threads named `name`-N, created on the first call with at least
    MIN_ITEMS items; `close` joins them (and a later `map` makes new ones).

    Example::

        readers = LazyThreads("hisa-l3-file")
        data = readers.map(read_file, paths)   # a list, in the order of paths
        readers.close()
    """

    def __init__(self, name: str, workers: int = THREADS):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.name, self.workers = name, workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()   # (several threads may fan work out at once: one pool is made)

    def map(self, fn: Callable[..., T], *items: Iterable) -> list[T]:
        """[fn(*row) for row in zip(*items)], on the pool. Every call has ended when it returns or
        raises (the first exception, in item order): none is left writing into a caller's buffer."""
        columns = [list(c) for c in items]
        if len(columns[0]) < MIN_ITEMS or self.workers == 1:
            return [fn(*row) for row in zip(*columns)]
        pool = self._made()
        futures = [pool.submit(fn, *row) for row in zip(*columns)]
        wait(futures)
        return [f.result() for f in futures]

    def submit(self, fn: Callable[..., T], *args) -> Future:
        """fn(*args) on the pool (made now if need be): its Future."""
        return self._made().submit(fn, *args)

    def _made(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
