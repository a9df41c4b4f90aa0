"""Torch-free bookkeeping of fixed-size KV pages: which page ids are free, shared or cached.

A page is *in use* while at least one request holds it (a reference count: requests that share a
prompt prefix hold the same pages). A full page may also be *registered* under a key (the chained
hash of its tokens and every token before them, `hisa.engine.prefix_cache`): when its last holder
frees it, it keeps its KV and its key and becomes *cached* instead of free, so a later request with
the same prefix can take it back (`lookup` + `share`) instead of recomputing it. Cached pages count
as free: `allocate` takes truly free pages first, then evicts cached ones, least recently freed
first, dropping their keys.

Pages freed with a keep-alive deadline (`free(pages, keep_until=t)`: a finished turn of an agent
session, `SamplingParams.keep_alive`) are *kept*: cached pages evicted only after every ordinary
cached page, the request freed first first (LRU by request); past its deadline a kept page is an
ordinary cached one again (the oldest).

The free ids and the reference counts are numpy arrays, not Python lists: at page size 1 (DSA's
latent rows) a 128K request holds 131K page ids and the pools tens of millions, so `free` works on a
request's whole list at once (the step in which requests finish is the one that pays), and the
pool holds no Python int per id. Against the lists it replaced (`python bench/page_allocator_cpu.py
--against 353fc8e`, 2-core CPU machine, a 20M-id pool, 16 requests of 131K ids; bench/results/
page_allocator_cpu.json): `free` 32.8 ns per id against 83.9 (11.0 -> 4.3 ms per 128K request),
the pool 180 MB of host memory against 960 MB and made in 0.012 s against 1.0 s, `allocate(1)` (a
decode step's new page, a scalar path) 0.95 against 3.0 µs; but `allocate(n)` 38.8 ns per id
against 19.4 (the list it returns needs a new int per id, which the old free list kept alive:
+2.5 ms per 128K request, at admission, beside a prefill of seconds).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

SMALL = 32  # lists up to this long are freed one id at a time (numpy's per-call cost is higher)


class PageAllocator:
    """Page ids 0..num_pages-1: a free list, reference counts and an LRU of cached prefix pages.

    Example::

        alloc = PageAllocator(8)
        pages = alloc.allocate(3)       # [0, 1, 2]
        alloc.register(pages[0], b"k0")  # page 0 now holds the prefix named b"k0"
        alloc.free(pages)               # page 0 is cached, 1 and 2 are free; num_free == 8
        alloc.share(alloc.lookup([b"k0", b"k1"]))   # [0]: a later request takes page 0 back
    """

    def __init__(self, num_pages: int, *, clock: Callable[[], float] = time.monotonic):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.clock = clock  # the time keep-alive deadlines are read on
        # free ids, a stack: _stack[:_top] are free, the last one is handed out first (low ids first)
        self._stack = np.arange(num_pages - 1, -1, -1, dtype=np.int32 if num_pages < 2**31 else np.int64)
        self._top = num_pages
        self._refs = np.zeros(num_pages, dtype=np.int32)
        self._named = np.zeros(num_pages, dtype=bool)  # registered (a key in _key_of): for free's vector path
        self._key_of: dict[int, bytes] = {}  # registered pages (in use or cached) -> key
        self._page_of: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # refs 0, still registered; oldest first
        self._kept: OrderedDict[int, float] = OrderedDict()  # cached under a keep-alive deadline; oldest first
        self.evicted = 0  # cached pages handed out again (their prefix forgotten)
        self.kept_evicted = 0  # of which kept pages, evicted before their deadline

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: free ones and cached ones (evicted on demand)."""
        return self._top + len(self._cached) + len(self._kept)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached) + len(self._kept)

    @property
    def num_kept(self) -> int:
        """Cached pages still under a keep-alive deadline (counted in num_cached too)."""
        self._expire()
        return len(self._kept)

    def _expire(self) -> None:
        """Kept pages past their deadline become ordinary cached pages, ahead of those freed since."""
        now, gone = self.clock(), []
        while self._kept:
            p, until = next(iter(self._kept.items()))
            if until > now:
                break
            del self._kept[p]
            gone.append(p)
        for p in reversed(gone):
            self._cached[p] = None
            self._cached.move_to_end(p, last=False)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} pages, {self.num_free} free")
        if n > self._top and self._kept:
            self._expire()
        stack, refs, top = self._stack, self._refs, self._top
        if n <= top:   # the common case: free ids only (no eviction)
            self._top = top - n
            if n == 1:  # a decode step's next page (at page size 1, every step of every request)
                p = int(stack[top - 1])
                refs[p] = 1
                return [p]
            taken = stack[top - n:top][::-1]
            refs[taken] = 1
            return taken.tolist()
        pages = stack[:top][::-1].tolist()  # every free id first, in the order they would be handed out
        self._top = 0
        while len(pages) < n:  # evict the least recently freed cached page; kept pages only once none is left
            if self._cached:
                p, _ = self._cached.popitem(last=False)
            else:
                p, _ = self._kept.popitem(last=False)
                self.kept_evicted += 1
            del self._page_of[self._key_of.pop(p)]
            self._named[p] = False
            self.evicted += 1
            pages.append(p)
        refs[pages] = 1
        return pages

    def free(self, pages: Iterable[int], *, keep_until: float | None = None) -> None:
        """Drop one reference to each page; a page nobody holds becomes cached (registered) or free.
        keep_until: registered pages that become cached are kept until then (`self.clock` time).
        A page freed more often than it is held raises ValueError, and then nothing is freed."""
        keep = keep_until is not None and keep_until > self.clock()
        pages = pages if isinstance(pages, list) else list(pages)
        n = len(pages)
        refs = self._refs
        if n > SMALL:
            ids = np.fromiter(pages, dtype=np.int64, count=n)
            if ids.min() < 0 or ids.max() >= self.num_pages:
                bad = ids[(ids < 0) | (ids >= self.num_pages)][0]
                raise ValueError(f"page {bad} is not a page of this pool ({self.num_pages} pages)")
            held, order = refs[ids], np.arange(n, dtype=np.int32)
            refs[ids] = order  # a page listed twice reads back another position's number
            once = bool((refs[ids] == order).all())
            refs[ids] = held
            if once:
                if (held <= 0).any():
                    raise ValueError(f"page {ids[held <= 0][0]} freed twice or never allocated")
                refs[ids] = held - 1
                done = ids[held == 1]  # nobody holds these now
                named = self._named[done]
                loose = done[~named]
                self._stack[self._top:self._top + loose.size] = loose
                self._top += loose.size
                self._cache(done[named].tolist(), keep_until if keep else None)
                return
        # short lists, and lists naming a page twice: one id at a time
        count: dict[int, int] = {}
        for p in pages:
            count[p] = count.get(p, 0) + 1
        for p, c in count.items():
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page {p} is not a page of this pool ({self.num_pages} pages)")
            if refs[p] < c:
                raise ValueError(f"page {p} freed twice or never allocated")
        done = []
        for p in pages:
            left = int(refs[p]) - 1
            refs[p] = left
            if left == 0:
                done.append(p)
        for p in done:
            if not self._named[p]:
                self._stack[self._top] = p
                self._top += 1
        self._cache([p for p in done if self._named[p]], keep_until if keep else None)

    def _cache(self, pages: list[int], keep_until: float | None) -> None:
        """Registered pages nobody holds any more: cached (kept until keep_until, if given), in order."""
        for p in pages:
            if keep_until is not None:
                self._kept[p] = keep_until
            else:
                self._cached[p] = None

    # -- prefix pages --------------------------------------------------------------------------
    def register(self, page: int, key: bytes) -> bool:
        """Name an in-use full page by its prefix key. False (nothing changes) when the key already
        names another page or the page already has a key."""
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not in use: only a page holding KV can be registered")
        if key in self._page_of or page in self._key_of:
            return False
        self._key_of[page], self._page_of[key] = key, page
        self._named[page] = True
        return True

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The pages of the leading run of `keys` that are registered (in use or cached)."""
        pages = []
        for key in keys:
            p = self._page_of.get(key)
            if p is None:
                break
            pages.append(p)
        return pages

    def share(self, pages: list[int]) -> None:
        """Take one more reference to each (registered) page; cached ones are in use again."""
        for p in pages:
            if p not in self._key_of:
                raise ValueError(f"page {p} holds no registered prefix")
            if self._refs[p] == 0 and self._kept.pop(p, None) is None:
                del self._cached[p]
            self._refs[p] += 1

    def hold(self, pages: list[int]) -> None:
        """Take one more reference to each in-use page (registered or not): it is not handed out again
        until `free` drops it (e.g. while a background write still reads it)."""
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} is not in use: only a page holding KV can be held")
        for p in pages:
            self._refs[p] += 1

    def refs(self, page: int) -> int:
        return int(self._refs[page])

    def forget(self, page: int) -> None:
        """Unname an in-use page that only one holder has (its content is about to change)."""
        if self._refs[page] != 1:
            raise ValueError(f"page {page} has {self._refs[page]} holders: only a page held once may be rewritten")
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]
            self._named[page] = False
