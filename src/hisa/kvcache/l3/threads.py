"""A thread pool made on first use: the L3 parts that fan work out (file reads, checksum checks)
pay for threads only once they have enough work, and close them with the store."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
# Page reads and checksums release the GIL, so a thread per core moves pages in parallel (one
# thread reads ~6 GB/s from the page cache here). Capped: past a few dozen threads the memory
# bus, not the thread count, limits a load.
THREADS = max(1, min(32, os.cpu_count() or 1))
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

    def map(self, fn: Callable[..., T], *items: Iterable) -> list[T]:
        """[fn(*row) for row in zip(*items)], on the pool. Every call has ended when it returns or
        raises (the first exception, in item order): none is left writing into a caller's buffer."""
        columns = [list(c) for c in items]
        if len(columns[0]) < MIN_ITEMS or self.workers == 1:
            return [fn(*row) for row in zip(*columns)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
        futures = [self._pool.submit(fn, *row) for row in zip(*columns)]
        wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
