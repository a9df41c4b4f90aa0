"""Continuous batching with chunked prefill, admission by free pages, demotion and recompute preemption.

Torch-free: it only moves `Sequence` objects between queues and hands out page ids and slots, so
it tests on a CPU in milliseconds.

Each `schedule()` returns the work of one engine step: a list of (sequence, number of new tokens).
The step's token budget (`max_num_batched_tokens`) is split by `split_token_budget`: every decode
gets its token first, then prompt chunks share the rest so that a long prompt's prefill never holds
a short request for more than one step (see there). Running sequences are scheduled oldest first;
waiting sequences are then admitted while their share of the budget, the sequence limit and the
free pages allow; a waiting sequence whose prefix is being loaded from L3 (`loading`) is passed over
until its pages are back.

Memory, with a sparse policy (the hierarchical sparse cache), is HBM first:
  * the device page pool serves dense requests, *resident* sparse requests (every page on the
    device; attention reads only the selected ones) and the small LRU buffers of *host-backed*
    sparse requests (their full KV lives in the host pool);
  * a sparse request is admitted resident when the device pool holds its prompt, else host-backed;
  * when the device pool runs short, the youngest resident sparse request is *demoted* to
    host-backed (its pages are copied to the host pool by the engine before the step runs; it
    keeps `buffer_pages` device pages and frees the rest) before anyone is preempted;
  * only then is the youngest request holding device pages preempted (pages freed, recomputed later).
"""

from __future__ import annotations

import os

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from hisa.engine.prefix_cache import count_admitted
from hisa.engine.sequence import Sequence, Status
from hisa.kvcache.page_allocator import PageAllocator


@dataclass
class Demotion:
    """A resident sparse request moved to the host pool in this step: copy `device_pages[i]` (every
    layer) to `seq.pages[i]` (host) before the step runs. `seq.buffer_pages` are the device pages it
    keeps: NS LRU slots (`holding`: the logical page each holds, -1 for an empty one), then the tail
    page; `copies` (src, dst): a tail page another request shares is replaced by a fresh page `dst`,
    into which `src` is copied (every layer) after the host copy."""

    seq: Sequence
    device_pages: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)
    holding: list[int] | None = None  # the logical page each LRU slot holds (-1: empty); None: 0..NS-1
    applied: bool = False  # its KV was copied (a step failing before that fails the request: no KV to read)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    demoted: list[Demotion] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class SparsePolicy(Protocol):
    """What the scheduler needs from the sparse cache (implemented by SparseCoordinator)."""

    host_allocator: PageAllocator  # host-backed requests take their pages from the host pool
    buffer_pages: int  # device pages a host-backed request holds: its LRU slots + the tail page
    residency: Literal["auto", "device", "host"]  # auto: HBM first, host-backed under pressure

    # whether a sparse decode step computes the KV a prefill would (DSA: the model's own selection in
    # both); if not, the pages of its decoded tokens are keyed apart (Sequence.decode_salt)
    decodes_as_prefill: bool

    def wants(self, seq: Sequence) -> bool: ...
    def on_request_begin(self, seq: Sequence) -> bool: ...  # False: no sparse slot free
    def on_request_end(self, seq: Sequence) -> None: ...


class Scheduler:
    """Decides which sequences run in each step and owns their page lists and slots.

    Every running request holds a `slot` (a row of the device-side tables) in [0, max_num_seqs).
    """

    def __init__(self, *, allocator: PageAllocator, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, sparse: SparsePolicy | None = None, prefix=None,
                 host_prefix=None, keep_alive_s: float = 0.0):
        """prefix: a `hisa.engine.prefix_cache.DevicePrefixCache` over `allocator` (requests held in
        the pool, dense or resident sparse, reuse cached prefix pages at admission and register
        theirs after each step), or None. host_prefix: a `HostPrefixCache` over the sparse host
        pool's allocator (the same for host-backed sparse requests), or None. keep_alive_s: how long
        the pages of a finished request with `params.keep_alive` stay cached ahead of other cached
        pages (`PageAllocator.free(keep_until=)`)."""
        self.allocator = allocator
        self.keep_alive_s = keep_alive_s
        self.prefix = prefix
        self.host_prefix = host_prefix
        self.sparse = sparse
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_demotions = 0
        # called with a request about to be preempted, while its pages still hold its KV (the L3
        # prefix cache parks them there: hisa.engine.l3_prefix); None = recompute only
        self.on_preempt = None
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    # -- queue management --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        seq.sparse = self.sparse is not None and self.sparse.wants(seq)
        if seq.sparse and not self.sparse.decodes_as_prefill and seq.decode_salt is None:
            seq.decode_salt = os.urandom(16)   # (see Sequence.decode_salt)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.finish(seq, "abort")
                    return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and give its pages back. The caller has already removed it from running."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self._release(seq, keep=reason != "abort" and seq.params.keep_alive)

    def pool(self, seq: Sequence) -> PageAllocator:
        return self.sparse.host_allocator if seq.host_backed else self.allocator

    def _release(self, seq: Sequence, *, keep: bool = False) -> None:
        if seq.pages:
            # last page first: cached prefix pages are evicted least recently freed first, so under
            # pressure a prefix loses its tail before its head (a later request reuses a leading run)
            pool = self.pool(seq)
            until = pool.clock() + self.keep_alive_s if keep and self.keep_alive_s > 0 else None
            pool.free(seq.pages[::-1], keep_until=until)
            seq.pages = []
        seq.num_registered = 0
        seq.needs_prefill = False
        if seq.buffer_pages:
            self.allocator.free(seq.buffer_pages)
            seq.buffer_pages = []
        if seq.sparse and seq.sparse_slot is not None:
            self.sparse.on_request_end(seq)
        seq.host_backed = False
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    def give_back(self, seq: Sequence) -> None:
        """A waiting request that holds pages (a matched prefix, or pages loaded from L3: host pages
        for one marked host-backed) but was not admitted returns them, last page first (as
        `_release`), and counts nothing as computed."""
        if seq.pages:
            self.pool(seq).free(seq.pages[::-1])
        seq.pages, seq.num_computed, seq.num_registered = [], 0, 0
        seq.host_backed = seq.needs_prefill = False
        seq.prefix_counts.clear()   # the lookups that gave it those pages count only if it is admitted later

    def pages_needed(self, seq: Sequence, num_new: int) -> int:
        total = -(-(seq.num_computed + num_new) // self.page_size)
        return max(0, total - len(seq.pages))

    def may_share_prefix(self, seq: Sequence) -> bool:
        """Whether `seq` may take prefix pages from the pool: dense, or sparse where it may be resident."""
        return not seq.sparse or self.sparse.residency != "host"

    def will_be_host_backed(self, seq: Sequence, *, device_tried: bool = False) -> bool:
        """Whether a waiting request will be host-backed: sparse, and residency "host", or "auto" once
        the device could not take it or when the device pool cannot hold its whole KV now (HBM first).
        Where its prefix is looked for: the host pool's prefix cache, L3 into the host pool."""
        if not seq.sparse:
            return False
        mode = self.sparse.residency
        if mode != "auto":
            return mode == "host"
        return device_tried or self.allocator.num_free < -(-seq.num_tokens // self.page_size) + len(self.running)

    def _goes_host_backed(self, seq: Sequence, *, device_tried: bool = False) -> bool:
        """Whether a waiting request holding no pages should look in the host pool's prefix cache."""
        return (self.host_prefix is not None and not seq.pages and not seq.num_computed
                and self.will_be_host_backed(seq, device_tried=device_tried))

    def device_pages_held(self, seq: Sequence) -> int:
        return len(seq.buffer_pages) + (0 if seq.host_backed else len(seq.pages))

    # -- one step ----------------------------------------------------------------------------
    def _token_shares(self) -> dict[Sequence, int]:
        """This step's tokens per sequence: running ones, and the waiting ones that could be admitted."""
        # a request whose token in flight is its last (overlap mode) is not scheduled again
        decodes = [s for s in self.running if not s.in_prefill and not s.last_pending]
        prefills = [s for s in self.running if s.in_prefill]
        prefills += [s for s in self.waiting if not s.loading][: max(0, self.max_num_seqs - len(self.running))]
        shares = split_token_budget(self.max_num_batched_tokens, num_decodes=len(decodes),
                                    prefill_demands=[s.prefill_left for s in prefills])
        return dict(zip(decodes + prefills, shares))

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        shares = self._token_shares()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(shares.get(seq, 0), budget)
            if n == 0:  # a prefill with no share this step (the decodes took the budget)
                i += 1
                continue
            while not self.pool(seq).can_allocate(self.pages_needed(seq, n)):
                if self.pool(seq) is self.allocator and self._demote_one(batch):
                    continue  # maybe seq itself: its pages now come from the host pool
                victim = self._preemption_victim(seq)
                self._preempt(victim, batch)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:  # preempted itself: nothing else can run either
                break
            seq.pages.extend(self.pool(seq).allocate(self.pages_needed(seq, n)))
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1

        if batch.preempted:
            return batch  # memory is tight: let the running ones finish before admitting more
        # Keep one free page per running decode so that the next step need not preempt at once.
        reserve = {id(self.allocator): 0}
        if self.sparse is not None:
            reserve[id(self.sparse.host_allocator)] = 0
        for s in self.running:
            if not s.in_prefill:
                reserve[id(self.pool(s))] += 1
        for seq in [s for s in self.waiting if shares.get(s, 0)]:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            matched = self.prefix.match(seq) if self.prefix is not None and self.may_share_prefix(seq) else 0
            if not matched and self._goes_host_backed(seq):
                matched = self.host_prefix.match(seq)   # the host pool's cached prefix (marks it host-backed)
            n = min(shares[seq], budget, seq.prefill_left)
            admitted = self._admit(seq, n, reserve)
            if not admitted and matched:
                on_device = not seq.host_backed
                self.give_back(seq)
                if seq.sparse and on_device:  # it may still go host-backed (from the host pool's prefix)
                    if self._goes_host_backed(seq, device_tried=True):
                        self.host_prefix.match(seq)
                    n = min(shares[seq], budget, seq.prefill_left)
                    admitted = self._admit(seq, n, reserve)
                    if not admitted and seq.pages:
                        self.give_back(seq)
            if not admitted:
                seq.prefix_counts.clear()   # looked up again next time: counted once, when it is admitted
                break
            count_admitted(seq)
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            seq.slot = self._free_slots.pop()
            seq.pages.extend(self.pool(seq).allocate(self.pages_needed(seq, n)))
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _admit(self, seq: Sequence, n: int, reserve: dict[int, int]) -> bool:
        """Can `seq` start with a chunk of n tokens? Decides a sparse request's residency (HBM first)."""
        need = self.pages_needed(seq, n)
        dev = self.allocator
        if not seq.sparse:
            return need + reserve[id(dev)] <= dev.num_free
        mode = self.sparse.residency
        host = self.sparse.host_allocator
        loaded_host = seq.host_backed  # it holds host pages already (loaded from L3 while waiting)
        resident_ok = not loaded_host and mode != "host" and need + reserve[id(dev)] <= dev.num_free
        host_ok = (mode != "device" and (not seq.pages or loaded_host)  # a prefix cache's pages are device pages
                   and need + reserve[id(host)] <= host.num_free
                   and self.sparse.buffer_pages + reserve[id(dev)] <= dev.num_free)
        if not (resident_ok or host_ok):
            return False
        seq.host_backed = not resident_ok
        if seq.host_backed:
            seq.buffer_pages = dev.allocate(self.sparse.buffer_pages)
        if not self.sparse.on_request_begin(seq):  # every sparse slot is taken
            if seq.buffer_pages:
                dev.free(seq.buffer_pages)
            seq.buffer_pages, seq.host_backed = [], loaded_host
            return False
        return True

    def _demote_one(self, batch: ScheduledBatch) -> bool:
        """Move the youngest demotable resident sparse request to the host pool. False if none can go."""
        if self.sparse is None or self.sparse.residency != "auto":
            return False
        host, keep = self.sparse.host_allocator, self.sparse.buffer_pages
        for seq in reversed(self.running):
            # in prefill: its KV is half written; small: demoting would free nothing
            if not (seq.sparse and not seq.host_backed and not seq.in_prefill and len(seq.pages) > keep
                    and host.can_allocate(len(seq.pages) + 1)):
                continue
            # The buffer's NS slots are pages this request holds alone, each still holding its logical
            # page (its sink pages and the newest others: the recent window is read every step, and
            # the newest pages are likelier picks than the oldest), topped up with empty fresh pages
            # where it shares its pages (a prefix other requests read); a shared tail page (full, taken
            # by another request's prefix) is copied to a fresh one. Every other page is let go.
            device_pages = seq.pages
            body, tail = device_pages[:-1], device_pages[-1]
            own = [i for i, p in enumerate(body) if self.allocator.refs(p) == 1]
            sinks = [i for i in own if i < self.sparse.sink_pages][: keep - 1]
            rest = [i for i in own if i >= self.sparse.sink_pages]
            kept = sinks + rest[max(0, len(rest) - (keep - 1 - len(sinks))):]
            tail_shared = self.allocator.refs(tail) > 1
            fresh_n = keep - 1 - len(kept) + tail_shared
            if fresh_n > self.allocator.num_free + len(own) - len(kept):
                continue  # demoting it would not even make room for its own buffer
            keep_set = set(kept)
            self.allocator.free([p for i, p in enumerate(body) if i not in keep_set])  # shared: one holder fewer
            seq.pages = host.allocate(len(device_pages))
            fresh = self.allocator.allocate(fresh_n)
            copies = []
            if tail_shared:
                copies.append((tail, fresh.pop()))
                self.allocator.free([tail])
                tail = copies[0][1]
            for p in [body[i] for i in kept] + [tail]:
                self.allocator.forget(p)  # an LRU slot or the tail is rewritten: no longer a prefix page
            seq.buffer_pages = [body[i] for i in kept] + fresh + [tail]  # LRU slots + the tail
            seq.num_registered = 0  # its pages are host pages now
            seq.host_backed = True
            batch.demoted.append(Demotion(seq, device_pages, copies, holding=kept + [-1] * len(fresh)))
            self.num_demotions += 1
            return True
        return False

    def _preemption_victim(self, seq: Sequence) -> Sequence:
        """The youngest running request holding pages of the pool `seq` is short of."""
        if seq.host_backed:
            return next(s for s in reversed(self.running) if s.host_backed)
        return next(s for s in reversed(self.running) if self.device_pages_held(s) > 0 or s is seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        # demoted by this very schedule: its KV is in neither pool now (the device pages it let go may
        # be another's already, the host copy has not run), so there is nothing to copy and nothing to
        # park: the demotion is dropped (it failed the whole step) and the request recomputes
        demoted = [d for d in batch.demoted if d.seq is seq]
        for d in demoted:
            batch.demoted.remove(d)
        if self.on_preempt is not None and not demoted:
            self.on_preempt(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def complete_step(self, batch: ScheduledBatch) -> None:
        """Advance `num_computed` of every scheduled sequence by the tokens it just ran."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            if seq.loaded_ahead:   # pages from L3 right after this chunk's (hisa.engine.l3_prefix)
                seq.num_computed += seq.loaded_ahead
                seq.loaded_ahead = 0
                seq.needs_prefill = True   # the next chunk records them in the step's tables
        if self.prefix is not None:
            self.prefix.register(batch.seqs)
        if self.host_prefix is not None:
            self.host_prefix.register(batch.seqs)

    def remove_finished(self) -> None:
        self.running = [s for s in self.running if not s.is_finished]


def split_token_budget(budget: int, *, num_decodes: int, prefill_demands: list[int]) -> list[int]:
    """Split one step's token budget: decodes first, then prompt chunks. Torch-free, pure.

    prefill_demands: remaining prompt tokens of each prefill candidate, oldest first (running
    prefills, then the waiting queue). Returns one share per decode (1, or 0 when the decodes alone
    exceed the budget) followed by one per prefill candidate, summing to at most `budget`.

    When several prompts compete, the oldest is guaranteed half of what the decodes leave (so a long
    prompt always progresses), the others are served shortest first from the other half (so a short
    prompt arriving during a long prefill is prefilled in the next step when it fits in half the
    budget), and whatever is left goes back to them oldest first. A prompt alone gets all of it.

    Example::

        split_token_budget(512, num_decodes=2, prefill_demands=[6000, 20])   # -> [1, 1, 490, 20]
    """
    decodes = [1 if i < budget else 0 for i in range(num_decodes)]
    left = budget - sum(decodes)
    shares = [0] * len(prefill_demands)
    if not prefill_demands or left <= 0:
        return decodes + shares
    oldest = prefill_demands[0]
    shares[0] = min(oldest, left if len(prefill_demands) == 1 else max(1, left // 2))
    left -= shares[0]
    for i in sorted(range(1, len(prefill_demands)), key=lambda j: prefill_demands[j]):
        shares[i] = min(prefill_demands[i], left)
        left -= shares[i]
    for i, demand in enumerate(prefill_demands):
        extra = min(left, demand - shares[i])
        shares[i] += extra
        left -= extra
    return decodes + shares
