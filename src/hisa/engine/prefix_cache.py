"""Prefix reuse in the device page pool (L1): a prompt that starts with KV already computed skips it.

Every full page a request computes in the pool (prompt or generated tokens) is registered in the page
allocator under the chained digest of its tokens and every token before them (as L3 keys pages,
`hisa.kvcache.l3.keys`, without the layout: one engine, one layout). When its last holder frees it,
the page keeps its KV as a *cached* page (counted as free, evicted least recently freed first when
the pool needs room). A request being admitted takes the leading run of its full pages that
the allocator knows (shared with running requests, or cached) instead of prefilling them: only the
rest is prefilled, in chunks as usual. At least its last token is always computed: its logits give
the next token. A preempted request finds its own pages again this way if nobody evicted them.

Multi-turn chats and agents send the previous turn's prompt and answer as the start of the next
prompt: its pages were registered as they filled, answer included.

Sparse requests take part while they are *resident* (every page in the pool): a sparse request that
matched a prefix must be admitted resident (`Scheduler._admit`; if only the host pool has room it
gives the pages back and prefills host-backed), its representations of the shared pages are built
from their keys with its first chunk (`SparseCoordinator.prefill_resident`), and when it is demoted
to the host pool its LRU slots are pages it holds alone, unnamed by the cache (they will be
overwritten), while the pages it shares only lose its reference (`Scheduler._demote_one`).
Host-backed requests' pages are host pages: `HostPrefixCache` (below) does the same in the host
pool (L2). DeepSeek-V3.2 models (MLA cache) do not use this. Torch-free.

Example::

    prefix = DevicePrefixCache(allocator, page_size=16)
    prefix.match(seq)            # at admission: seq.pages / seq.num_computed cover its cached prefix
    prefix.register([seq])       # after a step: its newly full pages become reusable
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from hisa.engine.sequence import Sequence
from hisa.kvcache.l3.keys import DIGEST_BYTES, chain_digest, salted
from hisa.kvcache.page_allocator import PageAllocator

_ROOT = hashlib.blake2b(b"hisa-device-prefix-v1", digest_size=DIGEST_BYTES).digest()


@dataclass(slots=True)
class PrefixCacheStats:
    lookups: int = 0         # requests looked up at admission
    requests_hit: int = 0    # of which at least one page was reused
    pages_hit: int = 0
    tokens_hit: int = 0      # prompt tokens not prefilled
    pages_registered: int = 0


def count_admitted(seq: Sequence) -> None:
    """`seq` was admitted: count the prefix lookups it made on its way in (`DevicePrefixCache.match`
    leaves them on the request, since one that waits for room is looked up again at each step)."""
    for stats, pages, tokens in seq.prefix_counts:
        stats.lookups += 1
        if pages:
            stats.requests_hit += 1
            stats.pages_hit += pages
            stats.tokens_hit += tokens
    seq.prefix_counts.clear()


class DevicePrefixCache:
    """Shares and registers full pages of requests held in the device pool (dense and resident sparse
    ones) through a :class:`PageAllocator`."""

    def __init__(self, allocator: PageAllocator, *, page_size: int):
        self.allocator, self.page_size = allocator, page_size
        self.stats = PrefixCacheStats()

    def digests(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """The chain digests of seq's first num_pages full pages (extended and kept on the seq)."""
        s, have = self.page_size, seq.prefix_digests
        parent = have[-1] if have else _ROOT
        salt = seq.key_salt(s)
        for i in range(len(have), num_pages):
            if salt is not None and i == salt[0]:   # its decoded pages: its own (Sequence.decode_salt)
                parent = salted(parent, salt[1])
            parent = chain_digest(parent, seq.token_ids[i * s:(i + 1) * s])
            have.append(parent)
        return have[:num_pages]

    def num_cached(self, seq: Sequence, num_pages: int) -> int:
        """How many of seq's first num_pages full pages the pool holds now (nothing is taken)."""
        return len(self.allocator.lookup(self.digests(seq, num_pages)))

    def match(self, seq: Sequence) -> int:
        """Give a request that holds no pages yet the leading pages the pool knows (a sparse one then
        has to be admitted resident: `Scheduler._admit`). Returns the tokens it no longer has to
        prefill (seq.num_computed)."""
        if seq.pages or seq.num_computed:
            return 0
        full = (seq.num_tokens - 1) // self.page_size  # the last token is always computed
        if full == 0:
            return 0
        pages = self.allocator.lookup(self.digests(seq, full))
        seq.prefix_counts.append((self.stats, len(pages), len(pages) * self.page_size))  # see count_admitted
        if not pages:
            return 0
        self.allocator.share(pages)
        seq.pages = pages
        seq.num_computed, seq.num_registered = len(pages) * self.page_size, len(pages)
        seq.needs_prefill = True
        return seq.num_computed

    # which requests' pages this cache names: those held in the device pool (not host-backed ones)
    host_pages = False

    def register(self, seqs: list[Sequence]) -> None:
        """Register the pages of `seqs` (after a step) that have filled since last time, if they are
        this cache's pool's (device pages here; host pages for `HostPrefixCache`)."""
        s = self.page_size
        for seq in seqs:
            if seq.host_backed != self.host_pages or not seq.pages:
                continue
            full = min(seq.num_computed // s, len(seq.pages))
            if full <= seq.num_registered:
                continue
            keys = self.digests(seq, full)
            for i in range(seq.num_registered, full):
                self.stats.pages_registered += self.allocator.register(seq.pages[i], keys[i])
            seq.num_registered = full

    def metrics(self) -> dict[str, int]:
        a = self.allocator
        return {**asdict(self.stats), "pages_cached": a.num_cached, "pages_evicted": a.evicted,
                "pages_kept": a.num_kept, "kept_pages_evicted": a.kept_evicted}


class HostPrefixCache(DevicePrefixCache):
    """Prefix reuse in the host pool (L2) for host-backed sparse requests: the same scheme over the host
    pool's allocator. A host-backed request registers its full host pages as they fill (prompt and
    answer); when it ends they stay cached (evicted least recently freed first when the host pool
    needs room), and a new request that will be host-backed takes the leading run its prompt shares
    (`match`, then marked host-backed: `Scheduler._admit` admits it only so) instead of prefilling it;
    its first chunk builds the shared pages' representations (`SparseCoordinator.prefill_host_backed`).
    A full host page is never written again (a chunk writes from the page it starts in; decode writes
    the page of its new token), so sharing one is safe.

    Example::

        host_prefix = HostPrefixCache(host_pool.allocator, page_size=16)
        host_prefix.match(seq)       # seq.pages: the host pages of its cached prefix
        host_prefix.register([seq])  # after a step (host-backed requests only)
    """

    host_pages = True

    def match(self, seq: Sequence) -> int:
        got = super().match(seq)
        if got:
            seq.host_backed = True
        return got
