"""Torch-free bookkeeping of fixed-size KV pages: which page ids are free."""

from __future__ import annotations


class PageAllocator:
    """A free list of page ids 0..num_pages-1.

    Example::

        alloc = PageAllocator(8)
        pages = alloc.allocate(3)   # [0, 1, 2]
        alloc.free(pages)
        assert alloc.num_free == 8
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() from the end hands out low ids first
        self._used = bytearray(num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._used[p] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if not self._used[p]:
                raise ValueError(f"page {p} freed twice or never allocated")
            self._used[p] = 0
            self._free.append(p)
