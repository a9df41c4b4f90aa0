"""Prefix reuse in the device pool (`hisa.engine.prefix_cache`): the allocator's shared and cached pages,
the scheduler's use of them (torch-free), and the same greedy tokens end to end (SmolLM2, Gemma-3)."""

from __future__ import annotations

import random

import pytest

from hisa import SamplingParams
from hisa.engine.prefix_cache import DevicePrefixCache
from hisa.engine.scheduler import Scheduler
from hisa.engine.sequence import Sequence, Status
from hisa.kvcache.page_allocator import PageAllocator

S = 4


def test_allocator_keeps_freed_registered_pages_until_it_needs_them():
    alloc = PageAllocator(4)
    a = alloc.allocate(3)
    assert alloc.register(a[0], b"k0") and alloc.register(a[1], b"k1")
    assert not alloc.register(a[2], b"k0")  # the key names page a[0] already
    alloc.share(alloc.lookup([b"k0"]))  # a second holder of page a[0]
    alloc.free(a)
    assert alloc.refs(a[0]) == 1 and alloc.num_cached == 1 and alloc.num_free == 3
    alloc.free([a[0]])
    assert alloc.num_cached == 2 and alloc.num_free == 4  # cached pages count as free
    assert alloc.lookup([b"k0", b"k1", b"k2"]) == [a[0], a[1]]
    assert alloc.lookup([b"k1"]) == [a[1]]  # a key is looked up as the start of a run
    got = alloc.allocate(3)  # the two free pages first, then the least recently freed cached page (a[1])
    assert set(got[:2]) == {a[2], 3} and got[2] == a[1] and alloc.evicted == 1
    assert alloc.lookup([b"k0", b"k1"]) == [a[0]] and alloc.num_free == 1
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free([got[0], got[0]])
    assert alloc.refs(got[0]) == 1 and alloc.num_free == 1  # a free that raises frees nothing
    alloc.free([got[0]])
    with pytest.raises(ValueError, match="not in use"):
        alloc.register(got[0], b"k3")  # freed just above


def test_kept_pages_are_evicted_after_other_cached_pages_until_their_deadline():
    """free(keep_until=): cached pages evicted only once no ordinary cached page is left, the request
    freed first first; a kept page can be shared back; past the deadline kept pages are ordinary
    cached pages again."""
    now = [0.0]
    alloc = PageAllocator(6, clock=lambda: now[0])
    a, b, c = alloc.allocate(2), alloc.allocate(2), alloc.allocate(2)
    for i, p in enumerate(a + b + c):
        alloc.register(p, bytes([i]))
    alloc.free(a, keep_until=10.0)   # session a finished, kept 10 s
    alloc.free(b)                    # an ordinary request
    alloc.free(c, keep_until=20.0)   # session c finished later
    assert alloc.num_kept == 4 and alloc.num_cached == 6 and alloc.num_free == 6
    assert set(alloc.allocate(2)) == set(b) and alloc.kept_evicted == 0  # the ordinary ones go first
    assert set(alloc.allocate(2)) == set(a) and alloc.kept_evicted == 2  # then the oldest session
    alloc.share(alloc.lookup([bytes([4]), bytes([5])]))  # session c comes back: its pages in use again
    assert alloc.num_kept == 0 and alloc.num_free == 0
    alloc.free(c, keep_until=30.0)
    assert alloc.num_kept == 2
    now[0] = 31.0
    assert alloc.num_kept == 0 and alloc.num_cached == 2  # past the deadline: ordinary cached pages
    alloc.allocate(1)
    assert alloc.kept_evicted == 2 and alloc.evicted == 5
    alloc.free(alloc.allocate(1), keep_until=1.0)  # a deadline already past: nothing is kept
    assert alloc.num_kept == 0


def _seq(rid: str, tokens: list[int], max_tokens: int = 4, keep_alive: bool = False) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=list(tokens),
                    params=SamplingParams(max_tokens=max_tokens, keep_alive=keep_alive))


def _scheduler(num_pages: int = 32, max_tokens: int = 64, max_num_seqs: int = 4):
    alloc = PageAllocator(num_pages)
    prefix = DevicePrefixCache(alloc, page_size=S)
    return Scheduler(allocator=alloc, page_size=S, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens,
                     prefix=prefix), prefix


def _finish_step(sched, batch, rng) -> None:
    """What the engine does after the model ran, with made-up tokens: advance, sample, finish."""
    sched.complete_step(batch)
    for seq in batch.seqs:
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.append(rng.randrange(1000, 2000))
            if seq.num_output >= seq.params.max_tokens:
                sched.finish(seq, "length")
    sched.remove_finished()


def _run(sched, rng=None):
    """Steps until every request finished."""
    rng = rng or random.Random(0)
    while sched.has_unfinished():
        _finish_step(sched, sched.schedule(), rng)


def test_a_held_page_is_not_handed_out_until_the_hold_is_freed():
    alloc = PageAllocator(3)
    pages = alloc.allocate(2)
    alloc.hold(pages[:1])            # e.g. an L3 write still reads it
    alloc.free(pages)                # its request ended
    assert alloc.num_free == 2 and alloc.refs(pages[0]) == 1
    assert pages[0] not in alloc.allocate(2)
    alloc.free(pages[:1])            # the write has read it
    assert alloc.num_free == 1
    with pytest.raises(ValueError, match="not in use"):
        alloc.hold([pages[0]])


def test_a_request_waiting_for_room_counts_its_hit_once_when_admitted():
    """The scheduler looks a waiting request up at every step; /metrics' prefix counters count it once."""
    sched, prefix = _scheduler(num_pages=16)
    rng = random.Random(0)
    sched.add(_seq("a", list(range(17)), max_tokens=1))        # leaves 4 full pages cached
    _run(sched, rng)
    sched.add(_seq("b", list(range(100, 128)), max_tokens=8))   # holds most of the other pages for a while
    _finish_step(sched, sched.schedule(), rng)
    late = _seq("c", list(range(17)) + list(range(200, 220)), max_tokens=1)
    sched.add(late)
    waited = 0
    while late.status == Status.WAITING and waited < 100:
        _finish_step(sched, sched.schedule(), rng)
        waited += 1
    assert 1 < waited < 100, "the test did not make the request wait, or it never got in"
    assert late.num_computed >= 16 and prefix.stats.tokens_hit == 16  # it took the cached prefix once
    assert (prefix.stats.lookups, prefix.stats.requests_hit, prefix.stats.pages_hit) == (3, 1, 4)
    _run(sched, rng)
    assert sched.allocator.num_free == 16


def test_a_request_starts_after_the_pages_an_earlier_one_left():
    sched, prefix = _scheduler()
    first = _seq("a", list(range(10)), max_tokens=6)  # 16 tokens computed in the end: pages 0-2 full
    sched.add(first)
    _run(sched)
    assert prefix.stats.pages_registered == 3 and sched.allocator.num_cached == 3
    # its prompt and answer, then more: the pages of both are reused, only the rest is prefilled
    second = _seq("b", first.token_ids + [7, 7, 7])
    sched.add(second)
    batch = sched.schedule()
    assert second.num_computed == 12 and batch.num_new_tokens == [len(second.token_ids) - 12]
    # the same prompt again: everything but the last token's page comes from the pool
    third = _seq("c", list(range(8)))
    sched.add(third)
    sched.schedule()
    assert third.num_computed == 4  # 8 tokens: page 1 holds the last token, which is always computed
    _run(sched)
    assert sched.allocator.num_free == 32


def test_requests_sharing_a_prefix_hold_the_same_pages_and_none_leaks():
    sched, prefix = _scheduler(num_pages=20, max_tokens=16)
    rng = random.Random(3)
    base = list(range(100, 120))
    seqs = [_seq(str(i), base[:rng.randint(5, 20)] + [rng.randrange(50) for _ in range(rng.randint(0, 6))],
                 max_tokens=rng.randint(1, 8)) for i in range(40)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        held = {}
        for s in sched.running:
            for p in s.pages:
                held[p] = held.get(p, 0) + 1
        assert all(sched.allocator.refs(p) == n for p, n in held.items())  # one reference per holder
        assert len(held) == sched.allocator.num_used
        _finish_step(sched, batch, rng)
        steps += 1
        assert steps < 10_000
    assert all(s.status == Status.FINISHED for s in seqs)
    assert sched.allocator.num_free == 20 and prefix.stats.requests_hit > 10


@pytest.mark.parametrize("keep_alive", [False, True])
def test_a_kept_session_finds_its_pages_after_other_requests_filled_the_pool(keep_alive):
    """A turn of an agent session finishes, then unrelated requests need most of the pool: without
    keep_alive the session's pages, freed first, are evicted first; with it the unrelated requests'
    cached pages go instead and the session's next turn (its prompt and answer, then more) reuses
    every full page."""
    alloc = PageAllocator(10)
    prefix = DevicePrefixCache(alloc, page_size=S)
    sched = Scheduler(allocator=alloc, page_size=S, max_num_seqs=2, max_num_batched_tokens=64, prefix=prefix,
                      keep_alive_s=60.0)
    turn = _seq("s1", list(range(14)), max_tokens=2, keep_alive=keep_alive)  # 15 computed: 3 full pages
    sched.add(turn)
    _run(sched)
    for i in range(2):  # unrelated requests of 5 pages (4 registered) one after the other: the second
        sched.add(_seq(f"x{i}", [500 + 20 * i + j for j in range(19)], max_tokens=1))  # needs 2 cached pages
        _run(sched)
    again = _seq("s2", turn.token_ids + [9, 9, 9], keep_alive=keep_alive)
    sched.add(again)
    sched.schedule()
    if keep_alive:  # the first unrelated request's pages went: every full page of the session is back
        assert again.num_computed == 3 * S and alloc.kept_evicted == 0
    else:  # the session's pages were the least recently freed: its tail pages went
        assert again.num_computed == S
    _run(sched)
    assert alloc.num_free == 10 and alloc.num_kept == (5 if keep_alive else 0)  # s2: 22 tokens computed


def test_a_request_not_admitted_gives_its_matched_pages_back():
    sched, prefix = _scheduler(num_pages=6, max_tokens=64, max_num_seqs=1)
    done = _seq("a", list(range(13)), max_tokens=1)
    sched.add(done)
    _run(sched)
    running = _seq("b", [9] * 9, max_tokens=50)
    sched.add(running)
    sched.schedule()  # b runs and holds the only slot
    waiting = _seq("c", list(range(13)) + [1])
    sched.add(waiting)
    sched.schedule()
    assert waiting.status == Status.WAITING and waiting.pages == [] and waiting.num_computed == 0
    assert sched.allocator.num_cached == 3


def _generate(llm, prompts, max_tokens=12):
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [o.token_ids for o in outs]


def _equal_with_and_without(make, tokenizer):
    """Greedy tokens with the prefix cache equal those without, for a repeated prompt, a second turn
    that starts with the first turn's prompt and answer, and requests sharing a prefix at once."""
    from tests.conftest import long_text

    doc = tokenizer.encode(long_text(160, seed=11))  # ~200+ tokens
    q1, q2 = tokenizer.encode(" What is the first word?"), tokenizer.encode(" And the last one?")
    runs = {}
    for on in (False, True):
        llm = make(prefix_cache=on)
        turn1 = _generate(llm, [doc + q1])[0]
        again = _generate(llm, [doc + q1])[0]
        turn2 = _generate(llm, [doc + q1 + turn1 + q2])[0]
        together = _generate(llm, [doc + q2, doc[:100] + q1, doc + q1 + [13]])
        runs[on] = (turn1, again, turn2, together)
        engine = llm.engine
        assert engine.allocator.num_free == engine.allocator.num_pages  # nothing held after the requests
        if on:
            stats = engine.prefix_cache.stats
            assert stats.requests_hit >= 5 and stats.tokens_hit > 3 * len(doc)
    assert runs[True] == runs[False]


def test_smollm2_tokens_do_not_change(make_llm, smollm2):
    _equal_with_and_without(lambda **kw: make_llm(page_size=16, max_num_batched_tokens=64, **kw), smollm2.tokenizer)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-resident"])
def test_a_prefix_hit_that_leaves_one_token_runs_it_as_a_prefill(make_llm, smollm2, sparse):
    """A prompt whose full pages are all cached but for its last token has a one-token chunk left,
    which looks like a decode row; it must run as a prefill that records its shared pages in the
    slot's page table (and builds a sparse request's representations). Taking the slot of a request
    that held other pages, it read that request's stale table: an IndexError, or wrong tokens."""
    from hisa.sparse.config import SparseConfig
    from tests.conftest import long_text

    tok = smollm2.tokenizer
    prefix = tok.encode(long_text(400, seed=11))[:288]          # 18 pages of 16
    a = prefix + tok.encode(long_text(30, seed=3))[:20]
    b = prefix + tok.encode(long_text(30, seed=4))[:1]          # 289 tokens: one past the cached pages
    other = tok.encode(long_text(300, seed=5))[:200]
    kw = dict(page_size=16, max_model_len=512)
    if sparse:   # resident: selection reads the representations of the shared pages
        kw["sparse"] = SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, residency="device")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = make_llm(prefix_cache=False, **kw).generate([b], params, use_tqdm=False)[0].token_ids
    llm = make_llm(prefix_cache=True, **kw)
    # `other` finishes last: b takes its slot, whose page table holds other's pages
    llm.generate([a, other], [params, SamplingParams(max_tokens=16, ignore_eos=True)], use_tqdm=False)
    assert llm.generate([b], params, use_tqdm=False)[0].token_ids == want
    assert llm.engine.prefix_cache.stats.tokens_hit >= 288
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_pages


def test_host_backed_sparse_requests_share_prefix_pages_in_the_host_pool(make_llm, smollm2):
    """L2 prefix reuse: a host-backed sparse request registers its full host pages; later ones whose
    prompts share the prefix (one of them a token past it) take those host pages instead of
    prefilling them, build their representations from page 0, and produce the tokens of a run
    without the prefix cache. Ended requests' pages stay cached (counted free) in the host pool."""
    from hisa.sparse.config import SparseConfig
    from tests.conftest import long_text

    tok, c = smollm2.tokenizer, smollm2.config
    prefix = tok.encode(long_text(400, seed=11))[:288]          # 18 pages of 16
    prompts = [prefix + tok.encode(long_text(30, seed=20 + i))[:1 + 16 * i + 7 * (i > 0)] for i in range(3)]
    page_bytes = c.num_layers * 2 * 16 * c.num_kv_heads * c.head_dim * 4
    kw = dict(page_size=16, max_model_len=512, max_num_batched_tokens=128,
              sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, residency="host",
                                  host_pool_gb=72 * page_bytes / 2**30))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    plain = make_llm(prefix_cache=False, **kw)
    want = [plain.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    llm = make_llm(prefix_cache=True, **kw)
    got = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts * 2]
    assert got == want * 2
    stats = llm.engine.host_prefix_cache.stats
    # 18 shared pages for each of the 2 later prompts, then each prompt's own full pages again
    assert stats.requests_hit == 5 and stats.pages_hit == 2 * 18 + sum((len(p) - 1) // 16 for p in prompts)
    assert llm.engine.prefix_cache.stats.pages_hit == 0            # (no device pages: all host-backed)
    host = llm.engine.scheduler.sparse.host_allocator
    assert host.num_free == host.num_pages and host.num_cached > 0
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_pages


def test_gemma3_tokens_do_not_change(request):
    from hisa import LLM

    try:
        gemma = request.getfixturevalue("gemma3")  # the session's load (conftest)
    except Exception as e:  # noqa: BLE001 — the package or transformers version is missing here
        pytest.skip(f"Gemma-3-270M not loadable here: {e}")
    _equal_with_and_without(lambda **kw: LLM(loaded=gemma, device="cpu", dtype="float32", progress=False,
                                             page_size=16, max_num_batched_tokens=64, max_model_len=1024, **kw),
                            gemma.tokenizer)


def test_under_pressure_a_cached_prefix_loses_its_tail_before_its_head():
    sched, prefix = _scheduler(num_pages=8, max_tokens=64, max_num_seqs=1)
    first = _seq("a", list(range(21)), max_tokens=1)  # 5 full pages registered (20 tokens computed... + 1)
    sched.add(first)
    _run(sched)
    assert sched.allocator.num_cached == 5
    other = _seq("b", [7] * 13, max_tokens=1)  # needs 4 pages: 3 free + the oldest cached one
    sched.add(other)
    _run(sched)
    again = _seq("c", list(range(21)))
    sched.add(again)
    sched.schedule()
    assert again.num_computed == 4 * S  # pages 0-3 still there: only the last page was evicted
