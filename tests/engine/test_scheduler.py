"""The scheduler and page allocator alone (torch-free, milliseconds)."""

from __future__ import annotations

import random

import pytest

from hisa.engine.sampling_params import SamplingParams
from hisa.engine.scheduler import Scheduler
from hisa.engine.sequence import Sequence, Status
from hisa.kvcache.page_allocator import PageAllocator


def _seq(i, n_prompt, max_tokens=8):
    return Sequence(request_id=str(i), prompt_token_ids=list(range(n_prompt)),
                    params=SamplingParams(max_tokens=max_tokens))


def _make(num_pages=64, page_size=4, max_num_seqs=8, max_tokens=32):
    return Scheduler(allocator=PageAllocator(num_pages), page_size=page_size, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_tokens)


def _run_step(sched, batch, rng):
    """What the engine does after the model ran: advance, append a token where one is sampled, finish."""
    sched.complete_step(batch)
    for seq in batch.seqs:
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.append(rng.randrange(100))
            if seq.num_output >= seq.params.max_tokens:
                sched.finish(seq, "length")
    sched.remove_finished()


def test_allocator_round_trip_and_double_free():
    alloc = PageAllocator(4)
    pages = alloc.allocate(3)
    assert sorted(pages) == [0, 1, 2] and alloc.num_free == 1
    with pytest.raises(MemoryError):
        alloc.allocate(2)
    alloc.free(pages)
    assert alloc.num_free == 4
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free([0])


def test_allocator_hands_out_the_lowest_free_ids_most_recently_freed_first():
    """Ids come from the free list as successive pops would give them (the bulk path of `allocate`
    and the one-by-one path agree), and a freed page is the next one handed out."""
    alloc = PageAllocator(8)
    assert alloc.allocate(3) == [0, 1, 2]
    alloc.free([1])
    assert alloc.allocate(2) == [1, 3]   # the page just freed first, then the lowest never used
    alloc.free([0, 2])
    assert alloc.allocate(4) == [2, 0, 4, 5]
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free([3, 3])   # two drops of page 3's one reference
    assert alloc.num_free == 8 - 6 and alloc.refs(3) == 1   # a free that raises frees nothing


def test_allocator_frees_long_lists_as_one_id_at_a_time_would():
    """A request's whole page list (the vector path of `free`, past SMALL ids) leaves the pool as
    freeing its ids one at a time does: the same ids handed out next, in the same order, shared
    pages still held, registered ones cached (kept under a deadline) in list order; a list that names
    a page twice, or a page nobody holds, raises and frees nothing."""
    from hisa.kvcache.page_allocator import SMALL

    def pool_after(one_by_one: bool) -> tuple:
        now = [0.0]
        alloc = PageAllocator(4 * SMALL + 10, clock=lambda: now[0])
        a = alloc.allocate(2 * SMALL)        # a long request
        b = alloc.allocate(SMALL + 3)        # another request, left as it is
        alloc.hold(a[5:10])                  # a's pages 5..9 held elsewhere too (shared)
        for i in (1, 4, 7):
            alloc.register(a[i], b"k%d" % i)
        freed = a[::-1]                      # last page first, as the scheduler frees
        if one_by_one:
            for p in freed:
                alloc.free([p], keep_until=5.0)
        else:
            alloc.free(freed, keep_until=5.0)
        state = (alloc.num_free, alloc.num_kept, [alloc.refs(p) for p in a + b])
        return state, alloc.allocate(3 * SMALL), alloc.lookup([b"k1"])

    assert pool_after(False) == pool_after(True)
    alloc = PageAllocator(4 * SMALL)
    pages = alloc.allocate(2 * SMALL)
    for bad in (pages + pages[:1], pages + [4 * SMALL - 1], pages + [-1]):
        with pytest.raises(ValueError, match="freed twice|not a page"):
            alloc.free(bad)
        assert alloc.num_free == 2 * SMALL and all(alloc.refs(p) == 1 for p in pages)
    alloc.free(pages)
    assert alloc.num_free == 4 * SMALL and alloc.allocate(2) == [pages[-1], pages[-2]]  # the last freed first


def test_chunked_prefill_respects_token_budget():
    sched = _make(max_tokens=10)
    sched.add(_seq(0, 25))
    chunks = []
    while True:
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens[0])
        _run_step(sched, batch, random.Random(0))
        if sched.running[0].num_output:
            break
    assert chunks == [10, 10, 5]


def test_decodes_and_prefill_chunks_share_a_step():
    sched = _make(max_tokens=8)
    a, b = _seq(0, 3), _seq(1, 20)
    sched.add(a)
    _run_step(sched, sched.schedule(), random.Random(0))  # a prefilled
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 7]


def test_admission_waits_for_free_pages_and_max_num_seqs():
    sched = _make(num_pages=6, page_size=4, max_num_seqs=2, max_tokens=100)
    for i in range(3):
        sched.add(_seq(i, 8))  # 2 pages each
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["0", "1"]  # max_num_seqs
    assert len(sched.waiting) == 1


def test_random_workload_preempts_and_never_leaks():
    rng = random.Random(1)
    sched = _make(num_pages=24, page_size=4, max_num_seqs=6, max_tokens=16)
    seqs = [_seq(i, rng.randint(1, 30), max_tokens=rng.randint(1, 20)) for i in range(30)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch.num_tokens <= 16 and len(sched.running) <= 6
        used = sum(len(s.pages) for s in sched.running)
        assert used == sched.allocator.num_used  # every used page belongs to one running sequence
        for s in sched.running:
            assert len(s.pages) * 4 >= s.num_computed
        _run_step(sched, batch, rng)
        steps += 1
        assert steps < 10_000
    assert sched.num_preemptions > 0
    assert sched.allocator.num_free == 24
    assert all(s.status == Status.FINISHED and s.num_output == s.params.max_tokens for s in seqs)


def test_abort_frees_pages():
    sched = _make()
    sched.add(_seq(0, 10))
    sched.schedule()
    assert sched.allocator.num_used == 3
    assert sched.abort("0").finish_reason == "abort"
    assert sched.allocator.num_used == 0 and not sched.has_unfinished()
    assert sched.abort("missing") is None


# -- HBM first: resident and host-backed sparse requests ----------------------------------------------
class _Policy:
    """A torch-free sparse policy: prompts of >= 8 tokens are sparse; `slots` sparse slots."""

    def __init__(self, host_pages: int, *, buffer_pages: int = 3, residency: str = "auto", slots: int = 8):
        self.host_allocator = PageAllocator(host_pages)
        self.buffer_pages, self.residency = buffer_pages, residency
        self.sink_pages = 1
        self.decodes_as_prefill = False   # page-level selection: a request's decoded pages differ from dense
        self.free = list(range(slots))
        self.begun, self.ended = [], []

    def wants(self, seq):
        return seq.num_prompt >= 8

    def on_request_begin(self, seq):
        if not self.free:
            return False
        seq.sparse_slot = self.free.pop()
        self.begun.append((seq.request_id, seq.host_backed, list(seq.buffer_pages)))
        return True

    def on_request_end(self, seq):
        self.free.append(seq.sparse_slot)
        self.ended.append(seq.request_id)
        seq.sparse_slot = None


def _sparse_sched(num_pages, host_pages, **kw):
    policy = _Policy(host_pages, **kw)
    return Scheduler(allocator=PageAllocator(num_pages), page_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                     sparse=policy), policy


def test_sparse_requests_are_resident_while_the_device_pool_has_room():
    sched, policy = _sparse_sched(num_pages=15, host_pages=40)
    a, b = _seq(0, 16), _seq(1, 16)  # 4 pages each
    sched.add(a), sched.add(b)
    _run_step(sched, sched.schedule(), random.Random(0))
    assert not a.host_backed and not b.host_backed
    assert sched.allocator.num_used == 8 and policy.host_allocator.num_used == 0
    c = _seq(2, 16)
    sched.add(c)
    # a and b take their 5th page (10 used, 5 free): c's 4 pages + the two decodes' reserve do not fit
    # on the device, its 3-page buffer + the reserve do: host-backed
    batch = sched.schedule()
    assert c in batch.seqs and c.host_backed and len(c.buffer_pages) == 3
    assert policy.host_allocator.num_used == 4 and len(c.pages) == 4
    assert policy.begun[-1] == ("2", True, c.buffer_pages)  # the policy saw the buffer at begin


def test_the_youngest_resident_request_is_demoted_before_anyone_is_preempted():
    """The device pool runs short while two resident requests decode: the younger one moves to the
    host pool (its pages listed for the copy; kept: its sink page, the newest of the others and the
    tail) instead of a recompute preemption; nothing is lost or double-counted."""
    rng = random.Random(0)
    sched, policy = _sparse_sched(num_pages=11, host_pages=40)
    a, b = _seq(0, 16, max_tokens=12), _seq(1, 16, max_tokens=12)
    sched.add(a), sched.add(b)
    demoted = []
    while sched.has_unfinished():
        batch = sched.schedule()
        demoted += [(d, len(d.seq.pages), list(d.seq.buffer_pages)) for d in batch.demoted]
        assert not batch.preempted
        held = sum(sched.device_pages_held(s) for s in sched.running)
        assert held == sched.allocator.num_used
        assert sum(len(s.pages) for s in sched.running if s.host_backed) == policy.host_allocator.num_used
        _run_step(sched, batch, rng)
    assert [d.seq for d, _, _ in demoted] == [b] and sched.num_demotions == 1
    d, host_pages, kept = demoted[0]
    # every page goes to the host (and the step's new page, when the demotion made room for it, is a host page)
    assert host_pages in (len(d.device_pages), len(d.device_pages) + 1)
    # the buffer holds logical 0 (the sink) and the newest page before the tail; then the tail
    assert kept == [d.device_pages[0], d.device_pages[-2], d.device_pages[-1]]
    assert a.num_output == b.num_output == 12 and a.num_preemptions == b.num_preemptions == 0
    assert sched.allocator.num_free == 11 and policy.host_allocator.num_free == 40
    assert sorted(policy.ended) == ["0", "1"]


@pytest.mark.parametrize("residency", ["device", "host"])
def test_residency_modes_pin_the_tier(residency):
    sched, policy = _sparse_sched(num_pages=40, host_pages=40, residency=residency)
    s = _seq(0, 16)
    sched.add(s)
    sched.schedule()
    assert s.host_backed == (residency == "host")


def test_random_sparse_workload_never_leaks_any_tier():
    rng = random.Random(3)
    sched, policy = _sparse_sched(num_pages=30, host_pages=50, slots=3)
    seqs = [_seq(i, rng.randint(2, 40), max_tokens=rng.randint(1, 16)) for i in range(25)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        assert sum(sched.device_pages_held(s) for s in sched.running) == sched.allocator.num_used
        assert sum(len(s.pages) for s in sched.running if s.host_backed) == policy.host_allocator.num_used
        assert sum(1 for s in sched.running if s.sparse) <= 3
        _run_step(sched, batch, rng)
        steps += 1
        assert steps < 10_000
    assert sched.allocator.num_free == 30 and policy.host_allocator.num_free == 50 and len(policy.free) == 3
    assert all(s.status == Status.FINISHED and s.num_output == s.params.max_tokens for s in seqs)


# -- mixed load: the per-step token budget ------------------------------------------------------------
from hisa.engine.scheduler import split_token_budget  # noqa: E402


@pytest.mark.parametrize("budget, decodes, demands, expected", [
    (512, 2, [6000, 20], [1, 1, 490, 20]),  # a short prompt behind a long one: prefilled at once
    (512, 0, [6000], [512]),  # a prompt alone takes the whole budget
    (512, 0, [6000, 6000, 30], [256, 226, 30]),  # shortest first after the oldest's half
    (2048, 0, [1000] * 4, [1000, 1000, 48, 0]),  # equal prompts: first come, first served
    (4, 6, [100], [1, 1, 1, 1, 0, 0, 0]),  # more decodes than budget
    (10, 0, [], []),
])
def test_split_token_budget(budget, decodes, demands, expected):
    shares = split_token_budget(budget, num_decodes=decodes, prefill_demands=demands)
    assert shares == expected and sum(shares) <= budget


def test_split_token_budget_properties():
    rng = random.Random(0)
    for _ in range(2000):
        budget, decodes = rng.randint(1, 600), rng.randint(0, 40)
        demands = [rng.choice([1, 5, 30, 200, 5000]) for _ in range(rng.randint(0, 8))]
        shares = split_token_budget(budget, num_decodes=decodes, prefill_demands=demands)
        pre = shares[decodes:]
        assert sum(shares) == min(budget, decodes + sum(demands))  # no budget wasted, none exceeded
        assert all(0 <= s <= d for s, d in zip(pre, demands))
        left = budget - min(budget, decodes)
        if demands and left > 0:  # the oldest prompt always progresses: at least half of what is left
            assert pre[0] >= min(demands[0], max(1, left // 2))
            # the others, shortest first, are served in full while they fit in the other half
            cumulative, other_half = 0, left - min(demands[0], max(1, left // 2))
            for i in sorted(range(1, len(demands)), key=lambda j: demands[j]):
                cumulative += demands[i]
                if cumulative <= other_half:
                    assert pre[i] == demands[i]


def test_long_prefill_does_not_hold_decodes_or_a_short_prompt():
    sched = _make(num_pages=400, page_size=4, max_tokens=64)
    rng = random.Random(0)
    decoding = _seq("d", 5, max_tokens=100)
    sched.add(decoding)
    _run_step(sched, sched.schedule(), rng)  # prefilled; decodes from now on
    long = _seq("long", 1000)
    sched.add(long)
    batch = sched.schedule()
    assert dict(zip(batch.seqs, batch.num_new_tokens)) == {decoding: 1, long: 63}
    _run_step(sched, batch, rng)
    short = _seq("short", 20)
    sched.add(short)  # arrives while the long prompt is prefilling
    batch = sched.schedule()
    assert dict(zip(batch.seqs, batch.num_new_tokens)) == {decoding: 1, long: 43, short: 20}
    _run_step(sched, batch, rng)
    assert short.num_output == 1 and long.in_prefill  # its first token, one step after it arrived


def test_a_demotion_keeps_only_pages_the_request_holds_alone():
    """A resident request whose pages other requests share (a cached prefix they matched) is demoted:
    its LRU slots are the pages it holds alone, each holding its logical page, topped up with empty
    fresh pages; a shared tail is copied to a fresh page; the shared pages only lose its reference
    (the others still read them); its own kept pages are no longer named prefix pages."""
    from hisa.engine.scheduler import ScheduledBatch

    sched, policy = _sparse_sched(num_pages=20, host_pages=40, buffer_pages=4)  # 3 LRU slots + the tail
    alloc = sched.allocator
    b = _seq(0, 24)
    sched.add(b)
    sched.schedule()
    assert not b.host_backed and len(b.pages) == 6
    b.num_computed = 24
    for i, p in enumerate(b.pages):
        alloc.register(p, bytes([i]))
    other = [b.pages[0], b.pages[1], b.pages[5]]  # another request shares pages 0, 1 and the (full) tail
    alloc.share(other)
    device_pages = list(b.pages)
    batch = ScheduledBatch()
    assert sched._demote_one(batch)
    d = batch.demoted[0]
    assert d.seq is b and b.host_backed and d.device_pages == device_pages and len(b.pages) == 6
    assert d.holding == [2, 3, 4]  # the first pages it holds alone, each still holding its logical page
    assert b.buffer_pages[:3] == device_pages[2:5]
    (src, dst), = d.copies
    assert src == device_pages[5] and b.buffer_pages[3] == dst and dst not in device_pages
    assert [alloc.refs(p) for p in other] == [1, 1, 1]  # the other holder keeps them, named
    assert alloc.lookup([bytes([0]), bytes([1])]) == device_pages[:2]
    assert alloc.lookup([bytes([2])]) == []  # an LRU slot is rewritten: it names no prefix any more
    sched._release(b)
    alloc.free(other)
    assert alloc.num_free == alloc.num_pages and policy.host_allocator.num_free == 40
