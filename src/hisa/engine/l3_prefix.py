"""Prefix reuse from L3 for every request of a paged (GQA) cache: dense, sparse resident (device
pool) and sparse host-backed (host pool): load a prompt's full pages that L3 holds instead of
prefilling them, and store a request's full pages once they are computed.

A page in L3 is one token page across every layer, `[layers, 2, page_size, kv_heads, head_dim]`
in the cache's dtype (what `PagedKVCache.data[:, page]` holds), keyed by the chain of its tokens
and the KV layout (`hisa.kvcache.l3.keys`).

Asynchronous: every L3 call runs on one I/O thread (`hisa.kvcache.l3.worker`), one at a time in the
order handed over, so a slow backend (a slow disk, a far Redis) never delays a step of the running
requests.

Load: before each schedule, each waiting request the scheduler may admit next (never looked
up since it last lost its pages) is marked `loading` and its lookup goes to the I/O thread: which
of its keys L3 holds, then a read of the leading run of them straight into reusable host rows
(`l3_rows.LoadRows`: pinned on CUDA, allocated once), each page checked in place on the store's
reader threads (`L3Store.get_into`). On CUDA the pages read and checked so far are copied on to
the device (a landing stream) at each step while the rest are read. The scheduler leaves a loading request
waiting (it holds no pages and no slot; requests behind it may be admitted) while the others keep
stepping. Once the lookup is back (checked before each schedule), the leading pages the pool's
prefix cache holds then are shared, and the run of pages that L3 returned after them, checksums
passed, is copied into newly allocated device pages (on CUDA asynchronously: device to device for
the pages landed, one copy per run of rows for the rest, no host copy before it); all count as
computed, so the scheduler
prefills only the rest (a chunk after a cached prefix). At least the prompt's last token is always
computed: its logits give the first output token. A missing or corrupt page ends the run; nothing
past it is used. When nothing else can run, the engine step waits for a lookup (briefly, so that new
requests and aborts get in). A lookup not back after `load_timeout_s` stops being waited for
(`loads_timed_out`) as a cut read does (below): the pages read so far are used. A read that would
take longer than prefilling its pages (this read's or the store's recent rate against the engine's
prefill rate: `_too_slow`; CUT_MARGIN) is cut short, its pages read so far used (`loads_cut_short`;
by the I/O thread before its next batch, or by the engine while a batch is in flight). For a dense
request the cut comes sooner, once the read would take more than half as long as prefilling
(SPLIT_MARGIN), and the pages it has not read are then read from the prompt's last page back while
the request prefills from the front, its chunks stopping where the two meet (`_BackRead`,
`loads_split`). On CUDA a back read's pages are copied on to the device at each step while it goes
on (`_land_back`), so where the two meet only device-to-device copies are left. (A read much faster
than prefilling is not split: on an H200 that made the file store's TTFT 0.26 instead of 0.21 s at
11-15 GB/s; a Mooncake read at 5 GB/s, 0.75 of the prefill's time, split at 0.29-0.33 instead of
0.47 s: "2026-12-04" and "2026-12-04, night" in docs/architecture.md.) A backend
error reads as misses (`L3Store`). A request
aborted while loading holds nothing but its lookup, which is forgotten. A lookup back while the
batch is full takes nothing and is made again later; a request that took pages but that the
schedule did not admit gives them back right after it (a waiting request cannot be preempted:
holding pages it could starve the running ones): they stay cached in the pool's prefix cache when
it is on, and a dense request is looked up again. A sparse request that took pages must be admitted
resident (its pages are device pages; representations are built from their keys with its first
chunk); one that then does not fit resident is not looked up again and may go host-backed.

Host-backed sparse requests (`host` set: the sparse cache's host pool): a sparse request that will be
host-backed (residency "host", or "auto" when the device pool cannot hold its whole KV now) is looked
up only when its whole KV fits the host pool (with the running host-backed requests' one-page margin)
and the device its LRU buffer: its pages are read into the lookup rows as above (never landed on the
device), then copied into new host pool pages, one copy per layer and run of rows, and the request
is marked host-backed; `Scheduler._admit` admits it only so, and its first prefill chunk, which reads
the context back from the host pool, builds the representations of every page from page 0. Never a
part of its pages: host pages a request gives back are not cached, so a part it could not prefill on
from would be read from L3 at every step until it fits.

Store: once a request's prefill reaches the end of its prompt, its full prompt pages are
written; when it finishes (stop or length), its answer's full pages too (a chat's or an agent's next
turn starts with this turn's prompt and answer, and finds all of it in L3). The pages are copied off
the device at once (one gather on the device, then on CUDA an asynchronous copy into pinned staging
rows reserved at start-up, `l3_rows.LoadRows`, so the caller may free or overwrite them right after
and the engine thread does not wait for the copy; on the CPU one copy) and the write (which of the
keys L3 lacks, then one batched `set` of those) goes to the I/O thread once the copy has completed
(checked by the engine thread at each step and before a lookup; the I/O thread makes no CUDA call,
which a CUDA graph being captured would refuse), which frees the rows after it. (A synchronous copy
into new pageable memory ran at ~1 GB/s on an H200 machine: 2.0 of the 2.3 s to the first token of
a 16K-token prompt that filled L3, bench/results/l3_prefix_gpu_h200_fillprof.json.) A write of more
pages than the staging rows hold copies synchronously. Pending writes hold at most `max_pending_bytes`
of pages in host memory: a write past that, or one that finds no free staging rows, is dropped
(`pages_dropped`; L3 is a cache, the engine never waits for it). The leading pages that
L3 held at the request's lookup, or handed over already, are not copied again; pages it shared from
the pool are written if L3 lacks them (their writer's write may have been dropped, or L3 evicted
them). A host-backed sparse request's pages are read from the host pool by the I/O thread (gathered
across layers into the page layout, then written the same way; on CUDA handed over once the device's
writes into them have landed, as staged writes are): the engine thread copies nothing, and holds the
pages (`PageAllocator.hold`) until the write has read them, so that no other request is handed them
meanwhile (`release_holds`, engine thread: at each step, drain and close).

Consistency: a lookup runs after every write handed over before it, so it finds their pages (a
request parked and then looked up again finds its own). Another engine or process sharing the store
finds a write once it has run; `drain()` waits for that.

Parking: a request the scheduler preempts (the device pool ran short) first hands its full
pages, prompt and generated tokens alike, to a write; its pages are then freed as before. When it
is looked up again, the lookup runs after that write and finds them under the keys of its tokens so
far: it resumes from L3 instead of recomputing its whole context; only the tokens past its last
full page run again.

`sync=True` (`EngineConfig.l3_async=False`) runs every L3 call at once on the engine thread: a
lookup and its reads before the schedule, a write where it is handed over (a slow backend then
delays every step). MLA caches (DeepSeek-V3.2) are not served yet.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hisa.engine.l3_rows import LoadedRun, LoadRows, runs
from hisa.engine.scheduler import Scheduler
from hisa.engine.sequence import Sequence
from hisa.kvcache.l3 import KVLayout, L3Store, page_keys
from hisa.kvcache.l3.record import crc32 as record_crc32
from hisa.kvcache.l3.record import key_crc
from hisa.kvcache.l3.threads import LazyThreads
from hisa.kvcache.l3.worker import MAX_PENDING_BYTES, L3Worker
from hisa.kvcache.paged_cache import PagedKVCache
from hisa.ops.crc32 import crc32_pages

log = logging.getLogger("hisa.l3")
COPY_CHUNK_BYTES = 256 << 20  # CUDA: the most bytes of pages one host-to-device copy moves (its device temporary)
LAND_CHUNK_BYTES = 128 << 20  # CUDA: pages a lookup reads per batch; each batch ready is copied to the device meanwhile
# Several stores that read a batch per call (Mooncake x N): a batch is this many LAND_CHUNK_BYTES, one
# per store up to it. Each batch ends when its slowest store has read its share (keys spread by a
# hash: uneven), so small batches wait often: H200, 4 stores, 16K prompt: reads at 10.4-11.0 GB/s in
# batches of 128 MiB, 13.0-13.9 in batches of 512 MiB (bench/results/l3_prefix_gpu_h200_mooncake_x4_chunked*.json).
# A lookup's first batch stays LAND_CHUNK_BYTES: the cut of a slow read (`_too_slow`) waits for a batch.
STORE_CHUNKS = 4
LAND_HEADROOM_BYTES = 1 << 30  # CUDA: pages are copied ahead to the device only while this much more is free there
LOAD_TIMEOUT_S = 10.0      # a lookup not back by then is no longer waited for: treated as a cut read (`_cut`)
CUT_MARGIN = 1.5           # a read is cut short once finishing it looks this many times slower than prefilling its pages
SPLIT_MARGIN = 0.5         # the same where the rest is then read from the back while the front prefills (`_BackRead`)
PREFILL_DECAY = 0.8        # weight of the earlier prefill steps in the prefill rate (decayed sums of tokens and seconds)
READ_BATCH_S = 0.25         # a read's batches hold at most this long a read at the store's recent rate
BACK_BATCH_PAGES = 64      # a back read (`_read_back`) reads this many pages per batch, from the last back
BACK_SPLIT_MIN_PAGES = 4   # a gap to the back read this small is prefilled whole (no prediction of where they meet)
READ_DECAY = 0.5           # the same for the store's read rate (batches read, cut reads' included: it follows a store that changes)
# CUDA: where the crc32 of the pages a lookup lands on the device is checked. "host": on the reader threads
# as they read; "device": on the device after landing (`crc32_pages`); "auto": on the device when the load
# rows lie in store processes' shared memory (Mooncake, `lends_host_memory`), else on the host. On H200
# machines a `file` load read 10-30% slower checked on the device, TTFT 0.20-0.24 against 0.17-0.21 s for a
# 16K prompt (docs/architecture.md, "2026-12-03, later"), while eight Mooncake stores' shared memory
# gave 0.179-0.180 s checked on the device against 0.186-0.233 s on the host ("2026-12-04, night")
CHECK_ON_DEVICE = "auto"


@dataclass(slots=True)
class PrefixStats:
    """Engine-side counters (pages are token pages across all layers). `pages_stored` and
    `pages_parked` count pages written, on the I/O thread once a write has run."""
    lookups: int = 0          # requests whose prompt was looked up
    requests_hit: int = 0     # of which at least one page was loaded
    pages_loaded: int = 0
    tokens_loaded: int = 0    # prompt tokens not prefilled thanks to L3
    pages_stored: int = 0
    requests_parked: int = 0  # preempted requests whose full pages were handed to a write before being freed
    pages_parked: int = 0     # pages those writes added (pages L3 held already are not written again)
    pages_dropped: int = 0    # pages not written: the pending writes held max_pending_bytes already
    loads_timed_out: int = 0  # lookups not back after load_timeout_s (the pages read so far used, the rest read from the back or prefilled)
    loads_cut_short: int = 0  # reads stopped because prefilling their pages looked faster (the pages read so far were used)
    loads_split: int = 0      # cut reads whose later pages were then read from the back while the front prefilled
    pages_met: int = 0        # pages those back reads gave (the prefill and the read met in the middle)


class _StepTimer:
    """The time of one engine step: CUDA events on the current stream (no sync), or the host clock."""

    def __init__(self, tokens: int, device: torch.device):
        self.tokens, self.ok = tokens, False
        self._events = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0, self._t1 = time.perf_counter(), None

    def stop(self, ok: bool = True) -> None:
        """The step is launched (ok) or failed (not counted)."""
        self.ok = ok
        if self._events is not None and ok:
            self._events[1].record()
        else:
            self._events = None
        self._t1 = time.perf_counter()

    def done(self) -> bool:
        """Stopped, and on CUDA the step has run."""
        return self._t1 is not None and (self._events is None or self._events[1].query())

    def seconds(self) -> float:
        if self._events is not None:
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._t1 - self._t0


@dataclass(slots=True)
class _Reading:
    """The host rows of a lookup in flight and how far its read has got."""
    rows: list[int]      # taken for it (one per page from `start` to its cap)
    ready: int = 0       # the leading rows read and checked so far (the I/O thread's; only grows)
    # check_on_device: the payloads are read unchecked; (crc of the key, crc the payload must have) of
    # rows[:ready], in order (the I/O thread's, published before `ready`)
    crcs: list = field(default_factory=list)
    checks: list = field(default_factory=list)  # engine thread: bool device tensors, a landed copy's failed pages
    landed: list = field(default_factory=list)  # engine thread: device copies of rows[:num_landed], in order
    num_landed: int = 0  # rows[:num_landed] are copied to the device (and given back)
    dropped: bool = False
    # the I/O thread's, published once `exists` is back: the leading pages L3 holds, the run from `start`
    # that will be read, and when its read began (time.monotonic())
    in_l3: int = 0
    hits: int = -1
    read_since: float = 0.0
    ready_at: float = 0.0  # the I/O thread's: when `ready` last grew (time.monotonic())
    batch: int = 0         # the I/O thread's: pages of the batch being read, 0 between batches
    # the I/O thread cuts the read before a batch where `_too_slow` by `margin` (None: it never does),
    # at cut_at (time.monotonic())
    margin: float | None = None
    cut_at: float = 0.0


@dataclass(slots=True)
class _BackRead:
    """The rest of a cut read (`_too_slow`), read from its last page back while the request prefills
    from the front: pages first..end-1, page first + i into rows[i]. The request's prefill chunks
    stop at a page boundary short of the pages read (`Sequence.prefill_stop`, `_steer_back_reads`);
    when a chunk reaches them, the pages from there to `end` are copied in (`_take_back`)."""
    seq: Sequence
    first: int
    end: int
    rows: list[int]
    future: Future | None = None
    low: int = 0          # the I/O thread's: pages low..end-1 are read and checked (only falls)
    since: float = 0.0    # the I/O thread's: when its read began (time.monotonic()), 0 before
    stopped: bool = False  # no batch is started after this is set (engine thread)
    cut_at: float = 0.0   # time.monotonic() of the cut that started it
    # CUDA (engine thread): pages landed_low..end-1 are copied on to the device (their rows given back):
    # (first page, [n, layers, 2, S, KVH, D] tensor, the copy's event), in the order landed (last pages first)
    landed_low: int = 0
    landed: list = field(default_factory=list)


@dataclass(slots=True)
class _Lookup:
    """A waiting request's lookup in flight."""
    seq: Sequence
    start: int         # leading pages the pool held when it was handed over: L3's keys start after them
    future: Future     # -> (leading pages in L3, how many pages from `start` were read and checked into the rows)
    deadline: float    # time.monotonic() past which it is given up
    nbytes: int        # the most its rows can hold (pages from `start` to its cap)
    reading: _Reading
    host: bool = False  # its pages go to the host pool (a sparse request admitted host-backed)
    since: float = 0.0  # time.monotonic() when it was handed over


class L3PrefixCache:
    """Loads and stores full pages of requests in the device pool through an :class:`L3Store`, off
    the engine thread.

    Example::

        prefix = L3PrefixCache(open_l3("file:/tmp/l3"), cache=engine.cache, layout=layout)
        prefix.load(engine.scheduler)        # before schedule(): start lookups, apply those back
        prefix.store_prompts(batch.seqs)     # after the step's KV is written
        prefix.close()                       # runs the writes still queued, joins the I/O thread
    """

    def __init__(self, store: L3Store, *, cache: PagedKVCache, layout: KVLayout, sync: bool = False,
                 max_pending_bytes: int = MAX_PENDING_BYTES, load_timeout_s: float = LOAD_TIMEOUT_S):
        self.l3, self.cache, self.layout = store, cache, layout
        self.io = L3Worker(threaded=not sync, max_pending_bytes=max_pending_bytes)
        # lookups in flight may read at most this many bytes of pages into host memory (one always may)
        self.max_lookup_bytes = max_pending_bytes
        self.load_timeout_s = load_timeout_s
        self.page_size = cache.page_size
        self.page_shape = tuple(cache.data.shape[:1] + cache.data.shape[2:])  # [layers, 2, S, KVH, D]
        self.page_bytes = cache.data[:, 0].numel() * cache.data.element_size()
        self.stats = PrefixStats()
        # the host rows lookups read pages into: as many as max_lookup_bytes allows, pinned on CUDA and
        # allocated now (cudaHostAlloc is slow: no lookup should wait for it)
        on_cuda = cache.data.device.type == "cuda"
        self.rows = LoadRows(self.page_bytes, capacity=max(1, self.max_lookup_bytes // self.page_bytes), pin=on_cuda,
                             lenders=_lenders(store.backend))
        # CUDA: the pinned rows writes stage their pages in (the device-to-host copy runs asynchronously;
        # the engine thread hands the write over once it has completed, the I/O thread frees the rows)
        self.store_rows = LoadRows(self.page_bytes, capacity=max(1, max_pending_bytes // self.page_bytes),
                                   pin=True) if on_cuda else None
        if on_cuda:
            self.rows.reserve()
            self.store_rows.reserve()
        # CUDA: the pages of a lookup in flight that are read and checked are copied on to the device
        # (tensors of the caching allocator, on a stream of its own) while the rest are read, so that once
        # it is back only device-to-device copies into the pool's pages are left; off: they wait in the rows
        self.land_on_device = on_cuda
        # CUDA, CHECK_ON_DEVICE: the payloads of pages a lookup lands on the device are checked there
        # (`crc32_pages` on the landing stream, `_verified`) instead of on the store's reader threads
        self._check_on_device = False   # (set below, once the landing stream is made)
        # several batched stores (`_stores_at_once` > 1): read each store's next pages in turn, every store
        # the same share of a batch, instead of the next pages in page order (whose spread over the
        # stores by key is uneven; a batch waits for its slowest store). Off: eight stores on an H200 loaded
        # no faster with it (TTFT 0.201-0.255 against 0.192-0.233 s; docs/architecture.md, "2026-12-04, night")
        self.per_store_batches = False
        self._row_crcs: torch.Tensor | None = None   # pinned [rows, 2]: the crcs of landed rows (`_failed`)
        self._row_pos: torch.Tensor | None = None    # pinned [rows]: landed rows' positions (`_rows_to_device`)
        self._land_stream = torch.cuda.Stream(cache.data.device) if on_cuda else None
        # the engine thread's checks of pages read unchecked that stayed in their rows (`_verified`): threads
        # of their own (made on first use), not queued behind a cut read's batch on the store's readers
        self._checkers = LazyThreads("hisa-l3-check")
        self.check_on_device = on_cuda and checks_on_device(CHECK_ON_DEVICE, self.rows.all_lent)
        self._progressed = threading.Event()   # set by the I/O thread as a lookup's read advances or ends
        # where a load's time goes (cumulative): the I/O thread reading and checking pages into the rows,
        # and the engine thread copying them into device pages (on CUDA: issuing the asynchronous copies;
        # copy_timing() adds their time on the device)
        self.timing = {"exists_s": 0.0, "read_s": 0.0, "read_bytes": 0, "landed_bytes": 0, "copy_s": 0.0, "copied_bytes": 0,
                       # split reads: lookup to cut, cut to the back read's start, its length, cut to the
                       # meeting (summed over loads), and the steps steered meanwhile
                       "cut_after_s": 0.0, "back_wait_s": 0.0, "back_read_s": 0.0, "met_after_s": 0.0,
                       "split_steps": 0,
                       # CUDA: the bytes of back reads' pages copied on to the device while the read went on
                       "back_landed_bytes": 0}
        self._copy_events: list = []   # CUDA: (start, end) events of each load's copies, not yet timed
        self._lookups: dict[str, _Lookup] = {}  # request id -> its lookup in flight
        self._lookup_bytes = 0                  # their nbytes, summed
        self._looked_up: dict[str, int] = {}   # request id -> num_preemptions when last looked up
        self._in_l3: dict[str, int] = {}       # request id -> its leading full pages known in L3 (not written again)
        self._dropped: dict[str, int] = {}     # request id -> pages up to which a refused write was counted
        self._staged: list[tuple] = []         # CUDA: (copy's event, write, bytes) not yet handed over, in order
        # the sparse cache's host pool (hisa.kvcache.host_pool.HostKVPool), set by the engine when sparse
        # requests may be host-backed: their pages are loaded into it and written from it
        self.host = None
        self._unhold: collections.deque[list[int]] = collections.deque()   # host pages whose write has read them
        # a read slower than prefilling would be is cut short (`_too_slow`); the engine's prefill rate, from
        # decayed sums of the prompt tokens and the seconds of its steps that prefilled (`note_prefill`)
        self.cut_slow_loads = True
        self._prefill_tokens = self._prefill_s = 0.0
        self._read_bytes = self._read_secs = 0.0   # the store's recent read rate, the same way (the I/O thread's)
        self._timers: collections.deque[_StepTimer] = collections.deque()   # prefill steps not yet timed, in order
        # reads of a cut read's later pages, back to front, while their request prefills from the front:
        # request id -> its back read (`_BackRead`); off: a cut read's later pages are prefilled
        self.split_slow_loads = True
        self.split_margin = SPLIT_MARGIN   # (an attribute: benchmarks try others)
        self._back: dict[str, _BackRead] = {}
        self._back_copies: list = []   # CUDA: events of back pages' copies the next step must wait for

    def prefill_timer(self, tokens: int) -> "_StepTimer":
        """Time a step that prefills `tokens` prompt tokens (the whole step, decode rows included: an
        underestimate of the rate, which cuts fewer reads short): call `stop()` on what this returns
        once the step is launched. On CUDA two events on the current stream (read once they are done:
        no sync), elsewhere the host's clock."""
        timer = _StepTimer(tokens, self.cache.data.device)
        self._timers.append(timer)
        return timer

    def note_prefill(self, tokens: int, seconds: float) -> None:
        """Add a step that prefilled `tokens` prompt tokens in `seconds` to the prefill rate."""
        if tokens > 0 and seconds > 0:
            self._prefill_tokens = PREFILL_DECAY * self._prefill_tokens + tokens
            self._prefill_s = PREFILL_DECAY * self._prefill_s + seconds

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """The engine's recent prefill rate, from the timed steps that have run (None before any)."""
        self._poll_timers()
        return self._prefill_rate()

    def _prefill_rate(self) -> float | None:
        return self._prefill_tokens / self._prefill_s if self._prefill_s > 0 else None

    def _read_rate(self) -> float | None:
        """The store's recent read rate in bytes/s (None before any batch was read)."""
        return self._read_bytes / self._read_secs if self._read_secs > 0 else None

    def _poll_timers(self) -> None:
        while self._timers and self._timers[0].done():
            timer = self._timers.popleft()
            if timer.ok:
                self.note_prefill(timer.tokens, timer.seconds())

    @property
    def loading(self) -> int:
        """Waiting requests whose lookup is in flight."""
        return len(self._lookups)

    # -- load --------------------------------------------------------------------------------
    def load(self, scheduler: Scheduler) -> None:
        """Look up the waiting requests that the scheduler may admit next, and give those whose
        lookup is back their pages. Raises the exception of an L3 call that failed (a bug) since the
        last call."""
        self.io.check()
        self._hand_over()
        self.release_holds()
        self._poll_timers()
        self._progressed.clear()   # before looking: progress made from now on wakes wait_for_lookups
        self._wait_back_copies()
        self._start_lookups(scheduler)
        self._land()
        self._finish_lookups(scheduler)
        self._steer_back_reads(scheduler)

    def _start_lookups(self, scheduler: Scheduler) -> None:
        room = scheduler.max_num_seqs - len(scheduler.running)
        s = self.page_size
        for i, seq in enumerate(list(scheduler.waiting)[:max(0, room)]):
            if seq.pages or seq.num_computed or seq.loading:
                continue
            host = self._host_target(scheduler, seq)
            if not host and not scheduler.may_share_prefix(seq):
                continue
            if self._looked_up.get(seq.request_id) == seq.num_preemptions:
                continue
            full = (seq.num_tokens - 1) // s   # the last token is always computed (it gives the logits)
            if full == 0:
                continue
            cap = (self._host_cap if host else self._cap)(scheduler, seq, full, held=0, first_in_line=i == 0)
            if cap <= 0:
                continue
            # the leading pages the pool holds are shared when the lookup is back (cheaper than any copy):
            # the device pool's, or the host pool's for a request that goes host-backed
            start, pool_prefix = 0, scheduler.host_prefix if host else scheduler.prefix
            if pool_prefix is not None:
                start = min(pool_prefix.num_cached(seq, cap), cap)
            nbytes = (cap - start) * self.page_bytes
            if self._lookups and self._lookup_bytes + nbytes > self.max_lookup_bytes:
                break   # no host memory for its pages yet: it is looked up at a later step, in queue order
            keys = None
            if self.rows.areas > 1:   # each page's row in the area of the store that holds it
                if not self.rows.has_free(cap - start):
                    break   # (as below; the keys are not worth computing at every step until rows are free)
                keys = page_keys(seq.token_ids[:cap * s], self.layout, salt=seq.key_salt(s))
                rows = self.rows.take(cap - start, areas=[self.l3.backend.shard_of(k) for k in keys[start:]])
            else:
                rows = self.rows.take(cap - start)
            if rows is None:
                break   # rows still held (a dropped lookup's read is running): later, in queue order
            self._hand_over(wait=True)   # a lookup runs after every write before it (a parked request's own)
            self._looked_up[seq.request_id] = seq.num_preemptions
            self.stats.lookups += 1
            reading = _Reading(rows)
            if self.cut_slow_loads:
                reading.margin = self.split_margin if self._splits(seq, host) else CUT_MARGIN
            if start == cap:   # nothing for L3 to add (what L3 holds is checked when the pages are written)
                future: Future = Future()
                future.set_result((0, 0))
            else:
                future = self.io.submit(functools.partial(self._read_run, seq.token_ids[:cap * s], start, reading,
                                                          salt=seq.key_salt(s),
                                                          unchecked=self.check_on_device and not host, keys=keys))
                future.add_done_callback(lambda _: self._progressed.set())
            seq.loading = True
            now = time.monotonic()
            self._lookups[seq.request_id] = _Lookup(seq, start, future, now + self.load_timeout_s, nbytes,
                                                    reading, host=host, since=now)
            self._lookup_bytes += nbytes

    def _cap(self, scheduler: Scheduler, seq: Sequence, full: int, *, held: int, first_in_line: bool) -> int:
        """How many of its first `full` pages `seq` (holding `held` pool pages) may take now.

        Pages held by a waiting request cannot be preempted, so a request gets pages only when the
        scheduler admits it next: the whole request fits now, or it is first in line (a request just
        preempted is put there) and takes the leading pages that fit, one page and the running
        requests' margin left free, prefilling the rest in chunks as pages free up. Otherwise 0: it
        is looked up again at a later step (or, its lookup back, prefills)."""
        free = scheduler.allocator.num_free
        reserve = len(scheduler.running)   # the one-page-per-running-request margin the scheduler keeps
        if free >= -(-seq.num_tokens // self.page_size) - held + reserve:
            return full
        return min(full, held + free - reserve - 1) if first_in_line else 0

    def _host_target(self, scheduler: Scheduler, seq: Sequence) -> bool:
        """Whether `seq`'s pages from L3 go to the host pool (`Scheduler.will_be_host_backed`)."""
        return self.host is not None and scheduler.will_be_host_backed(seq)

    def _host_cap(self, scheduler: Scheduler, seq: Sequence, full: int, *, held: int, first_in_line: bool) -> int:
        """`_cap` for a request whose pages go to the host pool: all `full` pages if the whole request
        fits there now (with the running host-backed requests' one-page margin) and the device holds
        its buffer, else 0. Never a part: host pages a waiting request gives back are not cached
        (unlike the device pool's), so taking a part it cannot prefill on from would read the same
        pages from L3 at every step until it fits; it is looked up when it fits, as it is admitted
        (`Scheduler._admit` needs the whole prefill chunk's pages too). `held` and `first_in_line`
        as `_cap`'s (the latter unused: no part for the head of the queue either)."""
        pool = scheduler.sparse.host_allocator
        if scheduler.sparse.buffer_pages + len(scheduler.running) > scheduler.allocator.num_free:
            return 0
        if scheduler.sparse.manager.num_free_slots == 0:   # every sparse slot is taken: it cannot be admitted
            return 0
        reserve = sum(1 for r in scheduler.running if r.host_backed and not r.in_prefill)
        return full if pool.num_free >= -(-seq.num_tokens // self.page_size) - held + reserve else 0

    def _read_run(self, tokens: list[int], start: int, reading: _Reading, *, unchecked: bool = False,
                  keys: list[str] | None = None, salt: tuple[int, bytes] | None = None) -> tuple[int, int]:
        """On the I/O thread: how many leading full pages of `tokens` L3 holds (pages the pool gave
        the request count only if L3 has them too: their writer's write may have been dropped), and
        how many pages from `start` on, the run L3 holds, were read and checked into `reading.rows`;
        the run ends at the first page that fails its checks. The pages are read in batches
        (`_batch_pages`) and `reading.ready` published after each: with `land_on_device` the engine
        thread copies them on to the device while the next are read. Before each batch the read is
        cut where its rest looks slower than prefilling (`_too_slow` by `reading.margin`;
        `reading.cut_at` tells the engine), and a cut by the engine (a batch that stalls, a timeout)
        ends it after the batch it is in. `unchecked`: the payloads' checksums are left to the
        device (`_verified`); a page whose head fails still ends the run here. `keys`: the pages' keys
        if the engine thread has them already. No CUDA call here."""
        if keys is None:
            keys = page_keys(tokens, self.layout, salt=salt)
        t0 = time.perf_counter()
        found = self.l3.exists(keys)
        self.timing["exists_s"] += time.perf_counter() - t0
        in_l3 = found.index(False) if False in found else len(found)
        after = found[start:]
        hits = min(after.index(False) if False in after else len(after), len(reading.rows))
        reading.in_l3, reading.read_since = in_l3, time.monotonic()
        reading.hits = hits   # last: the engine thread reads `hits` first
        good = 0
        # the pages (positions from `start`) in the order they are read: in page order, or, with
        # `per_store_batches`, each store's next pages in turn (`_read_order`)
        order = self._read_order(keys[start:start + hits]) if self.per_store_batches else range(hits)
        done = bytearray(hits)   # read and checked
        crcs: dict[int, tuple[int, int]] = {}   # unchecked: position -> (key crc, the crc its payload must have)
        end = hits               # the run ends before the first page that failed (once one has)
        at = 0                   # the next position in `order`
        while good < end and not reading.dropped:
            # cut here, before the next batch, where the rest looks slower than prefilling (at the
            # store's recent rate before the first): the engine then reads it from the back or prefills
            # it with no batch in flight to wait for or throw away
            if reading.margin is not None and self._too_slow(reading, time.monotonic(), reading.margin,
                                                             self._prefill_rate()):
                reading.cut_at = time.monotonic()
                break
            # (the first batch one store's share: a read slower than it should be is cut after it, not
            # after a batch of every store's; H200, 8 stores at 3 GB/s: the cut came 0.175 s in)
            batch = self._batch_pages(LAND_CHUNK_BYTES * (self._stores_at_once if at else 1) // self.page_bytes)
            idx = [i for i in order[at:at + batch] if i < end]
            at += batch
            if not idx:
                continue
            part = [reading.rows[i] for i in idx]
            reading.batch = len(part)
            t0 = time.perf_counter()
            batch_keys = [keys[start + i] for i in idx]
            if unchecked:
                wants = self.l3.get_into_unchecked(batch_keys, self.rows.views(part))
                ok = [w is not None for w in wants]
                crcs.update((i, (key_crc(k), w)) for i, k, w in zip(idx, batch_keys, wants) if w is not None)
            else:
                ok = self.l3.get_into(batch_keys, self.rows.views(part))
            dt = time.perf_counter() - t0
            self._note_read(len(part), dt)
            self.timing["read_bytes"] += sum(ok) * self.page_bytes
            for i, good_page in zip(idx, ok):
                if good_page:
                    done[i] = 1
                else:   # failed its check: gone from L3 now (the store deleted it); the run ends before it
                    end = min(end, i)
            ready = good
            while ready < end and done[ready]:
                ready += 1
            if unchecked:   # (published before `ready`, in order)
                reading.crcs.extend(crcs.pop(i) for i in range(good, ready))
            good = ready
            reading.ready_at = time.monotonic()
            reading.ready = good
            reading.batch = 0
            self._progressed.set()
        if end < hits:
            in_l3 = min(in_l3, start + end)
        return in_l3, good

    def _land(self) -> None:
        """CUDA: copy the pages of lookups in flight that are read and checked (and not yet copied) on
        to the device, on the landing stream, while their reads go on; their rows are given back once
        the copies are done. Only while the device has LAND_HEADROOM_BYTES to spare past them (a
        lookup's pages may need 2 GiB there until it is back); pages not copied now are later, or
        from the rows when the lookup is back. In order: a lookup's landed pages are its leading ones."""
        if not self.land_on_device or not self._lookups:
            return
        for lookup in self._lookups.values():
            if not lookup.host:   # pages for the host pool stay in their rows
                self._land_reading(lookup.reading, lookup.reading.ready)

    def _land_reading(self, r: _Reading, upto: int) -> None:
        """`_land` for one lookup's rows[num_landed:upto] (read and, unless `crcs`, checked); with
        `crcs`, each landed copy is checked on the landing stream after it (`r.checks`)."""
        if upto <= r.num_landed:
            return
        device, dtype = self.cache.data.device, self.cache.data.dtype
        rows = r.rows[r.num_landed:upto]
        if torch.cuda.mem_get_info(device)[0] < len(rows) * self.page_bytes + LAND_HEADROOM_BYTES:
            return
        with torch.cuda.stream(self._land_stream):
            try:
                pages = torch.empty(len(rows), *self.page_shape, dtype=dtype, device=device)
            except torch.cuda.OutOfMemoryError:
                return   # they stay in their rows (for now)
            self._rows_to_device(pages, rows)
            if r.crcs:   # checked where they landed
                r.checks.append(self._failed(pages, r.crcs[r.num_landed:upto], rows))
            copied = torch.cuda.Event()
            copied.record(self._land_stream)
        r.landed.append((pages, copied))
        self.rows.give_back(rows, event=copied)
        r.num_landed = upto
        self.timing["landed_bytes"] += len(rows) * self.page_bytes

    def _drop(self, lookup: _Lookup) -> None:
        """Forget a lookup in flight: its device copies go now, its rows not copied come back once its
        read has ended (a read running goes on; its result is dropped)."""
        lookup.reading.landed = []
        self._stop_read(lookup, keep=lookup.reading.num_landed)

    def _stop_read(self, lookup: _Lookup, *, keep: int) -> None:
        """End a lookup's read: no more copies, the read stops after its current batch, and its rows
        from `keep` on come back once it has ended (rows before `keep` are the caller's)."""
        r = lookup.reading
        r.dropped = True
        lookup.future.cancel()          # no effect once running
        self._give_back_when_done(lookup.future, r.rows[keep:])

    def _too_slow(self, r: _Reading, now: float, margin: float, prefill_rate: float | None) -> bool:
        """Whether the rest of a read in flight would take longer (by `margin`) than prefilling its
        pages at the engine's prefill rate. The rest's time: at the rate this read has gone so far
        once a batch of its pages is in (a batch in flight counts once it is overdue), before that at
        the store's recent rate (earlier reads) less the time spent. Undecided (False) before
        `exists` is back, before any prefill was timed, and for a first read with no page in yet: a
        load from a fast store (a local disk, a GPU host's page cache) is not cut, and one from a
        slow store (a far Redis: 0.4-1 GB/s, against ~20K tokens/s of 8B prefill on an H200) stops
        once a batch is in, or at once when the store was slow before. The pages read so far are
        used. `prefill_rate`: the engine's, in tokens/s (the I/O thread passes `_prefill_rate()`:
        polling the timers would query CUDA events there)."""
        rate, hits = prefill_rate, r.hits
        if not self.cut_slow_loads or rate is None or hits < 0:
            return False
        ready = r.ready
        left = hits - ready
        if left <= 0:
            return False
        elapsed = now - r.read_since
        store_rate = self._read_rate()
        if ready > 0:
            # the time its pages took: to when the last batch ended, or, once the batch in flight is
            # overdue at that rate (a store that stalls), as if it ended now (a batch on time is not
            # counted against the pages before it)
            spent = max(r.ready_at - r.read_since, elapsed * ready / (ready + r.batch))
            read_s = spent * left / ready
        elif store_rate is not None:
            read_s = left * self.page_bytes / store_rate - elapsed
        else:
            return False
        return read_s > margin * left * self.page_size / rate

    def _cut(self, lookup: _Lookup, *, keep_unread: bool = False) -> tuple[int, int, int]:
        """Stop a read in flight: the pages read and checked so far are kept (landed or in their rows),
        the rows after them come back once the read has ended (`keep_unread`: those of the pages it
        was to read, up to the third value returned, stay the caller's, for `_start_back_read` or
        `_give_back_when_done`). Returns (leading pages L3 holds, pages kept, end of the rows kept):
        the I/O thread may publish `hits` at any time, so it is read once, here."""
        r = lookup.reading
        good = r.ready   # (only grows; rows past it may still be written by the running batch)
        upto = max(good, r.hits) if keep_unread else good
        self._stop_read(lookup, keep=upto)
        return r.in_l3, good, upto

    def _splits(self, seq: Sequence, host: bool) -> bool:
        """Whether a cut of the read of `seq` (its pages for the host pool: `host`) goes on from the
        back (`_start_back_read`): dense requests (a sparse one builds its representations from its
        first chunk on, a host-backed one's pages go to the host pool whole)."""
        return self.split_slow_loads and not host and not seq.sparse

    def _give_back_when_done(self, future: Future, rows: list[int]) -> None:
        """Give `rows` back once the read `future` stands for has ended (it may still be writing into them)."""
        if rows:
            future.add_done_callback(lambda _: self.rows.give_back(rows))   # (any thread)

    def _note_read(self, pages: int, seconds: float) -> None:
        """I/O thread: a batch of `pages` read (and checked) in `seconds`, into the load's timing and the
        store's recent read rate."""
        self.timing["read_s"] += seconds
        self._read_bytes = READ_DECAY * self._read_bytes + pages * self.page_bytes
        self._read_secs = READ_DECAY * self._read_secs + seconds

    # -- a cut read's back half, read while the front prefills ------------------------------------
    def _start_back_read(self, lookup: _Lookup, first: int, rows: list[int]) -> None:
        """After a cut (`_too_slow`): read the pages `first`..`first + len(rows) - 1` that the cut read
        did not get to, from the last back, into `rows`, while the request prefills from `first` on.
        Queued behind the cut read on the I/O thread, so it starts once that read has ended (and no
        longer writes into these rows)."""
        seq = lookup.seq
        end = first + len(rows)
        b = _BackRead(seq, first, end, rows, low=end, cut_at=time.monotonic(), landed_low=end)
        tokens = seq.token_ids[:b.end * self.page_size]
        b.future = self.io.submit(functools.partial(self._read_back, tokens, b, seq.key_salt(self.page_size)))
        b.future.add_done_callback(lambda _: self._progressed.set())
        self._back[seq.request_id] = b
        self.stats.loads_split += 1

    def _read_back(self, tokens: list[int], b: _BackRead, salt: tuple[int, bytes] | None = None) -> None:
        """On the I/O thread: read and check b's pages in batches from the last back, publishing `low`
        after each; the first page that fails its checks ends the read (the pages above it in its
        batch are kept: the prefill computes the rest). No CUDA call here."""
        keys = page_keys(tokens, self.layout, salt=salt)
        b.since = time.monotonic()
        self.timing["back_wait_s"] += b.since - b.cut_at
        batch = min(BACK_BATCH_PAGES, self._batch_pages(LAND_CHUNK_BYTES // self.page_bytes))
        hi = b.end
        while hi > b.first and not b.stopped:
            lo = max(b.first, hi - batch)
            t0 = time.perf_counter()
            ok = self.l3.get_into(keys[lo:hi], self.rows.views(b.rows[lo - b.first:hi - b.first]))
            dt = time.perf_counter() - t0
            self._note_read(hi - lo, dt)
            if not all(ok):
                b.low = lo + max(i for i, good in enumerate(ok) if not good) + 1
                self.timing["read_bytes"] += (hi - b.low) * self.page_bytes
                break
            self.timing["read_bytes"] += (hi - lo) * self.page_bytes
            b.low = hi = lo
            self._progressed.set()
        self.timing["back_read_s"] += time.monotonic() - b.since

    def _read_order(self, keys: list[str]) -> list[int]:
        """`per_store_batches`: the positions of `keys` (a lookup's pages from its start) in the order
        they are read: rounds of each store's next LAND_CHUNK_BYTES / stores of pages, store after
        store, so that a batch of whole rounds gives every store the same share (a batch ends when its
        slowest store is done); in page order within each store. One store: page order."""
        stores = self._stores_at_once
        if stores == 1 or not keys:
            return list(range(len(keys)))
        queues: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            queues.setdefault(self.l3.backend.shard_of(key), []).append(i)
        share = max(1, LAND_CHUNK_BYTES // self.page_bytes // stores)
        order: list[int] = []
        for a in range(0, max(len(q) for q in queues.values()), share):
            for s in sorted(queues):
                order += queues[s][a:a + share]
        return order

    @property
    def _stores_at_once(self) -> int:
        """How many stores read a batch of a lookup together (several batched ones: up to STORE_CHUNKS)."""
        backend = self.l3.backend
        if not getattr(backend, "get_into_batched", False):
            return 1
        return max(1, min(STORE_CHUNKS, len(getattr(backend, "shards", ()))))

    def _batch_pages(self, most: int) -> int:
        """Pages per batch of a read (I/O thread): at most `most`, and at the store's recent rate no more
        than READ_BATCH_S of reading, so that a cut read (which ends after its current batch) and a
        back read (which publishes its progress after each) answer soon; at least two per reader
        thread."""
        floor = 2 * self.l3.readers.workers
        rate = self._read_rate()
        if rate is not None:
            most = min(most, int(rate * READ_BATCH_S / self.page_bytes))
        return max(most, floor, 1)

    def _steer_back_reads(self, scheduler: Scheduler) -> None:
        """Before the schedule: where each back read's request stops its next prefill chunk. The read
        has pages low..end-1; the prefill is at token c. Once they meet (c at a page boundary at or
        past `low`) the pages from there are taken now; else the chunk stops at `low`, or, while the
        gap is wider than BACK_SPLIT_MIN_PAGES, where the two should meet at their current rates (a
        chunk of gap * prefill rate / (prefill rate + read rate)): the read keeps going meanwhile.

        CUDA: first waits for the steps launched so far. A step of prefill chunks alone samples
        nothing, so the engine thread does not wait for it and would schedule the next chunk at once:
        every chunk of the prompt would be queued before the read had got anywhere (seen on an H200:
        the read never met the prefill). Where the prefill stands on the device is what it steers by."""
        if not self._back:
            return
        if self._land_stream is not None:
            torch.cuda.current_stream(self.cache.data.device).synchronize()
        s = self.page_size
        for b in list(self._back.values()):
            seq, low, done = b.seq, b.low, b.future.done()
            self._land_back(b, low)
            c = seq.num_computed
            at = -(-c // s)   # the first page no chunk has reached
            if at >= b.end or (done and low >= b.end):   # the prefill passed it, or the read got nothing
                self._end_back(b)
                continue
            if low <= at:
                if c == at * s:
                    self._take_back(scheduler, b, at, now=True)
                else:
                    seq.prefill_stop = at * s
                continue
            rates = (None, None) if done else (self._prefill_rate(), self._back_rate(b))
            seq.prefill_stop = meeting_stop(c, low, s, *rates, read_started=done or low < b.end)
            self.timing["split_steps"] += 1

    def _back_rate(self, b: _BackRead) -> float | None:
        """A back read's rate in tokens/s: its own once a batch is in, else the store's recent one."""
        pages = b.end - b.low
        if pages > 0 and b.since > 0:
            return pages * self.page_size / max(time.monotonic() - b.since, 1e-6)
        rate = self._read_rate()
        return None if rate is None else rate / self.page_bytes * self.page_size

    def _land_back(self, b: _BackRead, low: int) -> None:
        """CUDA: copy b's pages read since the last call (low..landed_low-1) on to the device on the
        landing stream, while the read and the prefill go on, and give their rows back once copied; at
        the meeting only device-to-device copies are left for them (`_take_back`). Only while the
        device has LAND_HEADROOM_BYTES to spare past them; pages not landed stay in their rows."""
        if not self.land_on_device or low >= b.landed_low:
            return
        device, dtype = self.cache.data.device, self.cache.data.dtype
        n = b.landed_low - low
        if torch.cuda.mem_get_info(device)[0] < n * self.page_bytes + LAND_HEADROOM_BYTES:
            return
        rows = b.rows[low - b.first:b.landed_low - b.first]
        with torch.cuda.stream(self._land_stream):
            try:
                pages = torch.empty(n, *self.page_shape, dtype=dtype, device=device)
            except torch.cuda.OutOfMemoryError:
                return
            self._rows_to_device(pages, rows)
            copied = torch.cuda.Event()
            copied.record(self._land_stream)
        b.landed.append((low, pages, copied))
        self.rows.give_back(rows, event=copied)
        b.landed_low = low
        self.timing["back_landed_bytes"] += n * self.page_bytes

    def take_loaded_ahead(self, scheduler: Scheduler, batch) -> None:
        """After the schedule: a request with a back read whose chunk ends where the read has got to
        takes the pages from there on (copied in now, counted as computed once the chunk has run)."""
        if not self._back:
            return
        s = self.page_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            b = self._back.get(seq.request_id)
            if b is None or seq.prefill_stop is None:
                continue
            end = seq.num_computed + n
            if end == seq.prefill_stop and end % s == 0 and b.low <= end // s:
                self._take_back(scheduler, b, end // s, now=False)

    def _take_back(self, scheduler: Scheduler, b: _BackRead, m: int, *, now: bool) -> None:
        """Give b's request pages m..end-1 from b's rows (new device pages after its m pages; on CUDA
        copied on the landing stream, which the next step waits for), then end the read. `now`: they
        count as computed at once (the request is at page m), else once the scheduled chunk has run."""
        seq = b.seq
        n = b.end - m
        if n <= 0 or len(seq.pages) != m or scheduler.allocator.num_free < n + len(scheduler.running):
            self._end_back(b)   # (no room for them now: the prefill computes them)
            return
        pages = scheduler.allocator.allocate(n)
        top = max(m, b.landed_low)   # pages m..top-1 are in their rows, top..end-1 on the device
        rows = b.rows[m - b.first:top - b.first]
        landed = LoadedRun([(t[max(0, top - p):], event) for p, t, event in reversed(b.landed)   # (landed last first)
                            if p + t.shape[0] > top])
        try:
            if self._land_stream is not None:
                self._land_stream.wait_stream(torch.cuda.current_stream(self.cache.data.device))
                with torch.cuda.stream(self._land_stream):
                    copied = self._write_pages(pages[:top - m], LoadedRun(rows=rows))
                    if len(landed):
                        self._back_copies.append(self._write_pages(pages[top - m:], landed))
                self._back_copies.append(copied)
            else:
                copied = self._write_pages(pages, LoadedRun(rows=rows))
        except BaseException:
            scheduler.allocator.free(pages)
            self._end_back(b)
            raise
        self.rows.give_back(rows, event=copied)
        b.rows = b.rows[:m - b.first]
        self._end_back(b)
        seq.pages = seq.pages + pages
        if now:
            seq.num_computed = b.end * self.page_size
            seq.needs_prefill = True
        else:
            seq.loaded_ahead = n * self.page_size
        self.stats.pages_met += n
        self.timing["met_after_s"] += time.monotonic() - b.cut_at
        self.stats.pages_loaded += n
        self.stats.tokens_loaded += n * self.page_size

    def _wait_back_copies(self) -> None:
        """CUDA: the current stream waits for the copies of pages back reads gave (landing stream)
        before anything after it reads them: the next step, a write of the request's pages."""
        if self._back_copies:
            stream = torch.cuda.current_stream(self.cache.data.device)
            for event in self._back_copies:
                stream.wait_event(event)
            self._back_copies.clear()

    def _end_back(self, b: _BackRead) -> None:
        """Stop b's read (after its current batch) and forget it; its rows come back once it has ended."""
        b.stopped = True
        b.seq.prefill_stop = None
        if self._back.get(b.seq.request_id) is b:
            del self._back[b.seq.request_id]
        b.landed = []
        self._give_back_when_done(b.future, b.rows[:b.landed_low - b.first])   # (the landed pages' rows are back)

    def _rows_to_device(self, dst: torch.Tensor, rows: list[int]) -> None:
        """Landing stream: dst[i] = the page in rows[i] (dst: [len(rows), *page_shape] on the device).
        H200, 8 stores: issuing a copy per page took 33-51 ms of the engine thread per 16K prompt
        (bench/results/l3_prefix_gpu_h200_mooncake_x8_b4.json); `_gather` copies a run per area."""
        self._gather(dst, rows, lambda first, end: self.rows.pages(first, end, dtype=dst.dtype, shape=self.page_shape))

    def _gather(self, dst: torch.Tensor, rows: list[int], src: Callable[[int, int], torch.Tensor]) -> None:
        """Current (landing) stream: dst[i] = src(rows[i], rows[i] + 1)[0], from pinned host memory
        (`src(first, end)`: rows first..end-1 of it), with asynchronous copies, none of which waits
        for the stream. Rows in ascending order: one copy per run of them. Rows cut into areas (pages
        spread over several stores, each read into its own store's area) come in runs of a page or
        two in page order: there each area's rows cross in row order, a run per area, into a staging
        tensor put in page order on the device (`index_copy_`); their positions cross in pinned slots
        beside the rows (`_row_pos`: reused with the rows, after the copies that read them). Without
        device memory for the staging tensor, a copy per run."""
        ordered = sorted(rows)
        stage = None
        # (the staging tensor only where the device has room for it: a failed allocation would first
        # free the allocator's cache and synchronize the device)
        if rows != ordered and torch.cuda.mem_get_info(dst.device)[0] >= dst.nbytes + LAND_HEADROOM_BYTES:
            try:
                stage = torch.empty_like(dst)
            except torch.cuda.OutOfMemoryError:
                stage = None
        if stage is None:
            for pos, first, end in self.rows.runs(rows):
                dst[pos:pos + end - first].copy_(src(first, end), non_blocking=True)
            return
        if self._row_pos is None or self._row_pos.shape[0] < self.rows.capacity:
            self._row_pos = torch.zeros(self.rows.capacity, dtype=torch.int64, pin_memory=True)
        self._row_pos[torch.tensor(rows)] = torch.arange(len(rows))
        index = torch.empty(len(rows), dtype=torch.int64, device=dst.device)
        for pos, first, end in self.rows.runs(ordered):
            stage[pos:pos + end - first].copy_(src(first, end), non_blocking=True)
            index[pos:pos + end - first].copy_(self._row_pos[first:end], non_blocking=True)
        dst.index_copy_(0, index, stage)

    @property
    def check_on_device(self) -> bool:
        """Whether pages a lookup lands on the device are read unchecked and checked there (see
        CHECK_ON_DEVICE). Turning it on (CUDA) compiles and runs the check once on a zero page, so
        that the first lookup does not wait for the kernel's compilation (~0.5 s) and its tables."""
        return self._check_on_device

    @check_on_device.setter
    def check_on_device(self, on: bool) -> None:
        on = bool(on)
        if on and not self._check_on_device and self._land_stream is not None:
            device = self.cache.data.device
            with torch.cuda.device(device), torch.cuda.stream(self._land_stream):   # where the checks run
                page = torch.zeros(1, *self.page_shape, dtype=self.cache.data.dtype, device=device)
                crc32_pages(page, torch.zeros(1, dtype=torch.int64, device=device))
        self._check_on_device = on

    def _failed(self, pages: torch.Tensor, crcs: list[tuple[int, int]], rows: list[int]) -> torch.Tensor:
        """Landing stream: which of the landed `pages` ([n, ...] on the device, copied from `rows`)
        fail their checksums (`crcs`: each page's key crc and the crc its payload must have), bool
        [n] on the device. The crcs cross in pinned slots beside their rows, as the pages do
        (`_gather`; reused with the rows, after the copies: no pinned allocation per landing, which
        would wait for earlier ones' copies to be free)."""
        if self._row_crcs is None or self._row_crcs.shape[0] < self.rows.capacity:
            self._row_crcs = torch.zeros(self.rows.capacity, 2, dtype=torch.int64, pin_memory=True)
        self._row_crcs[torch.tensor(rows)] = torch.tensor(crcs, dtype=torch.int64)
        both = torch.empty(len(rows), 2, dtype=torch.int64, device=pages.device)
        self._gather(both, rows, lambda first, end: self._row_crcs[first:end])
        return crc32_pages(pages, both[:, 0].contiguous()) != both[:, 1]

    def _verified(self, lookup: _Lookup, in_l3: int, good: int) -> tuple[int, LoadedRun]:
        """The run a finished (or cut) lookup gives: its `good` leading pages, landed first, then in
        rows. Where they were read unchecked (`check_on_device`), the run ends before the first page
        that fails its checksum: those landed were checked on the device (one wait for the landing
        stream, a copy of one flag per page), those still in rows are checked here on the host; rows
        past the end are given back, the failed page is reported to the store (counted corrupt,
        deleted) and is not in L3 for this request any more. Returns (leading pages in L3, run)."""
        r = lookup.reading
        if not r.crcs or good == 0:
            return in_l3, LoadedRun(r.landed, r.rows[r.num_landed:good])
        if self.land_on_device:
            self._land_reading(r, good)   # what is not on the device yet, checked there too
        landed = min(r.num_landed, good)
        end = good
        if r.checks and landed:
            self._land_stream.synchronize()   # (the flags are the landing stream's)
            bad = torch.cat(r.checks)[:landed].cpu().nonzero()
            if len(bad):
                end = int(bad[0])
        if end == good and good > landed:   # pages left in their rows (no room on the device): checked on
            # threads, as a read checks them (one thread checks ~3 GB/s)
            crcs = r.crcs[landed:good]
            ok = self._checkers.map(lambda view, c: record_crc32(view, c[0]) == c[1],
                                    self.rows.views(r.rows[landed:good]), crcs)
            if not all(ok):
                end = landed + ok.index(False)
        if end < good:
            key = page_keys(lookup.seq.token_ids[:(lookup.start + end + 1) * self.page_size], self.layout,
                            salt=lookup.seq.key_salt(self.page_size))[-1]
            self.io.submit(functools.partial(self.l3.corrupt_found, [key], self.page_bytes))
            in_l3 = min(in_l3, lookup.start + end)
            self.rows.give_back(r.rows[max(end, landed):good])
        if end < landed:
            return in_l3, LoadedRun(r.landed).slice(0, end)
        return in_l3, LoadedRun(r.landed, r.rows[landed:end])

    def _finish_lookups(self, scheduler: Scheduler) -> None:
        """Give each waiting request whose lookup is back (or timed out) its pages, in queue order."""
        if not self._lookups:
            return
        now = time.monotonic()
        for i, seq in enumerate(scheduler.waiting):
            lookup = self._lookups.get(seq.request_id)
            if lookup is None:
                continue
            r = lookup.reading
            back: list[int] = []   # a cut read's rows not read yet, pages from `good` on (see the cut below)
            good = 0
            if lookup.future.done():
                # a failed lookup (a bug; io.check() raises it) reads as a miss
                if lookup.future.exception() is not None:
                    in_l3, run = 0, LoadedRun()
                    self.rows.give_back(r.rows[r.num_landed:])
                else:   # its pages: those copied on to the device (rows[:num_landed]), then rows[num_landed:good]
                    in_l3, good = lookup.future.result()
                    if r.cut_at and self._splits(lookup.seq, lookup.host):   # cut by the I/O thread: the rest from the back
                        back = r.rows[good:r.hits]
                        self.rows.give_back(r.rows[r.hits:])
                    else:
                        self.rows.give_back(r.rows[good:])   # rows no page was read into
                    in_l3, run = self._verified(lookup, in_l3, good)
                    if r.cut_at:
                        self.stats.loads_cut_short += 1
                        self.timing["cut_after_s"] += r.cut_at - lookup.since
            else:
                timed_out = now >= lookup.deadline
                # (by the margin the I/O thread checks before each batch, set when the lookup began)
                if not timed_out and not (r.margin is not None
                                          and self._too_slow(r, now, r.margin, self.prefill_tokens_per_s)):
                    continue
                splits = self._splits(lookup.seq, lookup.host)
                # a cut, or a lookup not back in time: the pages read so far are used (a long prompt's read
                # may take longer than load_timeout_s and still beat prefilling), the rest read from the back
                in_l3, good, upto = self._cut(lookup, keep_unread=splits)
                if splits:   # the rows of the pages not read yet: for a back read, or back after the read
                    back = r.rows[good:upto]
                in_l3, run = self._verified(lookup, in_l3, good)
                if timed_out:
                    self.stats.loads_timed_out += 1
                    log.warning("L3 lookup of %s not back after %.1f s; using the %d page(s) read so far%s",
                                seq.request_id, self.load_timeout_s, len(run),
                                ", reading the rest from the back" if back else ", prefilling the rest")
                else:
                    self.stats.loads_cut_short += 1
                self.timing["cut_after_s"] += now - lookup.since
            del self._lookups[seq.request_id]
            self._lookup_bytes -= lookup.nbytes
            seq.loading = False
            self._in_l3[seq.request_id] = max(self._in_l3.get(seq.request_id, 0), in_l3)
            if len(scheduler.running) >= scheduler.max_num_seqs:  # it cannot be admitted now: look it up again later
                self._looked_up.pop(seq.request_id, None)
                self.rows.give_back(run.rows)
                self._give_back_when_done(lookup.future, back)
                continue
            if lookup.host:
                self._take_host_pages(scheduler, seq, lookup.start, run, first_in_line=i == 0)
            else:
                self._take_pages(scheduler, seq, lookup.start, run, first_in_line=i == 0)
            first = lookup.start + len(run)
            # (a run that ends before `good`, a page failing its check on the device, is prefilled on from there)
            if back and len(run) == good and seq.num_computed == first * self.page_size and len(seq.pages) == first:
                self._start_back_read(lookup, first, back)
            else:
                self._give_back_when_done(lookup.future, back)

    def release_unadmitted(self, scheduler: Scheduler) -> int:
        """After the schedule: a waiting request that took pages here but was not admitted gives them
        back (a waiting request cannot be preempted, so holding them could starve the running ones).
        With the pool's prefix cache they stay cached under their prefix (the scheduler's match takes
        them at admission); either way the request is looked up again. Returns how many gave pages back."""
        released = 0
        for seq in scheduler.waiting:
            if not seq.pages or seq.loading:
                continue
            released += 1
            for prefix in (scheduler.prefix, scheduler.host_prefix):   # (each names its own pool's pages)
                if prefix is not None:
                    prefix.register([seq])  # the loaded pages stay cached under their prefix
            host = seq.host_backed   # pages loaded into the host pool
            back = self._back.get(seq.request_id)
            if back is not None:   # looked up again, from the pages it keeps cached
                self._end_back(back)
            scheduler.give_back(seq)
            # a sparse one that took device pages may not fit resident: looked up once (it may go host-backed)
            if not seq.sparse or host:
                self._looked_up.pop(seq.request_id, None)
        return released

    def _take_pages(self, scheduler: Scheduler, seq: Sequence, start: int, run: LoadedRun, *,
                    first_in_line: bool) -> None:
        """Share the leading pages the pool holds now, then copy in the loaded pages (`run`) after
        them that fit; every host row of the run is given back."""
        s = self.page_size
        # the pool's cached pages of its prefix, counted first and shared only if it takes loaded pages
        # too: a waiting request that shared them and then could not be admitted held them through the
        # schedule, and three such requests held the whole pool (the first in line never got a page,
        # each step gave them back and the next lookup took them again: a livelock)
        prefix = scheduler.prefix
        held = prefix.num_cached(seq, (seq.num_tokens - 1) // s) if prefix is not None else 0
        # L3's run starts at page `start`: it continues the pool's pages only if the pool still holds those
        usable = run.slice(held - start, len(run)) if held >= start else LoadedRun()
        full = held + len(usable)
        n = max(0, self._cap(scheduler, seq, full, held=held, first_in_line=first_in_line) - held)
        if n == 0:
            self.rows.give_back(run.rows)
            return
        if prefix is not None and prefix.match(seq) // s != held:
            raise RuntimeError("the pool's cached prefix changed between counting and sharing it")
        pages = scheduler.allocator.allocate(n)
        try:
            copied = self._write_pages(pages, usable.slice(0, n))
        except BaseException:
            scheduler.allocator.free(pages)
            if self.cache.data.device.type == "cuda":
                torch.cuda.synchronize(self.cache.data.device)   # no copy still reads the rows
            self.rows.give_back(run.rows)
            raise
        self.rows.give_back(run.rows, event=copied)
        seq.pages, seq.num_computed = seq.pages + pages, (held + n) * s
        self._loaded(seq, n)

    def _loaded(self, seq: Sequence, n: int) -> None:
        """`seq` was given n pages from L3 (after any its pool shared): its next chunk runs as a
        prefill (`Sequence.needs_prefill`), and the load is counted."""
        seq.needs_prefill = True
        self.stats.requests_hit += 1
        self.stats.pages_loaded += n
        self.stats.tokens_loaded += n * self.page_size

    def _take_host_pages(self, scheduler: Scheduler, seq: Sequence, start: int, run: LoadedRun, *,
                         first_in_line: bool) -> None:
        """A sparse request to be admitted host-backed: share the leading pages the host pool's prefix
        cache holds now, then copy the loaded pages after them (`run`, host rows only: nothing is
        landed on the device for it) into new host pool pages, one copy per layer and run of rows, if
        the whole request fits; it is marked host-backed (`Scheduler._admit` admits it only so).
        Every row of the run is given back."""
        s = self.page_size
        held = scheduler.host_prefix.match(seq) // s if scheduler.host_prefix is not None else 0
        # L3's run starts at page `start`: it continues the pool's pages only if the pool still holds those
        usable = run.slice(held - start, len(run)) if held >= start else LoadedRun()
        full = held + len(usable)
        n = max(0, self._host_cap(scheduler, seq, full, held=held, first_in_line=first_in_line) - held)
        if n == 0 or self.host is None:
            self.rows.give_back(run.rows)
            if n == 0 and len(usable) and not held:   # it no longer fits (others took the room meanwhile):
                self._looked_up.pop(seq.request_id, None)   # looked up again when it does
            return
        t0 = time.perf_counter()
        pool = scheduler.sparse.host_allocator
        pages = pool.allocate(n)
        try:
            rows = usable.slice(0, n).rows
            for at, first, end in self.rows.spans(rows):
                src = self.rows.pages(first, end, dtype=self.host.dtype, shape=self.page_shape)   # [m, L, 2, S, KVH, D]
                index = torch.tensor([pages[i] for i in at], dtype=torch.int64)
                for layer in range(self.host.num_layers):
                    self.host.layer_rows(layer).index_copy_(0, index, src[:, layer].reshape(end - first, -1))
        except BaseException:
            pool.free(pages)
            self.rows.give_back(run.rows)
            raise
        self.rows.give_back(run.rows)
        seq.pages, seq.num_computed, seq.host_backed = seq.pages + pages, (held + n) * s, True
        self.timing["copy_s"] += time.perf_counter() - t0
        self.timing["copied_bytes"] += n * self.page_bytes
        self._loaded(seq, n)

    def wait_for_lookups(self, timeout_s: float = 0.05) -> None:
        """Block until a lookup in flight has read more pages or is back (since the last `load`), or
        `timeout_s` has passed (the engine, when nothing else can run: the next `load` copies the
        pages read on to the device, or takes the lookup)."""
        if self._lookups:
            self._progressed.wait(timeout_s)

    def _write_pages(self, pages: list[int], run: LoadedRun):
        """Copy the loaded pages of `run` into device `pages`, in order; returns the CUDA event that
        completes when the copies have read its host rows (None on the CPU, where they are done).
        Landed pages are copied device to device once their landing copy is done (the stream waits,
        not the engine thread). Each run of consecutive host rows crosses as it lies, in copies of at
        most COPY_CHUNK_BYTES, asynchronous from pinned memory on CUDA (the engine thread does not wait
        for them; the step after them on the stream does). The [n, L] -> [L, n] swap happens on the device."""
        t0 = time.perf_counter()
        device, dtype = self.cache.data.device, self.cache.data.dtype
        on_cuda = device.type == "cuda"
        if on_cuda:
            stream = torch.cuda.current_stream(device)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
        done = 0
        for landed, copied in run.landed:   # [n, L, 2, S, KVH, D] on the device
            n = landed.shape[0]
            stream.wait_event(copied)
            index = torch.tensor(pages[done:done + n], dtype=torch.int64).to(device, non_blocking=True)
            self.cache.data.index_copy_(1, index, landed.transpose(0, 1))
            landed.record_stream(stream)   # allocated on the landing stream, last read on this one
            done += n
        for at, first, end in self.rows.spans(run.rows):
            step = max(1, COPY_CHUNK_BYTES // self.page_bytes) if on_cuda else end - first
            for a in range(first, end, step):
                b = min(end, a + step)
                host = self.rows.pages(a, b, dtype=dtype, shape=self.page_shape)   # [n, L, 2, S, KVH, D]
                index = torch.tensor([pages[done + i] for i in at[a - first:b - first]], dtype=torch.int64)
                if on_cuda:
                    index, host = index.to(device, non_blocking=True), host.to(device, non_blocking=True)
                self.cache.data.index_copy_(1, index, host.transpose(0, 1))
        event = None
        if on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
            self._copy_events.append((start, event))
            del self._copy_events[:-64]   # timed by copy_timing(); a server that never asks keeps the last few
        self.timing["copy_s"] += time.perf_counter() - t0
        self.timing["copied_bytes"] += len(pages) * self.page_bytes
        return event

    def copy_timing(self) -> dict[str, float]:
        """`timing`, plus on CUDA `copy_device_s`: the device time of the loads' copies since the last
        call (waits for them; for benchmarks)."""
        gpu = 0.0
        for start, end in self._copy_events:
            end.synchronize()
            gpu += start.elapsed_time(end) / 1e3
        self._copy_events.clear()
        return {**self.timing, **({"copy_device_s": gpu} if self.cache.data.device.type == "cuda" else {})}

    # -- store -------------------------------------------------------------------------------
    def store_prompts(self, seqs: list[Sequence]) -> None:
        """Write the full prompt pages of requests whose prefill has reached the prompt's end."""
        for seq in seqs:
            if seq.num_computed >= seq.num_prompt:
                self._write(seq, seq.num_prompt // self.page_size, parking=False)

    def store_finished(self, seq: Sequence) -> None:
        """When a request finishes (stop or length): write its full pages past the prompt's (its
        answer), so the next turn of the conversation, which starts with this prompt and answer,
        loads them too."""
        self._write(seq, self._computed_pages(seq), parking=False)

    def park(self, seq: Sequence) -> None:
        """Before a request is preempted: write every full page whose KV it has computed (prompt
        and generated tokens) to L3, so that its resumption loads them instead of recomputing them."""
        back = self._back.get(seq.request_id)
        if back is not None:   # its pages go with it: the lookup at its resumption finds what L3 holds
            self._end_back(back)
        full = self._computed_pages(seq)
        if full == 0:
            return
        self.stats.requests_parked += 1
        self._write(seq, full, parking=True)

    def _computed_pages(self, seq: Sequence) -> int:
        """Full pages whose KV is computed and held in the device pool (the host pool for a host-backed
        request)."""
        if not seq.pages or (seq.host_backed and self.host is None):
            return 0
        return min(seq.num_computed // self.page_size, len(seq.pages))

    def _write(self, seq: Sequence, upto: int, *, parking: bool) -> None:
        """Copy seq's full pages from the first not known in L3 up to `upto` off the device now, and
        hand their write to the I/O thread (dropped, and counted, when the pending writes are full).
        On CUDA the copy into staging rows is asynchronous: the write is handed over once it has
        completed (`_hand_over`, engine thread: the I/O thread makes no CUDA call)."""
        first = self._in_l3.get(seq.request_id, 0)
        if upto <= first or (seq.host_backed and self.host is None):
            return
        n = upto - first
        room = self.io.room_for(n * self.page_bytes)
        # (larger: a synchronous copy; a host-backed request's pages are on the host already)
        staging = self.store_rows is not None and not seq.host_backed and n <= self.store_rows.capacity
        staged = self.store_rows.take(n) if room and staging else None
        if not room or (staging and staged is None):   # (rows held by writes in flight)
            # counted once per page: a prompt's write is tried again at the next step
            self.stats.pages_dropped += max(0, upto - max(first, self._dropped.get(seq.request_id, 0)))
            self._dropped[seq.request_id] = max(upto, self._dropped.get(seq.request_id, 0))
            return
        self._in_l3[seq.request_id] = upto
        write = functools.partial(self._write_missing, seq.token_ids[:upto * self.page_size], first,
                                  parking=parking, salt=seq.key_salt(self.page_size))
        device = self.cache.data.device
        if seq.host_backed:   # the pages are in the host pool: the I/O thread reads them there
            held = seq.pages[first:upto]
            self.host.allocator.hold(held)   # not handed out again before the write has read them
            write = functools.partial(self._write_host, write, held)
            if device.type == "cuda":   # handed over once the device's writes into these pages have landed
                self._stage(write, n * self.page_bytes)
            else:
                self.io.submit(write, nbytes=n * self.page_bytes)
            return
        self._wait_back_copies()   # (pages a back read gave may be among them)
        try:
            index = torch.tensor(seq.pages[first:upto], dtype=torch.int64, device=device)
            pages = self.cache.data.index_select(1, index).transpose(0, 1).contiguous()   # [n, L, 2, S, KVH, D]
            if staged is None:   # CPU (the gathered pages are the host copy), or too many pages to stage
                self.io.submit(functools.partial(write, pages.cpu().view(n, -1).view(torch.uint8).numpy(), False),
                               nbytes=n * self.page_bytes)
                return
            for pos, a, b in runs(staged):   # asynchronous copies into the pinned rows, one per run of rows
                dst = self.store_rows.pages(a, b, dtype=pages.dtype, shape=self.page_shape)
                dst.copy_(pages[pos:pos + b - a], non_blocking=True)
        except BaseException:
            if staged is not None:
                self.store_rows.give_back(staged)
            self._in_l3[seq.request_id] = first
            raise
        self._stage(functools.partial(write, staged, True), n * self.page_bytes)

    def _stage(self, write, nbytes: int) -> None:
        """CUDA, engine thread: queue `write` for the I/O thread behind an event recorded now on the
        cache device's stream, so that it is handed over (`_hand_over`) once the device work launched
        before it (a copy into staging rows, writes into host pool pages) has completed."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.cache.data.device))
        self._staged.append((done, write, nbytes))
        self._hand_over(wait=not self.io.threaded)

    def _write_host(self, write, pages: list[int]) -> None:
        """On the I/O thread: gather host pool `pages` across layers into the L3 page layout [n, L, ROW]
        (one copy, no CUDA call: on CUDA this runs once the device's writes into them have landed),
        write them (`write`: `_write_missing` less its rows), then hand the pages back to the engine
        thread, which frees its hold on them (`release_holds`)."""
        try:
            index = torch.tensor(pages, dtype=torch.int64)
            rows = torch.stack([self.host.layer_rows(layer).index_select(0, index)
                                for layer in range(self.host.num_layers)], dim=1)
            write(rows.view(len(pages), -1).view(torch.uint8).numpy(), False)
        finally:
            self._unhold.append(pages)

    def release_holds(self) -> None:
        """Engine thread: free the host pages whose writes have read them (the allocator is not
        thread-safe, so the I/O thread only queues them)."""
        while self._unhold:
            self.host.allocator.free(self._unhold.popleft())

    def _hand_over(self, *, wait: bool = False) -> None:
        """Engine thread: hand the staged writes whose copy has completed to the I/O thread, in order
        (all of them, waiting for their copies, when `wait`)."""
        while self._staged:
            done, write, nbytes = self._staged[0]
            if wait:
                done.synchronize()
            elif not done.query():
                return
            self._staged.pop(0)
            self.io.submit(write, nbytes=nbytes)

    def _write_missing(self, tokens: list[int], first: int, rows, staged: bool, *, parking: bool,
                       salt: tuple[int, bytes] | None = None) -> None:
        """On the I/O thread: write the pages (full pages first.. of `tokens`) that L3 lacks. rows: the
        pages as an array [n, page bytes], or (`staged`) staging rows whose copy has completed; those
        are freed here, written or not."""
        try:
            pages = self.store_rows.views(rows) if staged else [row.data for row in rows]
            keys = page_keys(tokens, self.layout, salt=salt)[first:]
            missing = [i for i, there in enumerate(self.l3.exists(keys)) if not there]
            written = self.l3.set([keys[i] for i in missing], [pages[i] for i in missing])
        finally:
            if staged:
                self.store_rows.give_back(rows)
        if parking:
            self.stats.pages_parked += written
        else:
            self.stats.pages_stored += written

    # -- lifetime ----------------------------------------------------------------------------
    def forget(self, request_id: str) -> None:
        """A request ended (finished, aborted, failed): drop its lookup in flight, if any, and its state."""
        lookup = self._lookups.pop(request_id, None)
        if lookup is not None:
            self._lookup_bytes -= lookup.nbytes
            self._drop(lookup)   # a read running goes on: its result is dropped (its rows freed) when it ends
            lookup.seq.loading = False
        back = self._back.get(request_id)
        if back is not None:
            self._end_back(back)
        self._looked_up.pop(request_id, None)
        self._in_l3.pop(request_id, None)
        self._dropped.pop(request_id, None)

    def drain(self) -> None:
        """Wait until every write so far has ended (visible to other engines), and every other L3 call."""
        self._hand_over(wait=True)
        self.io.drain()
        self.release_holds()

    def close(self) -> None:
        """Drop the lookups in flight, run the writes still queued, join the I/O thread, close the store."""
        for request_id in list(self._lookups) + list(self._back):
            self.forget(request_id)
        self._hand_over(wait=True)
        self.io.close()
        self._checkers.close()
        self.release_holds()
        self.rows.close()   # (their memory may be the backend's)
        self.l3.close()

    def metrics(self) -> dict[str, float]:
        """The counters, the I/O backlog, the rates a cut is decided on (0 until measured: the engine's
        prefill tokens/s and the store's read bytes/s, recent steps and batches weighted most) and
        the store's counters."""
        return {**asdict(self.stats), "pending_lookups": len(self._lookups), "pending_calls": self.io.pending_calls,
                "pending_write_bytes": self.io.pending_bytes,
                "prefill_tokens_per_s": self._prefill_rate() or 0.0, "read_bytes_per_s": self._read_rate() or 0.0,
                **{f"store_{k}": v for k, v in self.l3.stats.as_dict().items()}}


def checks_on_device(mode: str | bool, all_lent: bool) -> bool:
    """Whether a CUDA engine checks landed pages on the device (`CHECK_ON_DEVICE` = mode; True and
    False, its earlier values, mean "device" and "host") when its load rows are all memory that
    store processes lent (`all_lent`: `LoadRows.all_lent`)."""
    if mode is True or mode is False:
        mode = "device" if mode else "host"
    if mode not in ("auto", "device", "host"):
        raise ValueError(f"CHECK_ON_DEVICE must be 'auto', 'device' or 'host', got {mode!r}")
    return mode == "device" or mode == "auto" and all_lent


def _lenders(backend) -> list:
    """Where the lookup rows' memory comes from (`LoadRows(lenders=...)`): a backend that lends memory
    its reads fill without a copy (a Mooncake store process's shared pool: `lends_host_memory`), one
    area per store when pages spread over several such stores, else memory of our own."""
    shards = getattr(backend, "shards", None)
    if shards and all(getattr(x, "lends_host_memory", False) for x in shards):
        return list(shards)
    return [backend if getattr(backend, "lends_host_memory", False) else None]


def meeting_stop(computed: int, low: int, page_size: int, prefill_rate: float | None,
                 read_rate: float | None, *, read_started: bool = True) -> int:
    """Where a prefill at token `computed` should stop its next chunk while a read from the back has
    pages `low`.. (a page boundary past `computed`, at most `low`'s): where the two meet if the
    prefill runs at `prefill_rate` and the read goes on at `read_rate` (tokens/s both), i.e. after
    gap * prefill / (prefill + read) of the gap's tokens, rounded up to a page; the read's edge when
    a rate is unknown or the gap is at most BACK_SPLIT_MIN_PAGES pages (closing it whole costs
    less than another step). Before the read has a page in (`read_started` False) its rate is a
    guess (the store's recent one, or a slow first batch's): the chunk takes at most a third of the
    gap, so that the steps after it steer by the read's own rate (an H200 run once prefilled an 8K
    chunk for 0.3 s while the file read it was steering by had ended after 0.2 s). Pure.

    Example::

        meeting_stop(0, 64, 16, 300.0, 100.0)   # 768: 48 of the 64 pages (3/4 of the gap)
        meeting_stop(0, 64, 16, 300.0, 100.0, read_started=False)   # 352: 22 pages (a third, rounded up)
    """
    gap = low * page_size - computed
    take = gap
    if prefill_rate and read_rate and gap > BACK_SPLIT_MIN_PAGES * page_size:
        take = max(1, int(gap * prefill_rate / (prefill_rate + read_rate)))
        if not read_started:
            take = min(take, max(1, gap // 3))
    return min(low * page_size, -(-(computed + take) // page_size) * page_size)


def kv_layout(loaded, cache: PagedKVCache) -> KVLayout:
    """The layout that keys a model's pages: its weights' identity, dtype and page geometry.

    The weights' identity: a checkpoint's content digest (`loader.fingerprint`; name and size alone let
    a fine-tune saved over the same path be served its predecessor's pages), or for random weights the
    whole config and the seed they were drawn with (the engine's seed only when it drew them)."""
    from hisa.models.loader import fingerprint

    src, cfg = loaded.source, loaded.config
    if src.kind == "random":
        shape = hashlib.blake2b(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode(),
                                digest_size=8).hexdigest()
        model_id = f"random:{src.preset}:{shape}:seed{src.seed}"
    else:
        model_id = f"{src.kind}:{Path(src.path).name}:{fingerprint(src)}"
    return KVLayout(model_id=model_id, dtype=str(cache.data.dtype).removeprefix("torch."), page_size=cache.page_size,
                    num_layers=cache.num_layers, num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim,
                    extra=(("arch", str(cfg.arch)), ("windows", repr(list(cfg.layer_windows))),
                           ("page_layout", "layers,2,S,KVH,D")))
