"""A thread pool made on first use: the L3 parts that fan work out (file reads, checksum checks)
pay for threads only once they have enough work, and close them with the store."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
THREADS = min(8, os.cpu_count() or 1)
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
        self.name, self.workers = name, workers
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[..., T], *items: Iterable) -> list[T]:
        columns = [list(c) for c in items]
        if len(columns[0]) < MIN_ITEMS:
            return [fn(*row) for row in zip(*columns)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
        return list(self._pool.map(fn, *columns))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
