"""One request as the scheduler and runner see it (torch-free)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from hisa.engine.detokenizer import DetokState
from hisa.engine.sampling_params import SamplingParams


# The value a Sequence holds for its token still being sampled on the device (overlap mode,
# `hisa.engine.overlap`): counted like any token (num_tokens, pages, positions), read by nothing
# that needs the value until the step is resolved and it is replaced.
PENDING_TOKEN = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request: its tokens, its pages and its progress.

    `token_ids` = prompt + generated so far. `num_computed` counts tokens whose KV is in the cache.
    After a preemption the pages are freed and `num_computed` drops to 0: the prompt and the output
    so far are recomputed as one prefill (recompute preemption), and generation continues.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    pages: list[int] = field(default_factory=list)  # physical page ids, in order
    finish_reason: str | None = None
    stop_text_len: int | None = None  # where a stop string cut the text
    first_token_time: float | None = None
    num_preemptions: int = 0
    slot: int | None = None  # its row of the device-side per-request tables while it runs
    sparse: bool = False  # decided when the request arrives (SparseCoordinator.wants)
    sparse_slot: int | None = None  # its row of the sparse state (representations, LRU) while it runs
    # Where a sparse request's KV lives (decided at admission, HBM first): resident (False) = every
    # page in the device pool, like a dense request; host-backed (True) = every page in the host pool
    # (`pages` are host page ids) and only `buffer_pages` on the device: an LRU of device pages
    # that each layer fills with the pages it selects, then one "tail" page (last) that holds the
    # page being written.
    host_backed: bool = False
    buffer_pages: list[int] = field(default_factory=list)
    # Device prefix reuse (hisa.engine.prefix_cache): chain digests of its full pages so far, and how
    # many of its pages are registered in the allocator (0 again once its pages are released)
    prefix_digests: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    # A sparse request's pages from the one holding its first output token on hold KV its sparse decode
    # steps computed, unlike what a prefill of the same tokens computes (every later layer attended to
    # selected pages only): their prefix digests and L3 keys are salted with this request's own random
    # salt (`hisa.kvcache.l3.keys.salted`), so only this request (resumed after a preemption or parking)
    # finds them, never another one whose prompt repeats those tokens (a chat's next turn prefills them,
    # as without any cache). None: its KV is what a prefill computes (dense; DSA's own selection).
    decode_salt: bytes | None = None
    # Its prefix lookups (stats, pages, tokens) not counted yet: counted once it is admitted, dropped
    # when it is not (a request waiting for room is looked up again at every step)
    prefix_counts: list = field(default_factory=list)
    # Pages it was given with their KV (a prefix the pool shared, pages loaded from L3) that no prefill
    # chunk has recorded in the step's tables (block or host table, the sparse representations) yet:
    # its next chunk runs as a prefill even when it is one token, which would otherwise look like a
    # decode row (hisa.engine.model_runner)
    needs_prefill: bool = False
    # True while its leading pages are being looked up in L3 (hisa.engine.l3_prefix): the scheduler
    # leaves it waiting until they are back
    loading: bool = False
    # While the pages after its prefilled ones are read from L3 back to front (hisa.engine.l3_prefix,
    # a read that was slower than prefilling: the two meet in the middle): its prefill chunks end at
    # most at this token, a page boundary; None otherwise.
    prefill_stop: int | None = None
    # Tokens of pages loaded from L3 right after those of the chunk scheduled with them, counted as
    # computed once that chunk has run (`Scheduler.complete_step`)
    loaded_ahead: int = 0
    # Teacher forcing (LLMEngine.score): the outputs to feed instead of sampling, and the logits seen.
    forced_output: list[int] | None = None
    scored_logits: list = field(default_factory=list)
    detok: DetokState = field(default_factory=DetokState)  # its output's text, built incrementally
    # Overlap mode: True when its last token is PENDING_TOKEN (sampled by the step in flight, not read
    # back yet), and `last_pending` when that token is its last for sure (max_tokens or the context):
    # the scheduler does not schedule it again.
    pending: bool = False
    last_pending: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_token_ids)

    def key_salt(self, page_size: int) -> tuple[int, bytes] | None:
        """(first salted page, salt) for its prefix digests and L3 keys; None when nothing is salted."""
        return None if self.decode_salt is None else (self.num_prompt // page_size, self.decode_salt)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt

    @property
    def prefill_left(self) -> int:
        """Tokens its next prefill chunk may take: up to its last token, or to `prefill_stop`."""
        end = self.num_tokens if self.prefill_stop is None else min(self.num_tokens, self.prefill_stop)
        return max(0, end - self.num_computed)

    @property
    def in_prefill(self) -> bool:
        """True while some known token (prompt, or output after a preemption) has no KV yet, except the last."""
        return self.num_computed < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def drop_pending(self) -> None:
        """Take the PENDING_TOKEN (overlap mode) off its tokens, if it has one."""
        if self.pending:
            self.token_ids.pop()
            self.pending = self.last_pending = False
