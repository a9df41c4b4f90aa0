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
