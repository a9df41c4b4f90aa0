"""Continuous batching with chunked prefill, admission by free pages and recompute preemption.

Torch-free: it only moves `Sequence` objects between queues and hands out page ids, so it tests on
a CPU in milliseconds.

Each `schedule()` returns the work of one engine step: a list of (sequence, number of new tokens).
Running sequences go first, oldest first (a decode needs 1 token, a prefill in progress takes the
next chunk); when pages run out, the youngest running sequence is preempted: its pages are freed
and it goes back to the front of the waiting queue, to be recomputed later. Waiting sequences are
then admitted while the token budget, the sequence limit and the free pages allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hisa.engine.sequence import Sequence, Status
from hisa.kvcache.page_allocator import PageAllocator


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Decides which sequences run in each step and owns their page lists."""

    def __init__(self, *, allocator: PageAllocator, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management --------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
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
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.pages:
            self.allocator.free(seq.pages)
            seq.pages = []

    def pages_needed(self, seq: Sequence, num_new: int) -> int:
        total = -(-(seq.num_computed + num_new) // self.page_size)
        return max(0, total - len(seq.pages))

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.pages_needed(seq, n)
            while not self.allocator.can_allocate(need):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:  # preempted itself: nothing else can run either
                break
            seq.pages.extend(self.allocator.allocate(need))
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1

        if batch.preempted:
            return batch  # memory is tight: let the running ones finish before admitting more
        # Keep one free page per running decode so that the next step need not preempt at once.
        reserve = sum(1 for s in self.running if not s.in_prefill)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.pages_needed(seq, n)
            if need + reserve > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.pages.extend(self.allocator.allocate(need))
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
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

    def remove_finished(self) -> None:
        self.running = [s for s in self.running if not s.is_finished]
