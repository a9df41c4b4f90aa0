"""Hierarchical DSA (`sparse=SparseConfig(algorithm="dsa")`): latent KV in the host pool, the indexer keys
on the device, a device buffer smaller than the context; against DSA with everything on the device.

The tiny random DeepSeek-V3.2 preset (3 layers, MLA, index_topk 32) with its weights scaled up so
attention and routing matter (as tests/engine/test_dsa_engine.py), fp32 on the CPU. The model's own
selection is kept exactly, so the hierarchical run must give the same tokens and the same logits:
only where the selected latent rows are read from changes.
"""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.errors import ConfigError
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.factory import random_model
from tests.conftest import sharp_tiny_dsa
from hisa.sparse.config import SparseConfig

MAX_MODEL_LEN = 320
DECODE_STEPS = 64


@pytest.fixture(scope="module")
def tiny():
    return sharp_tiny_dsa(seed=3)


def _prompts(vocab: int, lens) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lens]


def _llm(loaded, *, page_size: int, sparse: SparseConfig | None = None, **kw) -> LLM:
    return LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=page_size,
               max_model_len=MAX_MODEL_LEN, sparse=sparse, **kw)


def _dsa(**kw) -> SparseConfig:
    kw.setdefault("min_prompt_len", 64)
    kw.setdefault("host_pool_gb", 0.01)
    return SparseConfig(algorithm="dsa", **kw)


def _assert_nothing_held(engine) -> None:
    m = engine.sparse.manager
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert m.host.allocator.num_free == m.host.num_pages
    assert m.num_free_slots == m.max_requests
    assert (m.buffer_lp == -1).all() and (m.slot_pages == -1).all() and (m.host_table == -1).all()


@pytest.mark.parametrize("page_size, buffer_ratio", [(1, 2.0), (4, 1.0)])
def test_host_backed_equals_all_on_device(tiny, page_size, buffer_ratio):
    """64 decode steps of a 200-token prompt with index_topk 32: the same greedy tokens, and logits
    within 1e-5 (teacher-forced on those tokens), whether the latent KV is on the device or in the host
    pool behind a buffer of 64 (page 1) or 32 x 4 (page 4) tokens. Misses are loaded; hits are not."""
    prompt = _prompts(tiny.config.vocab_size, [200])[0]
    params = SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True)  # the first token comes from prefill
    # both prefill in chunks of 128 tokens (later chunks read the context back from the host pool): with
    # 8 indexer heads, zero-score ties are common and their top-k order depends on the chunking
    device_llm = _llm(tiny, page_size=page_size, max_num_batched_tokens=128)
    device_tokens = device_llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    forced = prompt + device_tokens[:DECODE_STEPS]
    device_logits = device_llm.engine.score(forced, prefill_tokens=len(prompt))  # [65, V]

    llm = _llm(tiny, page_size=page_size, sparse=_dsa(residency="host", buffer_ratio=buffer_ratio),
               max_num_batched_tokens=128)
    engine = llm.engine
    m = engine.sparse.manager
    assert m.ns * page_size < len(prompt)  # the buffer holds less than the context
    tokens = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    stats = engine.sparse.summary()
    logits = engine.score(forced, prefill_tokens=len(prompt))

    assert tokens == device_tokens
    assert (logits - device_logits).abs().max().item() <= 1e-5
    assert stats["decode_steps"] == DECODE_STEPS and stats["host_backed_requests"] == 0
    assert stats["misses"] > 0 and stats["hits"] > 0
    assert stats["bytes_h2d"] == stats["misses"] * m.row_bytes == stats["misses"] * page_size * 48 * 4
    # each step and layer needs at most index_topk pages from the buffer (the tail page holds the current one)
    assert 0 < stats["selected_pages"] <= DECODE_STEPS * 3 * 32
    _assert_nothing_held(engine)


@pytest.mark.parametrize("page_size", [1, 4])
def test_warm_start_loads_fewer_pages_with_the_same_tokens(tiny, page_size):
    """The prefill leaves the pages of its last token's indexer picks in the buffer (warm_start): the
    first decode step finds most of its picks there, so the run misses fewer pages, and the tokens are
    those of a run that starts from empty buffers."""
    prompts = _prompts(tiny.config.vocab_size, (200, 150))
    params = SamplingParams(max_tokens=17, ignore_eos=True)
    runs = {}
    for warm in (False, True):
        llm = _llm(tiny, page_size=page_size, sparse=_dsa(residency="host", buffer_ratio=1.0, warm_start=warm),
                   max_num_batched_tokens=128)
        runs[warm] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm.engine.sparse.summary()
        _assert_nothing_held(llm.engine)
    (cold_tokens, cold), (warm_tokens, warm) = runs[False], runs[True]
    assert warm_tokens == cold_tokens
    assert warm["selected_pages"] == cold["selected_pages"] and 0 < warm["misses"] < cold["misses"]


@pytest.fixture(scope="module")
def batch_on_device(tiny):
    """Tokens of a batch (two long prompts, one short) with everything on the device."""
    llm = _llm(tiny, page_size=4)
    prompts = _prompts(tiny.config.vocab_size, (200, 150, 40))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    return prompts, params, [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _run(llm, prompts, params, *, abort_after: int | None = None, extra=None):
    """Step the engine to the end; optionally add `extra` and abort it after `abort_after` steps."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    extra_id = engine.add_request(extra, params) if extra is not None else None
    out, host_backed, steps = {}, set(), 0
    while engine.has_unfinished_requests():
        host_backed |= {s.request_id for s in engine.scheduler.running if s.host_backed}
        for o in engine.step():
            out[o.request_id] = o.token_ids
        steps += 1
        if steps == abort_after:
            assert engine.abort_request(extra_id)
    return [out[i] for i in ids], host_backed


def test_demotion_under_device_pressure_keeps_the_tokens(tiny, batch_on_device):
    """HBM first: the long prompts start resident; as they grow the 90-page pool runs short and they are
    demoted to the host pool (latent rows copied out, indexer keys into the representation) and go on
    from their buffers. Tokens equal the all-on-device run; nothing is left held afterwards."""
    prompts, params, expected = batch_on_device
    llm = _llm(tiny, page_size=4, num_kv_pages=90, sparse=_dsa(residency="auto", buffer_ratio=1.0))
    tokens, host_backed = _run(llm, prompts, params)
    engine = llm.engine
    assert tokens == expected
    assert engine.scheduler.num_demotions > 0 and host_backed
    assert engine.sparse.summary()["misses"] > 0
    _assert_nothing_held(engine)


def test_preemption_and_abort_leave_nothing_held(tiny, batch_on_device):
    """Every long prompt host-backed with a host pool too small for both to finish together: one is
    preempted (and recomputed); a fourth request is aborted mid-generation. Tokens equal the
    all-on-device run; every device page, host page and sparse slot is free at the end."""
    prompts, params, expected = batch_on_device
    llm = _llm(tiny, page_size=4, sparse=_dsa(residency="host", buffer_ratio=1.0, host_pool_gb=0.0002,
                                             max_sparse_requests=3))
    extra = _prompts(tiny.config.vocab_size, (120,))[0]
    tokens, host_backed = _run(llm, prompts, params, abort_after=5, extra=extra)
    engine = llm.engine
    assert tokens == expected
    assert engine.scheduler.num_preemptions > 0 and len(host_backed) >= 2
    _assert_nothing_held(engine)


def test_dsa_needs_a_dsa_model_and_a_dsa_model_needs_dsa(tiny):
    with pytest.raises(ConfigError, match="--sparse dsa"):
        _llm(tiny, page_size=4, sparse=SparseConfig(algorithm="quest", min_prompt_len=64, host_pool_gb=0.01))
    other = random_model(ModelConfig(**PRESETS["tiny-llama"]), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="indexer"):
        _llm(other, page_size=4, sparse=_dsa())


def test_replayed_host_backed_decode_steps_equal_eager_steps(tiny):
    """The `dsa` algorithm is graph-safe: decode steps recorded once per shape and replayed (the CPU
    recorder re-runs the recorded step on the static buffers) give the eager tokens and loads."""
    from hisa.engine.cuda_graph import DecodeGraphs

    prompt = _prompts(tiny.config.vocab_size, [200])[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    runs = []
    for graphs in (False, True):
        llm = _llm(tiny, page_size=4, sparse=_dsa(residency="host", buffer_ratio=1.0))
        runner = llm.engine.runner
        if graphs:
            assert llm.engine.sparse.algorithm.graph_safe
            runner.graphs = DecodeGraphs(torch.device("cpu"), capture=lambda body: body)
        tokens = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
        runs.append((tokens, llm.engine.sparse.summary()["misses"]))
    assert runs[0] == runs[1]
    assert runner.graphs.captures > 0 and runner.graphs.replays > 0


@pytest.fixture(scope="module")
def tiny128():
    """The tiny preset with kv_lora_rank 128: one scale tile of the FP8 latent layout."""
    return sharp_tiny_dsa(seed=3, kv_lora_rank=128)


def test_fp8_latent_host_backed_equals_fp8_on_device(tiny128):
    """kv_cache_dtype="fp8" (latent rows as 164-byte FP8 rows here: 128 e4m3 + one fp32 scale + 16 bf16;
    indexer keys as 32 e4m3 + a scale): the host-backed run gives the FP8 all-on-device run's tokens and
    logits, moving 164 bytes per missed token. Against the fp32 cache it is lossy: FP8 keys change ~2%
    of a top-k (test_fp8_index_keys_keep_the_selection), and this sharp random model (32 of 200 tokens
    selected, weights x5) turns that into other tokens after a few steps; its logits stay correlated."""
    prompt = _prompts(tiny128.config.vocab_size, [200])[0]
    params = SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True)
    ref_llm = _llm(tiny128, page_size=1, max_num_batched_tokens=128)
    ref_tokens = ref_llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    forced = prompt + ref_tokens[:DECODE_STEPS]
    ref_logits = ref_llm.engine.score(forced, prefill_tokens=len(prompt))

    device_llm = _llm(tiny128, page_size=1, max_num_batched_tokens=128, kv_cache_dtype="fp8")
    assert device_llm.engine.cache.page_shape == (1, 164)
    device_tokens = device_llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    device_logits = device_llm.engine.score(forced, prefill_tokens=len(prompt))

    llm = _llm(tiny128, page_size=1, sparse=_dsa(residency="host", buffer_ratio=2.0), max_num_batched_tokens=128,
               kv_cache_dtype="fp8")
    engine = llm.engine
    tokens = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    stats = engine.sparse.summary()
    logits = engine.score(forced, prefill_tokens=len(prompt))

    assert tokens == device_tokens
    assert (logits - device_logits).abs().max().item() <= 1e-5
    assert stats["misses"] > 0 and stats["bytes_h2d"] == stats["misses"] * 164 == stats["misses"] * engine.sparse.manager.row_bytes
    _assert_nothing_held(engine)
    assert device_tokens[:2] == ref_tokens[:2]
    assert ((device_logits - ref_logits).norm() / ref_logits.norm()).item() < 0.6
    assert (device_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item() >= 0.4


def test_fp8_latent_through_demotion_preemption_and_abort(tiny128):
    """FP8 rows (164 bytes per token and layer) through the moves of the tests above: demotion from the
    device to the host pool, and preemption with an abort in a host pool of 92 pages of 4 tokens, which
    admits both long prompts but cannot hold both answers. Tokens equal the FP8 all-on-device batch;
    nothing is left held."""
    prompts = _prompts(tiny128.config.vocab_size, (200, 150, 40))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    fp8 = dict(page_size=4, kv_cache_dtype="fp8")
    expected = [o.token_ids for o in _llm(tiny128, **fp8).generate(prompts, params, use_tqdm=False)]

    llm = _llm(tiny128, num_kv_pages=90, sparse=_dsa(residency="auto", buffer_ratio=1.0), **fp8)
    tokens, host_backed = _run(llm, prompts, params)
    assert tokens == expected
    assert llm.engine.scheduler.num_demotions > 0 and host_backed
    _assert_nothing_held(llm.engine)

    llm = _llm(tiny128, sparse=_dsa(residency="host", buffer_ratio=1.0, host_pool_gb=0.00017, max_sparse_requests=3),
               **fp8)
    assert llm.engine.sparse.manager.host.num_pages == 92  # both prompts fit (88 pages), both answers do not
    extra = _prompts(tiny128.config.vocab_size, (120,))[0]
    tokens, host_backed = _run(llm, prompts, params, abort_after=5, extra=extra)
    assert tokens == expected
    assert llm.engine.scheduler.num_preemptions > 0 and len(host_backed) >= 2
    _assert_nothing_held(llm.engine)


def test_fp8_latent_needs_a_latent_cache_of_whole_tiles(tiny):
    with pytest.raises(ConfigError, match="kv_lora_rank 32"):
        _llm(tiny, page_size=1, kv_cache_dtype="fp8")
    other = random_model(ModelConfig(**PRESETS["tiny-llama"]), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="no latent cache"):
        _llm(other, page_size=4, kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="auto or fp8"):
        _llm(tiny, page_size=1, kv_cache_dtype="int8")
