"""Prefix reuse from L3 (dense and sparse requests, the embedded SmolLM2): a prompt whose full pages another
request stored in L3 loads them instead of prefilling them, and greedy outputs are identical with
and without L3, also when a page is corrupt or missing or the Redis server dies mid-run.

L3 calls run on the engine's I/O thread (the default): an engine sees its own writes, another engine
sees them once they have run, so a test that opens a second engine over the same store first
drains the first one's writes (`L3PrefixCache.drain`). A slow store delays only the request it is
looking up; a request aborted while loading leaves nothing behind; close() runs the queued writes."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from hisa import SamplingParams
from tests.conftest import long_text

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "kvcache", "l3"))
from l3_servers import REDIS_SERVER, MooncakeStoreServers, RedisServers, mooncake_url, require_mooncake  # noqa: E402
from slow_backend import SlowBackend  # noqa: E402

pytestmark = pytest.mark.slow   # three SmolLM2 engines and a reference run

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
# These engines turn the pool's prefix cache off (prefix_cache=False) so that the pages come from L3;
# test_pool_prefix_comes_before_l3 runs both.
S = 16


@pytest.fixture(scope="module")
def prompts(smollm2):
    """Three prompts sharing a 300-token prefix (18 full pages), then different tails."""
    tok = smollm2.tokenizer
    prefix = tok.encode(long_text(400, seed=11))[:300]
    return [prefix + tok.encode(long_text(30, seed=20 + i))[:40 + 7 * i] for i in range(3)]


@pytest.fixture(scope="module")
def reference(smollm2, prompts):
    from hisa import LLM

    llm = LLM(loaded=smollm2, device="cpu", dtype="float32", progress=False, max_num_batched_tokens=128)
    return [o.token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def _one_by_one(llm, prompts):
    return [llm.generate([p], PARAMS, use_tqdm=False)[0].token_ids for p in prompts]


def _check_no_leak(llm):
    assert llm.engine.kv_pages_free() == llm.engine.allocator.num_pages


def test_l3_prefix_gives_identical_output_and_skips_prefill(make_llm, prompts, reference, tmp_path):
    url = f"file:{tmp_path / 'l3'}"
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
    assert _one_by_one(llm, prompts) == reference
    m = llm.engine.l3_prefix.metrics()
    # the first prompt stored its pages; the next two loaded the shared prefix's 18 full pages each
    assert m["requests_hit"] == 2 and m["pages_loaded"] == 2 * (300 // S)
    assert m["store_corrupt"] == 0 and m["store_failures"] == 0
    _check_no_leak(llm)
    llm.engine.l3_prefix.drain()
    # a new engine (another process, or after a restart) over the same directory: all but the last page
    again = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
    assert _one_by_one(again, prompts) == reference
    m = again.engine.l3_prefix.metrics()
    assert m["pages_loaded"] == sum((len(p) - 1) // S for p in prompts)
    _check_no_leak(again)


@pytest.mark.parametrize("check_on_device", [False, True], ids=["checked-on-read", "checked-after-landing"])
def test_corrupt_and_deleted_pages_are_recomputed(make_llm, prompts, reference, tmp_path, check_on_device):
    """Also with the payloads' checksums left to the device (`check_on_device`; on a CPU machine the
    pages then stay in their rows and are checked on the host after the read, as pages that found no
    room on the device are)."""
    url = f"file:{tmp_path / 'l3'}"
    first = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
    assert _one_by_one(first, prompts[:1]) == reference[:1]
    first.engine.l3_prefix.drain()
    from hisa.kvcache.l3 import page_keys

    prefix = first.engine.l3_prefix
    keys = page_keys(prompts[0][:300], prefix.layout)
    backend = prefix.l3.backend
    with open(backend.path(keys[5]), "r+b") as f:    # flip one bit of page 5's KV on disk
        f.seek(4000)
        byte = f.read(1)[0]
        f.seek(4000)
        f.write(bytes([byte ^ 0x10]))
    os.unlink(backend.path(keys[9]))                  # and delete page 9 (fixed again by the prompt's store)
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
    llm.engine.l3_prefix.check_on_device = check_on_device
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]
    llm.engine.l3_prefix.drain()   # (a failed check found after the read is reported to the store on the I/O thread)
    m = llm.engine.l3_prefix.metrics()
    assert m["store_corrupt"] == 1 and m["pages_loaded"] == 5   # pages 0-4: the run ends at the corrupt page
    assert _one_by_one(llm, prompts[2:]) == reference[2:]     # page 5 was rewritten; 9 too
    assert llm.engine.l3_prefix.metrics()["pages_loaded"] == 5 + 300 // S
    _check_no_leak(llm)


def test_several_stores_read_store_by_store_with_a_corrupt_page(make_llm, prompts, reference, tmp_path, monkeypatch):
    """`per_store_batches`: pages spread over two stores that read a batch per call are read each
    store's next pages in turn (every store the same share of a batch), so a lookup's pages are read
    out of page order; the run still ends at a corrupt page (counted, deleted) and the output is the
    one computed without L3. (Two directories stand for the stores here.)"""
    import hisa.engine.l3_prefix as l3p
    from hisa.kvcache.l3 import page_keys
    from hisa.kvcache.l3.file_backend import FileBackend
    from hisa.kvcache.l3.sharded import ShardedBackend

    def two_stores(llm):
        shards = [FileBackend(str(tmp_path / f"store{i}")) for i in range(2)]
        for shard in shards:
            shard.get_into_batched = True   # (read a batch per call, as Mooncake's do)
        llm.engine.l3_prefix.l3.backend = ShardedBackend(shards)
        return llm

    first = two_stores(make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'unused'}"))
    assert _one_by_one(first, prompts[:1]) == reference[:1]
    first.engine.l3_prefix.drain()
    prefix = first.engine.l3_prefix
    keys = page_keys(prompts[0][:300], prefix.layout)
    backend = prefix.l3.backend
    victim = backend.shards[backend.shard_of(keys[11])]
    with open(victim.path(keys[11]), "r+b") as f:    # flip one bit of page 11's KV
        f.seek(4000)
        byte = f.read(1)[0]
        f.seek(4000)
        f.write(bytes([byte ^ 0x10]))
    llm = two_stores(make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'unused'}"))
    prefix = llm.engine.l3_prefix
    prefix.per_store_batches = True
    monkeypatch.setattr(l3p, "LAND_CHUNK_BYTES", 4 * prefix.page_bytes)   # rounds of 2 pages per store
    order = prefix._read_order(keys)
    assert sorted(order) == list(range(len(keys))) and order != sorted(order) and prefix._read_order([]) == []
    fewest = min(sum(backend.shard_of(k) == x for k in keys) for x in (0, 1))
    assert fewest >= 4
    for a in range(0, fewest // 2 * 4, 4):   # while both stores have pages: rounds of two of each
        assert sorted(backend.shard_of(keys[i]) for i in order[a:a + 4]) == [0, 0, 1, 1]
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]
    prefix.drain()
    m = prefix.metrics()
    assert m["store_corrupt"] == 1 and m["pages_loaded"] == 11   # pages 0-10: the run ends at the corrupt page
    assert _one_by_one(llm, prompts[2:]) == reference[2:]       # page 11 was rewritten
    assert prefix.metrics()["pages_loaded"] == 11 + 300 // S
    _check_no_leak(llm)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (scripts/setup.sh installs it)")
@pytest.mark.parametrize("servers", [1, 2])
def test_redis_shared_by_two_engines_and_killed_mid_run(make_llm, prompts, reference, tmp_path, servers):
    """Engine b loads the prefix engine a stored, from one Redis server or from two (pages spread by
    key: redis://A,B); one server killed, b recomputes. Tokens as without L3; nothing leaks."""
    running = RedisServers(tmp_path, servers).start()
    try:
        url = running.url
        a = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
        b = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
        assert _one_by_one(a, prompts[:1]) == reference[:1]
        a.engine.l3_prefix.drain()
        assert _one_by_one(b, prompts[1:2]) == reference[1:2]          # b reuses a's prefix
        assert b.engine.l3_prefix.metrics()["pages_loaded"] == 300 // S
        running.servers[-1].kill()
        assert _one_by_one(b, prompts[2:]) == reference[2:]             # no L3 now: recomputed
        m = b.engine.l3_prefix.metrics()
        assert m["store_failures"] == 1 and m["pages_loaded"] == 300 // S
        _check_no_leak(a)
        _check_no_leak(b)
    finally:
        running.stop()


@pytest.mark.parametrize("via", ["tcp", "shm", "shm x2"])
def test_mooncake_store_serves_a_prefix(make_llm, prompts, reference, tmp_path, via):
    """From a Mooncake Store over TCP, or through the store process's shared memory (hisa its dummy
    client, the load rows in the shared pool: the pages are read into them with no copy), or from two
    stores through their shared memory (the rows cut into an area in each store's pool, each page
    read into its own store's: still no copy)."""
    require_mooncake()
    stores = [MooncakeStoreServers(tmp_path / str(i)) for i in range(2 if via == "shm x2" else 1)]
    try:
        for servers in stores:
            servers.start()
        url = mooncake_url(stores, shm=via != "tcp")
        llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
        assert _one_by_one(llm, prompts[:2]) == reference[:2]
        prefix = llm.engine.l3_prefix
        assert prefix.rows.backend_memory == (via != "tcp") and prefix.rows.areas == len(stores)
        m = prefix.metrics()
        assert m["pages_loaded"] == 300 // S and m["store_corrupt"] == 0 and m["store_failures"] == 0
        if via != "tcp":   # only the records' heads (under 200 bytes each) went through a scratch area
            backend = prefix.l3.backend
            staged = sum(x.staged_bytes for x in getattr(backend, "shards", [backend]))
            assert 0 < staged < 200 * m["pages_loaded"]
        _check_no_leak(llm)
        llm.close()
    finally:
        for servers in stores:
            servers.stop()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (the rows registered with it)")
def test_on_cuda_mooncake_shared_pool_rows_serve_engine_after_engine(tmp_path):
    """CUDA: engines opened one after another on one Mooncake store process through its shared pool:
    each one's load rows live in the pool (registered with CUDA; the second engine's are the areas the
    first one's close left, `_SPARE_AREAS`), and each serves the prefix with the tokens computed
    without L3, nothing left behind."""
    from hisa import LLM

    require_mooncake()
    servers = MooncakeStoreServers(tmp_path).start()
    try:
        kw = dict(device="cuda", dtype="float32", max_model_len=1024, page_size=S, prefix_cache=False,
                  progress=False, max_num_batched_tokens=128)
        prompt = list(range(3, 400))
        want = LLM("random:tiny-llama", **kw).generate([prompt], PARAMS, use_tqdm=False)[0].token_ids
        rows_at = []
        for i in range(3):
            llm = LLM("random:tiny-llama", l3=servers.shm_url, **kw)
            assert llm.generate([prompt], PARAMS, use_tqdm=False)[0].token_ids == want
            prefix = llm.engine.l3_prefix
            assert prefix.rows.backend_memory
            rows_at.append(prefix.rows._data[0].data_ptr())
            if i:
                assert prefix.metrics()["pages_loaded"] == (len(prompt) - 1) // S
            prefix.drain()
            _check_no_leak(llm)
            llm.close()
        assert rows_at[1] == rows_at[2] == rows_at[0]   # one area, lent to each engine in turn
    finally:
        servers.stop()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (the rows registered with it)")
def test_on_cuda_two_mooncake_stores_rows_in_each_pool_and_a_corrupt_page_caught_on_the_device(tmp_path):
    """CUDA: a prefix spread over two Mooncake stores, read through their shared memory into load rows
    cut into an area in each store's pool (registered with CUDA; no page staged through a scratch
    area), landed in runs that alternate between the areas and checked on the device: a bit flipped
    in one stored page ends the run there (counted, deleted), and the output is the one computed
    without L3."""
    from hisa import LLM
    from hisa.kvcache.l3 import page_keys

    require_mooncake()
    stores = [MooncakeStoreServers(tmp_path / str(i)) for i in range(2)]
    try:
        for servers in stores:
            servers.start()
        url = mooncake_url(stores, shm=True)
        kw = dict(device="cuda", dtype="float32", max_model_len=1024, page_size=S, prefix_cache=False,
                  progress=False, max_num_batched_tokens=128)
        prompt = list(range(3, 400))
        want = LLM("random:tiny-llama", **kw).generate([prompt], PARAMS, use_tqdm=False)[0].token_ids
        first = LLM("random:tiny-llama", l3=url, **kw)
        assert first.generate([prompt], PARAMS, use_tqdm=False)[0].token_ids == want
        first.engine.l3_prefix.drain()
        backend = first.engine.l3_prefix.l3.backend
        key = page_keys(prompt[:(len(prompt) - 1) // S * S], first.engine.l3_prefix.layout)[7]
        shard = backend.shards[backend.shard_of(key)]
        value = bytearray(shard.get([key])[0])
        value[-500] ^= 0x04   # a payload bit of page 7
        shard.set([key], [bytes(value)])
        first.close()
        llm = LLM("random:tiny-llama", l3=url, **kw)
        prefix = llm.engine.l3_prefix
        prefix.check_on_device = True
        assert prefix.rows.areas == 2 and prefix.rows.backend_memory and prefix.land_on_device
        assert llm.generate([prompt], PARAMS, use_tqdm=False)[0].token_ids == want
        prefix.drain()
        m = prefix.metrics()
        assert m["store_corrupt"] == 1 and m["pages_loaded"] == 7
        assert prefix.timing["landed_bytes"] > 0
        staged = sum(x.staged_bytes for x in prefix.l3.backend.shards)
        assert 0 < staged < 200 * 24   # the records' heads only
        _check_no_leak(llm)
        llm.close()
    finally:
        for servers in stores:
            servers.stop()


def _run_counting_prefill(llm, prompts, params):
    """Outputs in prompt order, and the prefill tokens the engine ran (prompts and recomputations)."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    done, prefill = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = list(o.token_ids)
        prefill += engine.last_step_prefill_tokens
    return [done[i] for i in ids], prefill


# four prompts of ~300 tokens fit the 88 pages together (76); growing by 80 tokens each they do not.
# The pool's own prefix cache is off: the resumed requests' pages must come from L3, not from pages
# the pool still held (tests/engine/test_prefix_cache.py covers that path).
PARK_POOL = dict(num_kv_pages=88, page_size=S, max_model_len=512, max_num_batched_tokens=512, prefix_cache=False)
PARK_PARAMS = SamplingParams(max_tokens=80, ignore_eos=True)


@pytest.fixture(scope="module")
def park_run(smollm2):
    """The preemption test's prompts, and their outputs and prefill tokens without L3."""
    from hisa import LLM

    prompts = [smollm2.tokenizer.encode(long_text(300, seed=40 + i))[:290 + 5 * i] for i in range(4)]
    plain = LLM(loaded=smollm2, device="cpu", dtype="float32", progress=False, **PARK_POOL)
    want, prefill = _run_counting_prefill(plain, prompts, PARK_PARAMS)
    assert plain.engine.scheduler.num_preemptions > 0, "the test did not exercise preemption"
    return prompts, want, prefill


@pytest.mark.parametrize("l3_async", [False, True], ids=["sync", "async"])
def test_preempted_requests_park_in_l3_and_resume_from_it(make_llm, park_run, tmp_path, l3_async):
    """A pool smaller than the batch preempts requests mid-generation. With L3 each victim first writes
    its full pages (prompt and generated tokens) there, and on resumption loads them instead of
    recomputing its context: same greedy outputs, fewer prefill tokens, nothing leaked.

    Synchronous, a victim's lookup lands in the step after its preemption; asynchronous, a step or two
    later, by thread timing (and the fresh requests' lookups land at different steps, so the batches
    differ): the pages the running requests took meanwhile are prefilled instead of loaded. So the
    synchronous run checks how much parking saves (under half the recompute; 119 vs 353 tokens here)
    and the asynchronous one only that it saves some (215 here), a bound thread timing cannot break."""
    prompts, want, prefill_plain = park_run
    parked = make_llm(**PARK_POOL, l3=f"file:{tmp_path / 'l3'}", l3_async=l3_async)
    got, prefill_parked = _run_counting_prefill(parked, prompts, PARK_PARAMS)
    assert got == want
    m = parked.engine.l3_prefix.metrics()
    assert parked.engine.scheduler.num_preemptions > 0
    assert m["requests_parked"] > 0 and m["pages_parked"] > 0
    # tokens run again after preemptions (prefill tokens past the prompts): a resumed request loads
    # its parked pages and recomputes little more than its last partial page
    redone_plain, redone_parked = (n - sum(map(len, prompts)) for n in (prefill_plain, prefill_parked))
    bound = 1.0 if l3_async else 0.5
    assert m["tokens_loaded"] > 0 and 0 <= redone_parked < redone_plain * bound, (redone_parked, redone_plain)
    assert m["store_corrupt"] == 0 and m["store_failures"] == 0
    _check_no_leak(parked)
    parked.engine.l3_prefix.drain()
    # a resumed request's pages past its prompt came from its parking (prompts are stored only
    # up to their last full prompt page): L3 holds pages keyed by generated tokens
    from hisa.kvcache.l3 import page_keys

    layout = parked.engine.l3_prefix.layout
    full = [(len(p) + len(o) - 1) // S for p, o in zip(prompts, got)]
    with_outputs = [page_keys(p + o[:f * S - len(p)], layout)[len(p) // S:f]
                    for p, o, f in zip(prompts, got, full) if f * S > len(p)]
    assert any(any(parked.engine.l3_prefix.l3.exists(keys)) for keys in with_outputs if keys)


# -- host-backed sparse requests: L3 <-> the host pool ------------------------------------------------
def _host_sparse(smollm2, host_pages: int):
    """Quest, every sparse request host-backed, a host pool of `host_pages` pages of 16 tokens."""
    from hisa.sparse.config import SparseConfig

    c = smollm2.config
    page_bytes = c.num_layers * 2 * S * c.num_kv_heads * c.head_dim * 4   # fp32
    return dict(page_size=S, max_model_len=512, prefix_cache=False,
                sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, residency="host",
                                    host_pool_gb=host_pages * page_bytes / 2**30))


def _check_no_host_leak(llm):
    """Nothing held in either pool once the writes have ended (a write in flight holds the host pages
    it reads until then)."""
    llm.engine.l3_prefix.drain()
    _check_no_leak(llm)
    host = llm.engine.scheduler.sparse.host_allocator
    assert host.num_free == host.num_pages


def test_host_backed_sparse_requests_load_l3_pages_into_the_host_pool(make_llm, smollm2, tmp_path):
    """A host-backed sparse request whose prompt's pages L3 holds reads them into new host pool pages
    (not the device), its first chunk builds their representations, and it decodes sparsely with the
    tokens of a run without L3; it writes its own pages from the host pool (the I/O thread reads them
    there, the pages held until it has). The first prompt is one token past its full pages (its
    chunk is that token alone: a prefill, not a decode row)."""
    tok = smollm2.tokenizer
    prefix = tok.encode(long_text(400, seed=11))[:288]   # 18 pages
    prompts = [prefix + tok.encode(long_text(30, seed=20 + i))[:1 + 16 * i + 7 * (i > 0)] for i in range(3)]
    kw = _host_sparse(smollm2, host_pages=72)
    want = _one_by_one(make_llm(max_num_batched_tokens=128, **kw), prompts)
    url = f"file:{tmp_path / 'l3'}"
    llm = make_llm(max_num_batched_tokens=128, l3=url, **kw)
    assert _one_by_one(llm, prompts) == want
    m = llm.engine.l3_prefix.metrics()
    assert m["requests_hit"] == 2 and m["pages_loaded"] == 2 * 18 and m["pages_stored"] > 0
    _check_no_host_leak(llm)   # (drains: the second engine sees every write)
    again = make_llm(max_num_batched_tokens=128, l3=url, **kw)
    assert _one_by_one(again, prompts) == want
    assert again.engine.l3_prefix.metrics()["pages_loaded"] == sum((len(p) - 1) // S for p in prompts)
    assert again.engine.l3_prefix.metrics()["store_corrupt"] == 0
    _check_no_host_leak(again)


def test_a_host_backed_write_holds_its_host_pages_until_it_has_read_them(make_llm, smollm2, tmp_path):
    """The I/O thread reads a host-backed request's pages from the host pool after the request may have
    ended: they stay allocated (held) until the write has read them, so no other request reuses them
    meanwhile, and are free once it has; what it wrote loads back with the same tokens."""
    tok = smollm2.tokenizer
    prompt = tok.encode(long_text(400, seed=11))[:300]
    kw = _host_sparse(smollm2, host_pages=72)
    want = _one_by_one(make_llm(max_num_batched_tokens=128, **kw), [prompt])
    url = f"file:{tmp_path / 'l3'}"
    llm = make_llm(max_num_batched_tokens=128, l3=url, **kw)
    prefix = llm.engine.l3_prefix
    slow = prefix.l3.backend = SlowBackend(prefix.l3.backend, delay_s=0.5)
    host = llm.engine.scheduler.sparse.host_allocator
    assert _one_by_one(llm, [prompt]) == want   # ended; its prompt's and its answer's writes are queued
    assert host.num_free < host.num_pages       # the pages they read are still held
    prefix.drain()
    # its prompt's 18 full pages, then its answer's: 300 + 8 tokens, all but the last computed
    assert host.num_free == host.num_pages and prefix.metrics()["pages_stored"] == (len(prompt) + 8 - 1) // S
    assert "hisa-l3-io_0" in {t.name for t in slow.threads}
    again = make_llm(max_num_batched_tokens=128, l3=url, **kw)
    assert _one_by_one(again, [prompt]) == want
    assert again.engine.l3_prefix.metrics()["pages_loaded"] == (len(prompt) - 1) // S
    _check_no_host_leak(again)


def test_preempted_host_backed_requests_park_in_l3_and_resume_from_it(make_llm, smollm2, tmp_path):
    """A host pool too small for the batch preempts host-backed requests mid-generation: each parks its
    full pages (read from the host pool) in L3, and resumes by loading them back into the host pool,
    with the tokens of a run without L3 (which recomputes its context)."""
    prompts = [smollm2.tokenizer.encode(long_text(300, seed=40 + i))[:290 + 5 * i] for i in range(4)]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    want, want_prefill = _run_counting_prefill(make_llm(max_num_batched_tokens=512, **_host_sparse(smollm2, 60)),
                                               prompts, params)
    parked = make_llm(max_num_batched_tokens=512, l3=f"file:{tmp_path / 'l3'}", l3_async=False,
                      **_host_sparse(smollm2, 60))
    got, prefill = _run_counting_prefill(parked, prompts, params)
    assert got == want
    m = parked.engine.l3_prefix.metrics()
    assert parked.engine.scheduler.num_preemptions > 0 and m["requests_parked"] > 0, m
    assert m["tokens_loaded"] > 0 and prefill < want_prefill   # resumed from L3, not recomputed
    _check_no_host_leak(parked)


def test_pool_prefix_comes_before_l3(make_llm, prompts, reference, tmp_path):
    """With both on, a prompt whose prefix the pool still holds shares those pages instead of copying
    them from L3; L3 serves a new engine (an empty pool); outputs are the same either way."""
    url = f"file:{tmp_path / 'l3'}"
    llm = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(llm, prompts) == reference
    pool, l3 = llm.engine.prefix_cache.stats, llm.engine.l3_prefix.metrics()
    assert pool.requests_hit == 2 and pool.pages_hit == 2 * (300 // S) and l3["requests_hit"] == 0
    _check_no_leak(llm)
    llm.engine.l3_prefix.drain()
    again = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(again, prompts[:1]) == reference[:1]
    assert again.engine.l3_prefix.metrics()["requests_hit"] == 1


def test_a_prefix_shared_from_the_pool_is_written_to_l3_if_l3_lost_it(make_llm, prompts, reference, tmp_path):
    """L3 loses a prefix the pool still holds (here its files are deleted, as a size bound or a dropped
    write would): the next request that shares those pages from the pool writes them to L3 again,
    so another engine finds them."""
    import shutil

    url = f"file:{tmp_path / 'l3'}"
    llm = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(llm, prompts[:1]) == reference[:1]
    llm.engine.l3_prefix.drain()
    shutil.rmtree(tmp_path / "l3")
    (tmp_path / "l3").mkdir()
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]
    assert llm.engine.prefix_cache.stats.pages_hit == 300 // S   # it shared them from the pool
    llm.engine.l3_prefix.drain()
    again = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(again, prompts[2:]) == reference[2:]
    assert again.engine.l3_prefix.metrics()["pages_loaded"] == 300 // S


def test_a_second_turn_loads_the_first_turns_answer_from_l3(make_llm, prompts, tmp_path):
    """A finished request writes its answer's full pages too: the next turn (prompt + answer + a new
    question) served by another engine loads them from L3, and its tokens equal a run without L3."""
    url = f"file:{tmp_path / 'l3'}"
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    first = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
    answer = first.generate([prompts[0]], params, use_tqdm=False)[0].token_ids
    first.engine.l3_prefix.drain()
    turn2 = prompts[0] + answer + prompts[1][-20:]
    want = make_llm(max_num_batched_tokens=128, prefix_cache=False).generate([turn2], PARAMS, use_tqdm=False)
    second = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=url)
    assert second.generate([turn2], PARAMS, use_tqdm=False)[0].token_ids == want[0].token_ids
    m = second.engine.l3_prefix.metrics()
    # every full page of turn 1's prompt + answer that turn 1 computed (its last token's KV never was)
    assert m["tokens_loaded"] == (len(prompts[0]) + len(answer) - 1) // S * S > len(prompts[0]) // S * S
    _check_no_leak(second)


def test_l3_continues_a_prefix_whose_tail_the_pool_evicted(make_llm, prompts, reference, smollm2, tmp_path):
    """A small pool forgets the last pages of a finished prompt (they go first) while another request
    runs; the same prompt again shares the pages the pool kept and loads the rest from L3."""
    llm = make_llm(max_num_batched_tokens=128, l3=f"file:{tmp_path / 'l3'}", num_kv_pages=30, max_model_len=400)
    assert _one_by_one(llm, prompts[:1]) == reference[:1]  # 21 full pages, cached in the pool and in L3
    other = smollm2.tokenizer.encode(long_text(300, seed=99))[:200]  # 13 pages: evicts 4 of the 21
    llm.generate([other], PARAMS, use_tqdm=False)
    assert _one_by_one(llm, prompts[:1]) == reference[:1]
    pool, l3 = llm.engine.prefix_cache.stats, llm.engine.l3_prefix.metrics()
    full = (len(prompts[0]) - 1) // S
    assert 0 < pool.pages_hit < full and l3["pages_loaded"] > 0
    assert pool.pages_hit + l3["pages_loaded"] == full  # the pool's leading pages, then L3's
    _check_no_leak(llm)


# -- asynchronous L3: the I/O thread -------------------------------------------------------------
def test_a_slow_store_never_blocks_the_running_requests(make_llm, prompts, reference, tmp_path):
    """L3 calls that take 1 s each (a slow disk, a far server) delay only the request being looked
    up: while its lookup is in flight, a running request keeps decoding, no step waits for the
    store, and both outputs are those of runs without L3."""
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]   # L3 now holds the shared 300-token prefix
    prefix.drain()
    # 1 s per call: the lookup (exists, then a read) spans several steps even on a loaded 2-core machine
    slow = prefix.l3.backend = SlowBackend(prefix.l3.backend, delay_s=1.0)
    prefix.cut_slow_loads = False   # (prefilling 300 tokens is faster than this read: it would be cut short)
    short = prompts[2][-12:]   # no full page: never looked up
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    want_short = make_llm(prefix_cache=False).generate([short], params, use_tqdm=False)[0].token_ids
    other = engine.add_request(short, params)
    engine.step()   # `other` is prefilled and decodes from now on
    looked_up = engine.add_request(prompts[1], PARAMS)
    done, step_s, tokens_while_loading = {}, [], 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        if prefix.loading:   # this step ran while the lookup (exists, then a read: >= 2 s) was in flight
            step_s.append(time.perf_counter() - t0)
            tokens_while_loading += sum(o.request_id == other for o in outs)
        done.update({o.request_id: o.token_ids for o in outs if o.finished})
    assert tokens_while_loading >= 5 and max(step_s) < slow.delay_s, (tokens_while_loading, step_s)
    assert done[looked_up] == reference[1] and done[other] == want_short
    assert prefix.metrics()["pages_loaded"] == 300 // S
    assert {t.name for t in slow.threads} == {"hisa-l3-io_0"}   # never the engine thread
    _check_no_leak(llm)
    llm.close()


def test_a_read_slower_than_prefilling_is_cut_short(make_llm, prompts, reference, tmp_path):
    """A store whose reads are so slow that prefilling a prompt's pages is faster (4 s per read,
    against ~1 s to prefill 288 tokens here): the first read, in one batch with nothing to tell, is
    waited for; the next request's is not: at the store's rate its read would take longer than
    prefilling its pages, so the I/O thread cuts it before its first batch and the request prefills.
    The tokens are those of runs without L3, the cut is counted, and every host row comes back once
    the read it was taken for has ended."""
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    prefix = llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]   # L3 holds the shared prefix; prefill is timed
    prefix.drain()
    rate = prefix.prefill_tokens_per_s
    assert rate is not None and rate > 0
    slow = prefix.l3.backend = SlowBackend(prefix.l3.backend, delay_s=4.0, slow=("get",))
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]   # the first slow read: waited for
    m = prefix.metrics()
    assert m["pages_loaded"] == 300 // S and m["loads_cut_short"] == 0, str(m)
    t0 = time.perf_counter()
    assert _one_by_one(llm, prompts[2:3]) == reference[2:3]
    took = time.perf_counter() - t0
    m = prefix.metrics()
    assert m["loads_cut_short"] == 1 and m["pages_loaded"] == 300 // S, str(m)   # nothing more was loaded
    # the rates it was decided on: 18 pages in >= 4 s against the prefill's hundreds of tokens/s
    assert m["read_bytes_per_s"] * slow.delay_s <= 300 // S * prefix.page_bytes and m["prefill_tokens_per_s"] > 0
    assert took < slow.delay_s, (took, rate)   # waiting for the read takes longer than the whole request
    prefix.drain()
    assert prefix.rows.in_use == 0   # the cut read ended, its rows are back
    _check_no_leak(llm)


class _ScriptedReads(SlowBackend):
    """Reads that look slow, then come in when the test says: the first `get` sleeps `first_s`, the
    second waits for `front`, those numbered in `free_calls` return at once, every other later one
    waits for `gate`."""

    def __init__(self, inner, *, first_s: float, free_calls: tuple[int, ...] = (3,)):
        super().__init__(inner, delay_s=0.0, slow=())
        self.first_s, self.calls, self.free_calls = first_s, 0, free_calls
        self.front, self.gate = threading.Event(), threading.Event()

    def get(self, keys):
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.first_s)
        elif self.calls == 2:
            assert self.front.wait(60)
        elif self.calls not in self.free_calls:
            assert self.gate.wait(60)
        return self.inner.get(keys)


def test_a_cut_read_is_read_from_the_back_while_the_front_prefills(make_llm, prompts, reference, tmp_path,
                                                                  monkeypatch):
    """A read cut short (the store is slower than prefilling) goes on from the prompt's last page back
    while the request prefills from the front; the prefill stops where the read has got to and takes
    the pages from there on. Here the store was slow before, so the I/O thread cuts the read before
    its first batch; the back read's first batch (the last 4 of the 18 pages) comes in during the
    first prefill chunk and the next never does: the prefill stops at page 14, takes pages 14-17
    from L3, and computes only the prompt's tail after them. The tokens are those of runs without
    L3; nothing leaks, and every host row comes back once the read has ended."""
    import hisa.engine.l3_prefix as l3_prefix

    monkeypatch.setattr(l3_prefix, "BACK_BATCH_PAGES", 4)
    monkeypatch.setattr(l3_prefix, "BACK_SPLIT_MIN_PAGES", 1000)   # stop at the read's edge (no meeting point guessed)
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]   # L3 holds the shared prefix; prefill is timed
    prefix.drain()
    store = prefix.l3.backend = _ScriptedReads(prefix.l3.backend, first_s=4.0, free_calls=())
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]   # the first slow read: waited for
    chunks = []
    engine.scheduler.complete_step = _recording(engine.scheduler.complete_step, chunks)
    rid = engine.add_request(prompts[2], PARAMS)
    outs = {}
    while prefix.metrics()["loads_cut_short"] == 0:   # its read is cut before a page is read
        outs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert chunks == [128]   # the step that cut it prefilled its first chunk
    store.front.set()        # the back read (the 2nd get) gets pages 14-17; its next batch waits for `gate`
    deadline = time.monotonic() + 30
    while prefix._back[rid].low != 14:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert outs[rid] == reference[2]
    m = prefix.metrics()
    assert m["loads_cut_short"] == 1 and m["loads_split"] == 1 and m["pages_met"] == 4, str(m)
    assert m["pages_loaded"] == 300 // S + 4, str(m)
    # the prefill ran pages 0-13 (stopped at the read's edge: 128 + 96 tokens), then the tail after page 17
    assert [n for n in chunks if n > 1] == [128, 96, len(prompts[2]) - 18 * S], chunks
    store.gate.set()
    prefix.drain()
    assert prefix.rows.in_use == 0
    _check_no_leak(llm)
    llm.close()


def _cut_read(engine, prefix, prompt, monkeypatch, *, stall: bool = False):
    """Serve `prompt` (its first 5+ pages in L3) with its read cut after its first batch (4 pages),
    then the rest read from the last page back in batches of 4 that come at once, all of them in
    before the prefill reaches them. The cut: by the I/O thread before the next batch (made sure
    whatever the rates: `split_margin` 0), or with `stall` by the engine while the next batch stalls
    (its rest looks slower than prefilling once it has stalled ~0.5 s: 14 pages, 4 of them in and
    4 stalled, against ~250 tokens/s of prefill here), the back read waiting behind that batch until the test
    lets it end. Returns (its tokens, the prefill chunks run)."""
    import hisa.engine.l3_prefix as l3_prefix

    monkeypatch.setattr(l3_prefix, "BACK_BATCH_PAGES", 4)
    monkeypatch.setattr(l3_prefix, "LAND_CHUNK_BYTES", 4 * prefix.page_bytes)   # batches of 4 pages
    if not stall:
        prefix.split_margin = 0.0
    prefix.l3.readers.workers = 1
    store = prefix.l3.backend = _ScriptedReads(prefix.l3.backend, first_s=0.0)   # its 2nd batch waits for `front`
    chunks = []
    engine.scheduler.complete_step = _recording(engine.scheduler.complete_step, chunks)
    rid = engine.add_request(prompt, PARAMS)
    outs = {}
    deadline = time.monotonic() + 60
    while prefix.metrics()["loads_cut_short"] == 0:
        assert time.monotonic() < deadline and not outs
        outs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert prefix._back[rid].first == 4
    if stall:   # the back read waits behind the stalled batch on the I/O thread
        time.sleep(0.2)
        assert prefix._back[rid].since == 0 and store.calls == 2
    store.front.set()   # the stalled batch or the back read's first ends; the back read's others come at once
    store.gate.set()
    prefix._back[rid].future.result(timeout=60)
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return outs[rid], [n for n in chunks if n > 1]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (the pages land on the device)")
def test_on_cuda_a_back_reads_pages_land_on_the_device_before_the_meeting(tmp_path, monkeypatch):
    """CUDA: the pages a back read has read are copied on to the device at each step while the read
    and the prefill go on (`_land_back`), so where they meet only device-to-device copies are left;
    the output is the one computed without L3, nothing leaks, every host row comes back."""
    import torch

    from hisa import LLM

    url = f"file:{tmp_path / 'l3'}"
    kw = dict(device="cuda", dtype="float32", max_model_len=1024, page_size=S, prefix_cache=False, progress=False,
              max_num_batched_tokens=128)
    prompt = list(range(3, 400))   # 24 full pages
    want = LLM("random:tiny-llama", **kw).generate([prompt], PARAMS, use_tqdm=False)[0].token_ids
    llm = LLM("random:tiny-llama", l3=url, **kw)
    assert llm.generate([prompt[:-9] + [7] * 9], PARAMS, use_tqdm=False)[0].token_ids   # stores the 24 pages
    engine, prefix = llm.engine, llm.engine.l3_prefix
    prefix.drain()
    tokens, chunks = _cut_read(engine, prefix, prompt, monkeypatch)
    assert tokens == want
    m = prefix.metrics()
    assert m["loads_split"] == 1 and m["pages_met"] >= 1 and m["pages_loaded"] == 4 + m["pages_met"], str(m)
    assert prefix.timing["back_landed_bytes"] >= m["pages_met"] * prefix.page_bytes   # all landed before the meeting
    assert sum(chunks) == len(prompt) - m["pages_loaded"] * S, (chunks, m)   # nothing computed twice
    prefix.drain()
    torch.cuda.synchronize()
    assert prefix.rows.take(prefix.rows.capacity) is not None   # every row free once its copy has run
    _check_no_leak(llm)


def test_a_batch_that_stalls_is_cut_by_the_engine(make_llm, prompts, reference, tmp_path, monkeypatch):
    """A read whose rate looked fast after its first batch, and whose next batch then stalls, is cut
    by the engine (the I/O thread is stuck in that batch): the 4 pages read are used, the request
    prefills from page 4, and the rest is read from the back once the stalled batch has ended (its
    pages thrown away). The tokens are those of runs without L3; nothing leaks."""
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]   # L3 holds the shared prefix; prefill is timed
    prefix.drain()
    tokens, chunks = _cut_read(engine, prefix, prompts[1], monkeypatch, stall=True)
    assert tokens == reference[1]
    m = prefix.metrics()
    assert m["loads_cut_short"] == 1 and m["loads_split"] == 1 and m["pages_loaded"] == 4 + m["pages_met"], str(m)
    assert sum(chunks) == len(prompts[1]) - m["pages_loaded"] * S, (chunks, m)   # nothing computed twice
    prefix.drain()
    assert prefix.rows.in_use == 0
    _check_no_leak(llm)
    llm.close()


def test_a_cut_read_ended_early_by_its_checksums_is_prefilled_on_from_there(make_llm, prompts, reference, tmp_path,
                                                                          monkeypatch):
    """With the payloads' checksums left to the device (`check_on_device`; on a CPU machine checked on
    the host once the lookup is back), a cut read's run can end before the pages read so far: here
    page 2 of the 4 read fails. The request prefills on from page 2 and no back read starts (the rows
    it would read into are those of pages 4 on, not 2 on). The tokens are those of runs without L3;
    the fault is counted; nothing leaks."""
    import hisa.engine.l3_prefix as l3_prefix
    from hisa.kvcache.l3 import page_keys

    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]   # L3 holds the shared prefix; prefill is timed
    prefix.drain()
    with open(prefix.l3.backend.path(page_keys(prompts[0][:300], prefix.layout)[2]), "r+b") as f:
        f.seek(4000)   # one bit of page 2's KV
        byte = f.read(1)[0]
        f.seek(4000)
        f.write(bytes([byte ^ 0x10]))
    prefix.check_on_device = True
    monkeypatch.setattr(l3_prefix, "LAND_CHUNK_BYTES", 4 * prefix.page_bytes)   # batches of 4 pages
    prefix.split_margin = 0.0   # cut once a batch is in
    prefix.l3.readers.workers = 1
    store = prefix.l3.backend = _ScriptedReads(prefix.l3.backend, first_s=0.0)   # its 2nd batch waits for `front`
    rid = engine.add_request(prompts[1], PARAMS)
    outs = {}
    deadline = time.monotonic() + 60
    while prefix.metrics()["loads_cut_short"] == 0:
        assert time.monotonic() < deadline and not outs
        outs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert rid not in prefix._back
    store.front.set()
    store.gate.set()
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert outs[rid] == reference[1]
    prefix.drain()
    m = prefix.metrics()
    assert m["store_corrupt"] == 1 and m["pages_loaded"] == 2 and m["loads_split"] == 0, str(m)
    assert prefix.rows.in_use == 0
    _check_no_leak(llm)
    llm.close()


def test_a_lookup_not_back_in_time_keeps_the_pages_it_has_read(make_llm, prompts, reference, tmp_path, monkeypatch):
    """A read that outlasts load_timeout_s (a long prompt's read can, and still beat prefilling) is
    not thrown away: its first batch (4 pages) is in, the next never comes; once the lookup times out
    the 4 pages are used and the rest is prefilled (its back read waits behind the stuck batch on the
    I/O thread). The tokens are those of runs without L3; nothing leaks."""
    import hisa.engine.l3_prefix as l3_prefix

    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    prefix = llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]   # L3 holds the shared prefix
    prefix.drain()
    monkeypatch.setattr(l3_prefix, "LAND_CHUNK_BYTES", 4 * prefix.page_bytes)   # batches of 4 pages
    prefix.l3.readers.workers = 1
    prefix.cut_slow_loads = False   # (only the timeout ends the wait)
    prefix.load_timeout_s = 1.0
    store = prefix.l3.backend = _ScriptedReads(prefix.l3.backend, first_s=0.0)   # its 2nd batch waits for `front`
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]
    m = prefix.metrics()
    assert m["loads_timed_out"] == 1 and m["pages_loaded"] == 4 and m["pages_met"] == 0, str(m)
    store.front.set()
    store.gate.set()
    prefix.drain()
    assert prefix.rows.in_use == 0
    _check_no_leak(llm)
    llm.close()


def test_landed_pages_are_checked_on_the_device_by_default_only_in_lent_rows():
    """CHECK_ON_DEVICE "auto": on the device when every area of the load rows is a store process's
    shared memory (Mooncake's; `LoadRows.all_lent`, where the rows really are), else on the reader
    threads; "device" / "host" say where always."""
    from hisa.engine.l3_prefix import checks_on_device
    assert checks_on_device("auto", all_lent=True) and not checks_on_device("auto", all_lent=False)
    assert checks_on_device("device", all_lent=False) and not checks_on_device("host", all_lent=True)
    assert checks_on_device(True, all_lent=False) and not checks_on_device(False, all_lent=True)   # the old values
    with pytest.raises(ValueError, match="CHECK_ON_DEVICE"):
        checks_on_device("gpu", all_lent=False)


def test_the_prefill_stops_where_it_should_meet_the_back_read():
    from hisa.engine.l3_prefix import BACK_SPLIT_MIN_PAGES, meeting_stop

    assert meeting_stop(0, 64, 16, 300.0, 100.0) == 48 * 16          # 3/4 of the gap at 3x the read's rate
    assert meeting_stop(0, 64, 16, 100.0, 300.0) == 16 * 16          # 1/4 of it
    assert meeting_stop(100, 64, 16, 1e9, 1.0) == 64 * 16            # never past the read's edge
    assert meeting_stop(100, 64, 16, 1.0, 1e9) == 7 * 16             # at least to the next page boundary
    assert meeting_stop(0, 64, 16, None, 100.0) == 64 * 16           # a rate unknown: to the read's edge
    # no page of the read in yet (its rate a guess): at most a third of the gap, rounded up to a page
    assert meeting_stop(0, 64, 16, 300.0, 100.0, read_started=False) == 22 * 16
    assert meeting_stop(0, 64, 16, 100.0, 300.0, read_started=False) == 16 * 16   # (under a third: as before)
    assert meeting_stop(0, 64, 16, None, 100.0, read_started=False) == 64 * 16
    small = BACK_SPLIT_MIN_PAGES
    assert meeting_stop(160, 10 + small, 16, 300.0, 300.0) == (10 + small) * 16   # a small gap: closed whole
    for c in range(0, 64 * 16, 37):                                  # page-aligned, past c, within the edge
        stop = meeting_stop(c, 64, 16, 250.0, 170.0)
        assert stop % 16 == 0 and c < stop <= 64 * 16


def _recording(complete_step, chunks):
    def run(batch):
        chunks.extend(batch.num_new_tokens)
        return complete_step(batch)
    return run


def test_a_request_aborted_while_loading_leaves_nothing(make_llm, prompts, reference, tmp_path):
    """Aborted while its lookup waits on the I/O thread, a request holds no page and no slot, its
    lookup is dropped, and the engine serves the same prompt from L3 afterwards."""
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]
    gate = threading.Event()
    prefix.io.submit(gate.wait)   # the I/O thread is busy: the next lookup stays in flight
    rid = engine.add_request(prompts[1], PARAMS)
    assert engine.step() == []    # nothing can run: the step waited a little for the lookup
    assert prefix.loading == 1 and engine.num_waiting == 1 and engine.num_running == 0
    assert engine.abort_request(rid)
    assert prefix.loading == 0 and not engine.has_unfinished_requests()
    _check_no_leak(llm)
    assert prefix.metrics()["pending_calls"] == 1   # the gate alone: the lookup was cancelled
    gate.set()
    prefix.drain()
    assert prefix.metrics()["pending_calls"] == 0 and prefix.metrics()["pending_lookups"] == 0
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]
    assert prefix.metrics()["pages_loaded"] == 300 // S
    _check_no_leak(llm)


def test_a_lookup_back_when_the_batch_is_full_takes_no_pages_and_is_looked_up_again(make_llm, prompts, reference,
                                                                                  tmp_path):
    """While X's lookup is in flight a short request takes the only sequence slot. X's lookup comes
    back to a full batch: X takes no pages (a waiting request holds none, so nothing can starve the
    running ones), and once the slot is free it is looked up again and loads its prefix."""
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, max_num_seqs=1, l3=f"file:{tmp_path / 'l3'}")
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]
    prefix.drain()
    gate = threading.Event()
    prefix.io.submit(gate.wait)   # X's lookup stays in flight until the gate opens
    x = engine.add_request(prompts[1], PARAMS)
    assert engine.step() == [] and prefix.loading == 1
    engine.add_request(prompts[2][:10], SamplingParams(max_tokens=6, ignore_eos=True))  # under one page: no lookup
    outs = {}
    for o in engine.step():          # the short request is admitted (X, loading, is passed over)
        outs[o.request_id] = o
    assert engine.num_running == 1
    gate.set()
    prefix.drain()
    engine.step()                    # X's lookup is back, the batch is full: X takes nothing
    xseq = next(s for s in engine.scheduler.waiting if s.request_id == x)
    assert not xseq.pages and xseq.num_computed == 0 and prefix.metrics()["pages_loaded"] == 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs[x].token_ids == reference[1]
    assert prefix.metrics()["pages_loaded"] == 300 // S   # looked up again once the slot was free
    _check_no_leak(llm)


def test_a_request_that_took_pages_but_was_not_admitted_gives_them_back(make_llm, prompts, reference, tmp_path):
    """A waiting request that got its prefix's pages but that the scheduler did not admit in the same
    step (here: the step's token budget went to a running prefill) does not keep them: they return
    to the pool, and it loads them again when it is admitted. Same tokens, nothing leaked."""
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}", l3_async=False)
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]
    seq_x = None
    x = engine.add_request(prompts[1], PARAMS)
    seq_x = next(s for s in engine.scheduler.waiting if s.request_id == x)
    schedule = engine.scheduler.schedule
    held_after = []

    def starved():   # a schedule that admits nobody this once, as when the budget is spent
        engine.scheduler.schedule = schedule
        from hisa.engine.scheduler import ScheduledBatch
        held_after.append(len(seq_x.pages))
        return ScheduledBatch()

    engine.scheduler.schedule = starved
    engine.step()
    assert held_after == [300 // S]        # the lookup gave it its pages before the schedule
    assert not seq_x.pages and engine.allocator.num_free == engine.allocator.num_pages   # and it gave them back
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs[x].token_ids == reference[1]
    assert prefix.metrics()["pages_loaded"] == 2 * (300 // S)   # loaded again when admitted
    _check_no_leak(llm)


def test_a_busy_io_thread_times_lookups_out_bounds_writes_and_close_runs_them(make_llm, prompts, reference,
                                                                             tmp_path):
    """The I/O thread held busy: the lookup is given up after load_timeout_s (the request prefills),
    the prompt's write waits in the queue with its pages copied off the device, the answer's write
    is past max_pending_bytes and dropped (counted), and close() runs the queue and joins the thread."""
    from hisa.kvcache.l3 import page_keys
    from hisa.kvcache.l3.file_backend import FileBackend

    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    prefix = llm.engine.l3_prefix
    prefix.load_timeout_s = 0.2
    prefix.io.max_pending_bytes = prefix.page_bytes
    gate, io_threads = threading.Event(), []
    prefix.io.submit(lambda: (io_threads.append(threading.current_thread()), gate.wait()))
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids[:8] == reference[0]
    prompt_pages = len(prompts[0]) // S   # 21; the answer fills one more page (22 full pages computed)
    m = prefix.metrics()
    assert m["loads_timed_out"] == 1 and m["pages_loaded"] == 0
    assert m["pending_calls"] == 2 and m["pending_write_bytes"] == prompt_pages * prefix.page_bytes
    assert m["pages_dropped"] == 1
    gate.set()
    llm.close()
    assert not io_threads[0].is_alive()
    keys = page_keys(prompts[0] + out.token_ids, prefix.layout)[:prompt_pages + 1]
    assert FileBackend(str(tmp_path / "l3")).exists(keys) == [True] * prompt_pages + [False]


def test_lookups_in_flight_are_bounded_in_bytes(make_llm, prompts, reference, tmp_path):
    """Two requests whose prefixes are in L3, lookups in flight bounded to one request's pages (their
    payloads are host memory): the second is not looked up while the first's lookup is out, so it is
    admitted and prefills like a request without L3; the outputs are the same."""
    llm = make_llm(max_num_batched_tokens=128, prefix_cache=False, l3=f"file:{tmp_path / 'l3'}")
    engine, prefix = llm.engine, llm.engine.l3_prefix
    assert _one_by_one(llm, prompts[:1]) == reference[:1]
    prefix.drain()
    prefix.max_lookup_bytes = (len(prompts[1]) // S) * prefix.page_bytes
    gate = threading.Event()
    prefix.io.submit(gate.wait)
    ids = [engine.add_request(p, PARAMS) for p in prompts[1:]]
    engine.step()
    assert prefix.loading == 1   # the second lookup would pass the bound: not started
    gate.set()
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o.token_ids
    assert [outs[i] for i in ids] == reference[1:]
    assert prefix.metrics()["pages_loaded"] == 300 // S and prefix._lookup_bytes == 0
    _check_no_leak(llm)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (the pages land on the device)")
def test_on_cuda_a_corrupt_page_is_caught_on_the_device_after_landing(tmp_path):
    """CUDA: the pages a lookup reads are copied to the device unchecked and checked there
    (`crc32_pages` on the landing stream); a bit flipped on disk ends the run at that page, is
    counted and deleted, and the output is the one computed without L3."""
    from hisa import LLM
    from hisa.kvcache.l3 import page_keys

    url = f"file:{tmp_path / 'l3'}"
    kw = dict(device="cuda", dtype="float32", max_model_len=1024, page_size=S, prefix_cache=False, progress=False,
              max_num_batched_tokens=128)
    prompt = list(range(3, 400))
    want = LLM("random:tiny-llama", **kw).generate([prompt], PARAMS, use_tqdm=False)[0].token_ids
    first = LLM("random:tiny-llama", l3=url, **kw)
    assert first.generate([prompt], PARAMS, use_tqdm=False)[0].token_ids == want
    first.engine.l3_prefix.drain()
    keys = page_keys(prompt[:(len(prompt) - 1) // S * S], first.engine.l3_prefix.layout)
    with open(first.engine.l3_prefix.l3.backend.path(keys[7]), "r+b") as f:   # a payload bit of page 7
        f.seek(-500, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-500, os.SEEK_END)
        f.write(bytes([byte ^ 0x04]))
    llm = LLM("random:tiny-llama", l3=url, **kw)
    prefix = llm.engine.l3_prefix
    assert not prefix.check_on_device   # a file's rows are ours: checked on the reader threads by default
    from hisa.ops import crc32
    crc32._device_tables.cache_clear()
    prefix.check_on_device = True
    assert crc32._device_tables.cache_info().currsize == 1   # made (and the kernel run) now, not in the lookup
    assert prefix.land_on_device
    assert llm.generate([prompt], PARAMS, use_tqdm=False)[0].token_ids == want
    prefix.drain()
    m = prefix.metrics()
    assert m["store_corrupt"] == 1 and m["pages_loaded"] == 7
    assert prefix.timing["landed_bytes"] > 0   # checked after landing, not on the reader threads
    _check_no_leak(llm)


@pytest.mark.parametrize("l3_async", [False, True], ids=["sync", "async"])
def test_waiting_requests_looked_up_in_l3_do_not_hold_the_pool_from_the_first_in_line(tmp_path, l3_async):
    """The pool's prefix cache on, L3 on, four requests that preempt: the waiting ones' lookups shared
    their cached prefix pages before knowing whether they could be admitted; three of them held all 60
    pages through the schedule, the first in line never got one, and each step gave them back for the
    next lookup to take again: the engine spun for ever (the no-progress check saw pages released)."""
    import random

    import torch

    from hisa import LLM
    from hisa.models.factory import load_model

    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 500) for _ in range(290)] for _ in range(4)]
    params = SamplingParams(max_tokens=80, ignore_eos=True)

    def run(**l3):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, num_kv_pages=60,
                  max_model_len=512, max_num_batched_tokens=512, prefix_cache=True, **l3)
        engine, done, steps = llm.engine, {}, 0
        ids = [engine.add_request(p, params) for p in prompts]
        while engine.has_unfinished_requests():
            steps += 1
            assert steps < 1000, "the engine makes no progress"
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        assert engine.scheduler.num_preemptions >= 1
        _check_no_leak(llm)
        llm.close()
        return [done[i] for i in ids]

    assert run(l3=f"file:{tmp_path / 'l3'}", l3_async=l3_async) == run()


def test_a_sparse_answer_is_not_served_as_a_prefix_to_another_request(tmp_path):
    """A sparse request's answer pages hold KV its sparse decode steps computed (later layers attended
    to selected pages), not what prefilling the same tokens computes. Keyed like prefilled pages, they
    were served to the next turn (prompt + answer + more) from the pool's prefix cache and, through
    L3, to a dense engine: outputs then depended on what was cached (5 of 6 seeds differed). Now they
    are keyed with the request's own salt: the next turn reuses the prompt's pages and prefills the
    answer's, and gives the tokens it gives with no cache at all."""
    import random

    import torch

    from hisa import LLM
    from hisa.models.factory import load_model
    from hisa.sparse.config import SparseConfig

    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    sparse = SparseConfig(algorithm="quest", token_budget=64, min_prompt_len=32, residency="device")
    rng = random.Random(1)
    first = [rng.randrange(3, 500) for _ in range(100)]   # 6 full pages
    more = [rng.randrange(3, 500) for _ in range(20)]

    def make(**kw):
        return LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=1024, **kw)

    def gen(llm, prompt, n):
        return llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)[0].token_ids

    with make(sparse=sparse, prefix_cache=True, l3=f"file:{tmp_path / 'l3'}") as chat:
        answer = gen(chat, first, 200)
        second = first + answer + more
        chat.engine.l3_prefix.drain()
        with make(prefix_cache=False, l3=f"file:{tmp_path / 'l3'}") as dense, make(prefix_cache=False) as plain:
            assert gen(dense, second, 32) == gen(plain, second, 32)
            assert dense.engine.l3_prefix.metrics()["pages_loaded"] == 6   # the prompt's pages, not the answer's
        reused = chat.engine.prefix_cache.stats.tokens_hit
        got_sparse = gen(chat, second, 32)
        assert chat.engine.prefix_cache.stats.tokens_hit - reused == 6 * 16
    with make(sparse=sparse, prefix_cache=False) as fresh:
        assert got_sparse == gen(fresh, second, 32)
