"""Prefix reuse from L3 (dense requests, the embedded SmolLM2): a prompt whose full pages another
request stored in L3 loads them instead of prefilling them, and greedy outputs are identical with
and without L3, also when a page is corrupt or missing or the Redis server dies mid-run."""

from __future__ import annotations

import os
import sys

import pytest

from hisa import SamplingParams
from tests.conftest import long_text

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "kvcache", "l3"))
from l3_servers import REDIS_SERVER, MooncakeStoreServers, RedisServer, require_mooncake  # noqa: E402

pytestmark = pytest.mark.slow   # three SmolLM2 engines and a reference run

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
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
    llm = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(llm, prompts) == reference
    m = llm.engine.l3_prefix.metrics()
    # the first prompt stored its pages; the next two loaded the shared prefix's 18 full pages each
    assert m["requests_hit"] == 2 and m["pages_loaded"] == 2 * (300 // S)
    assert m["store_corrupt"] == 0 and m["store_failures"] == 0
    _check_no_leak(llm)
    # a new engine (another process, or after a restart) over the same directory: all but the last page
    again = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(again, prompts) == reference
    m = again.engine.l3_prefix.metrics()
    assert m["pages_loaded"] == sum((len(p) - 1) // S for p in prompts)
    _check_no_leak(again)


def test_corrupt_and_deleted_pages_are_recomputed(make_llm, prompts, reference, tmp_path):
    url = f"file:{tmp_path / 'l3'}"
    first = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(first, prompts[:1]) == reference[:1]
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
    llm = make_llm(max_num_batched_tokens=128, l3=url)
    assert _one_by_one(llm, prompts[1:2]) == reference[1:2]
    m = llm.engine.l3_prefix.metrics()
    assert m["store_corrupt"] == 1 and m["pages_loaded"] == 5   # pages 0-4: the run ends at the corrupt page
    assert _one_by_one(llm, prompts[2:]) == reference[2:]     # page 5 was rewritten; 9 too
    assert llm.engine.l3_prefix.metrics()["pages_loaded"] == 5 + 300 // S
    _check_no_leak(llm)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (scripts/setup.sh installs it)")
def test_redis_shared_by_two_engines_and_killed_mid_run(make_llm, prompts, reference, tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        a = make_llm(max_num_batched_tokens=128, l3=server.url)
        b = make_llm(max_num_batched_tokens=128, l3=server.url)
        assert _one_by_one(a, prompts[:1]) == reference[:1]
        assert _one_by_one(b, prompts[1:2]) == reference[1:2]          # b reuses a's prefix
        assert b.engine.l3_prefix.metrics()["pages_loaded"] == 300 // S
        server.kill()
        assert _one_by_one(b, prompts[2:]) == reference[2:]             # no L3 now: recomputed
        m = b.engine.l3_prefix.metrics()
        assert m["store_failures"] == 1 and m["pages_loaded"] == 300 // S
        _check_no_leak(a)
        _check_no_leak(b)
    finally:
        server.stop()


def test_mooncake_store_serves_a_prefix(make_llm, prompts, reference, tmp_path):
    require_mooncake()
    servers = MooncakeStoreServers(tmp_path).start()
    try:
        llm = make_llm(max_num_batched_tokens=128, l3=servers.url)
        assert _one_by_one(llm, prompts[:2]) == reference[:2]
        m = llm.engine.l3_prefix.metrics()
        assert m["pages_loaded"] == 300 // S and m["store_corrupt"] == 0 and m["store_failures"] == 0
        _check_no_leak(llm)
        llm.close()
    finally:
        servers.stop()
