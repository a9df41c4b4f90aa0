"""The hierarchical sparse cache end to end on the CPU: equality with dense, memory, leaks, passkey."""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.errors import ConfigError
from hisa.models.factory import load_model
from hisa.sparse.config import SparseConfig
from tests.conftest import long_text


def _sparse(**kw) -> SparseConfig:
    kw.setdefault("min_prompt_len", 256)
    kw.setdefault("host_pool_gb", 1.0)
    return SparseConfig(**kw)


def _prompt(tokenizer, n, seed=0):
    return tokenizer.encode(long_text(n, seed))[:n]


_DENSE: dict[int, tuple[list[int], list[int]]] = {}  # prompt length -> (prompt, dense greedy tokens)


@pytest.mark.parametrize("algorithm, n_prompt, residency", [
    ("quest", 1024, "host"), ("quest", 4000, "host"), ("quest", 1500, "auto"), ("quest-mean", 1500, "host"),
    ("oracle", 1500, "host"), ("streaming", 1500, "host")])
def test_full_budget_equals_dense(make_llm, algorithm, n_prompt, residency):
    """With a budget covering the whole context, every page is selected: output == dense, token for token,
    whether the request's KV lives on the device (resident) or in the host pool (host-backed). (32
    decode steps: the six cases took 257 s on a 2-core CPU with 64, 139 s with 32.)"""
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    if n_prompt not in _DENSE:  # the dense run of a prompt length, shared by its cases
        dense_llm = make_llm()
        ids = _prompt(dense_llm.tokenizer, n_prompt, seed=n_prompt)
        _DENSE[n_prompt] = ids, dense_llm.generate([ids], params, use_tqdm=False)[0].token_ids
    ids, dense = _DENSE[n_prompt]
    llm = make_llm(sparse=_sparse(algorithm=algorithm, token_budget=8192, residency=residency),
                   max_num_batched_tokens=1024)
    engine = llm.engine
    engine.add_request(ids, params)
    kinds, out = set(), None
    while engine.has_unfinished_requests():
        kinds |= {seq.host_backed for seq in engine.scheduler.running}
        for o in engine.step():
            out = o.token_ids
    assert out == dense
    assert engine.sparse.summary()["decode_steps"] == 31  # it really ran sparse
    assert kinds == {residency == "host"}  # where it was asked to live


def test_offloaded_equals_all_on_device(make_llm):
    """Same selection → same result whether the full KV lives in the host pool or on the device."""
    ids = _prompt(make_llm().tokenizer, 1500, seed=5)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    outs, misses = [], []
    for residency in ("host", "device"):
        llm = make_llm(sparse=_sparse(algorithm="quest", token_budget=256, residency=residency))
        outs.append(llm.generate([ids], params, use_tqdm=False)[0].token_ids)
        misses.append(llm.engine.sparse.summary()["misses"])
    assert outs[0] == outs[1]
    assert misses[0] > 0 and misses[1] == 0  # the host-backed run loaded pages, the resident one never


def _generate_tiny(tiny, prompts, params, sparse):
    """Greedy tokens of `prompts` on a small random model (page 16, 512 tokens), and the sparse
    cache's summary (None for dense)."""
    llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
              sparse=sparse)
    outs = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return outs, llm.engine.sparse.summary() if sparse is not None else None


@pytest.mark.parametrize("algorithm", ["lowbit", "lowbit-2bit", "lowbit-best"])
def test_tiny_model_full_budget_equals_dense_and_host_equals_device(algorithm):
    """On a small random model (cheap on a CPU): a budget covering the context gives dense's tokens,
    resident or host-backed; a small budget gives the same tokens host-backed and resident."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (300, 220)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    def run(sparse):
        return _generate_tiny(tiny, prompts, params, sparse)

    dense, _ = run(None)
    for residency in ("host", "device"):
        full, st = run(_sparse(algorithm=algorithm, token_budget=512, min_prompt_len=64, host_pool_gb=0.01,
                               residency=residency))
        assert full == dense and st["decode_steps"] == 23
    small = [run(_sparse(algorithm=algorithm, token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                         residency=residency)) for residency in ("host", "device")]
    assert small[0][0] == small[1][0] != dense
    assert small[0][1]["misses"] > 0 and small[1][1]["misses"] == 0


def test_a_request_demoted_mid_generation_gives_the_same_tokens():
    """Two resident requests grow until the device pool runs short: the younger is demoted to the host
    pool mid-generation (its KV copied device -> host, decoding continues from its LRU buffer). Its
    tokens, and the other's, equal a run where both stay resident on a pool big enough for both."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (300,), generator=g).tolist() for _ in range(2)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    def run(num_kv_pages, residency):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  num_kv_pages=num_kv_pages, max_num_batched_tokens=1024,
                  sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                      residency=residency))
        engine = llm.engine
        ids = [engine.add_request(p, params) for p in prompts]
        out, host_steps = {}, 0
        while engine.has_unfinished_requests():
            host_steps += any(s.host_backed for s in engine.scheduler.running if s.num_computed >= s.num_prompt)
            for o in engine.step():
                out[o.request_id] = o.token_ids
        assert engine.allocator.num_free == engine.allocator.num_pages
        assert engine.sparse.host_allocator.num_free == engine.sparse.host_allocator.num_pages
        return [out[i] for i in ids], engine.scheduler.num_demotions, host_steps, engine.sparse.summary()

    resident, demotions, _, stats = run(200, "device")
    assert demotions == 0
    # resident rows have every page on the device: they neither hit nor miss (they counted as hits)
    assert stats["selected_pages"] > 0 and stats["host_backed_selected_pages"] == stats["hits"] == stats["misses"] == 0
    # 2 x 19 prompt pages + reserve fit; the growth to 2 x 22 pages does not: one demotion
    mixed, demotions, host_steps, stats = run(41, "auto")
    assert demotions == 1 and host_steps > 0 and stats["misses"] > 0
    assert mixed == resident
    # the buffer's hit rate is the host-backed row's own: budget 96 = 6 pages per layer and step, in the
    # steps it decoded host-backed (host_steps, counted before each step, misses the demotion's own)
    host_row_steps, rest = divmod(stats["host_backed_selected_pages"], tiny.config.num_layers * 6)
    assert rest == 0 and host_row_steps in (host_steps, host_steps + 1)
    assert stats["host_backed_selected_pages"] < stats["selected_pages"]
    assert stats["hits"] + stats["misses"] == stats["host_backed_selected_pages"]
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / stats["host_backed_selected_pages"])


def test_a_step_failing_before_a_demotion_was_copied_fails_the_demoted_request_too():
    """The step that demotes a request (not itself in the step: the token budget ran out before it)
    fails before its KV reached the host pool: that request has nothing to decode from and fails in
    the same step. It used to stay running as host-backed and broke a later step (an IndexError that
    would fail every request batched with it)."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (300,), generator=g).tolist() for _ in range(2)]
    llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
              num_kv_pages=40, max_num_batched_tokens=1024,
              sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                  residency="auto"))
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in prompts]
    while len(engine.scheduler.running) < 2 or not all(s.num_output for s in engine.scheduler.running):
        engine.step()
    engine.scheduler.max_num_batched_tokens = 1  # one decode per step: the older grows, the younger waits

    def copy_fails(*args, **kwargs):
        raise RuntimeError("injected: the device-to-host copy failed")

    engine.sparse.manager.demote = copy_fails
    finished = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        finished.update({o.request_id: o for o in outs if o.finished})
        if finished:
            break
    assert set(finished) == set(ids) and all(o.finish_reason == "error" for o in finished.values())
    assert engine.scheduler.num_demotions == 1 and not engine.has_unfinished_requests()
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert engine.sparse.host_allocator.num_free == engine.sparse.host_allocator.num_pages


def test_a_request_demoted_and_preempted_by_one_schedule_recomputes_without_failing_the_step():
    """A full device pool in "auto": one schedule demotes a request to the host pool and then picks it
    as the preemption victim (its buffer pages still count). The step then applied the stale demotion
    (ValueError: src_rows (14,) / dst_rows (0,)) and every request of the step failed. Now the demotion
    is dropped with the preemption and nothing is parked for it (its KV is in neither pool). The
    prompts are a differential fuzzer's (random ids), the case it found."""
    import json
    from pathlib import Path

    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    prompts = json.loads((Path(__file__).parent / "data" / "demote_then_preempt_prompts.json").read_text())
    max_tokens, arrive = [22, 25, 25, 30, 25], [2, 0, 0, 0, 0]
    llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=320,
              num_kv_pages=32, max_num_batched_tokens=4096, max_num_seqs=8, prefix_cache=True, overlap=False,
              sparse=SparseConfig(algorithm="oracle", token_budget=64, min_prompt_len=32, residency="auto",
                                  host_pool_gb=0.01))
    engine, scheduler = llm.engine, llm.engine.scheduler
    both, preempt = [], scheduler._preempt

    def spy(seq, batch):
        both.extend(seq.request_id for d in batch.demoted if d.seq is seq)
        preempt(seq, batch)

    scheduler._preempt = spy
    step, finished = 0, {}
    while engine.has_unfinished_requests() or step <= max(arrive):
        for i, at in enumerate(arrive):
            if at == step:
                engine.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i], ignore_eos=True))
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        step += 1
    assert both, "the case no longer demotes and preempts one request in one schedule"
    assert {o.finish_reason for o in finished.values()} == {"length"} and len(finished) == 5
    assert all(len(o.token_ids) == n for o, n in zip(sorted(finished.values(), key=lambda o: o.request_id), [25, 25, 30, 25, 22]))
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert engine.sparse.host_allocator.num_free == engine.sparse.host_allocator.num_pages


def test_device_bytes_do_not_grow_with_the_prompt():
    """Host-backed, a fixed budget gives the same device KV bytes per request at 1K, 4K and 8K prompt tokens."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    per_request, host_used = {}, {}
    for n in (1024, 4096, 8192):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False,
                  sparse=_sparse(algorithm="quest", token_budget=512, residency="host"))
        engine = llm.engine
        engine.add_request([1 + i % 500 for i in range(n)], SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
            for seq in engine.scheduler.running:
                per_request[n] = engine.sparse.device_bytes(seq)["kv"]
                host_used[n] = engine.sparse.memory()["host_bytes_in_use"]
        assert engine.allocator.num_used == 0
    assert per_request[1024] == per_request[4096] == per_request[8192] > 0
    assert host_used[8192] > 7 * host_used[1024]  # the full KV went to the host pool instead


@pytest.mark.parametrize("residency", ["host", "auto"])
def test_nothing_leaks_after_finish_abort_and_preemption(make_llm, residency):
    llm = make_llm(sparse=_sparse(algorithm="quest", token_budget=256, max_sparse_requests=2, residency=residency),
                   max_num_batched_tokens=512)
    engine = llm.engine
    tok = llm.tokenizer
    long = [_prompt(tok, 700 + 100 * i, seed=i) for i in range(4)]  # sparse (>= 256 tokens)
    short = [_prompt(tok, 40, seed=9)]  # dense
    ids = [engine.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in long + short]
    for _ in range(3):
        engine.step()
    assert engine.abort_request(ids[0])
    while engine.has_unfinished_requests():
        engine.step()
    m = engine.sparse.manager
    assert m.host.allocator.num_free == m.host.num_pages
    assert m.num_free_slots == m.max_requests
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert (m.buffer_lp == -1).all() and (m.slot_pages == -1).all() and (m.host_table == -1).all()


def test_passkey_answered_by_quest_with_a_256_token_budget(make_llm, capsys):
    llm = make_llm()
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = "The pass key is 58261. Remember it. 58261 is the pass key. "
    conv = [{"role": "system", "content": "You answer with the exact number from the text."},
            {"role": "user", "content": filler * 30 + needle + filler * 30
             + "\nWhat is the pass key? Reply with the number only."}]
    ids = llm.apply_chat_template(conv)
    assert 1300 <= len(ids) <= 1800
    params = SamplingParams(max_tokens=16)
    dense = llm.generate([ids], params, use_tqdm=False)[0]
    assert "58261" in dense.text
    sparse_llm = make_llm(sparse=_sparse(algorithm="quest", token_budget=256, min_prompt_len=1024, residency="host"))
    out = sparse_llm.generate([ids], params, use_tqdm=False)[0]
    st = sparse_llm.engine.sparse.summary()
    with capsys.disabled():
        print(f"\n[passkey] prompt {len(ids)} tok; quest@256: {out.text!r}; hit rate {st['hit_rate']:.3f}, "
              f"{st['bytes_h2d_per_step'] / 2**20:.3f} MiB H2D per step over {st['decode_steps']} steps")
    assert "58261" in out.text
    assert st["decode_steps"] > 0 and st["hit_rate"] > 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_budget=32), "smaller than the sinks"),
    (dict(buffer_ratio=0.5), "buffer_ratio must be a finite number >= 1"),
    (dict(buffer_ratio=float("nan")), "buffer_ratio must be a finite number >= 1, got nan"),
    (dict(host_pool_gb=float("inf")), "host_pool_gb must be a finite number > 0, got inf"),
    (dict(token_budget=96.0), "token_budget must be an integer >= 1, got 96.0"),   # as JSON or YAML may give it
    (dict(sink_pages=1.5), "sink_pages must be an integer >= 0"),
    (dict(recent_pages=True), "recent_pages must be an integer >= 1"),
    (dict(algorithm="magic"), "unknown sparse algorithm 'magic'; choose one of: .*oracle.*quest.*streaming"),
    (dict(dense_layers=-1, residency="device"), "dense_layers must be an integer >= 0"),
    (dict(dense_layers=2), "dense_layers=2 needs residency='device'"),
])
def test_invalid_configurations_fail_at_construction(kwargs, message):
    from hisa.config import EngineConfig

    with pytest.raises(ConfigError, match=message):
        EngineConfig(device="cpu", page_size=16, sparse=SparseConfig(**kwargs))


def _stats_llm(tiny_llama, **kwargs):
    sparse = SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                          residency=kwargs.pop("residency"))
    return LLM(loaded=tiny_llama, device="cpu", dtype="float32", progress=False, page_size=16, sparse=sparse,
               **kwargs)


def test_peak_bytes_cover_steps_without_a_sparse_decode_row():
    """A host-backed request that is only prefilled (its one token comes from the last prefill step)
    held host pages for three steps: the peaks must have seen them."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    with _stats_llm(tiny, residency="host", max_model_len=512, num_kv_pages=200,
                    max_num_batched_tokens=128) as llm:
        e = llm.engine
        prompt = torch.randint(3, 500, (300,), generator=torch.Generator().manual_seed(0)).tolist()
        e.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        seen_host = seen_device = 0
        while e.has_unfinished_requests():
            e.step()
            m = e.sparse.memory()
            seen_host = max(seen_host, m["host_bytes_in_use"])
            seen_device = max(seen_device, m["device_kv_bytes_in_use"] + m["metadata_bytes_in_use"])
        st = e.sparse.summary()
        assert st["decode_steps"] == 0 and seen_host > 0
        assert st["peak_host_bytes_in_use"] >= seen_host and st["peak_device_bytes_in_use"] >= seen_device > 0


def test_device_kv_in_use_counts_a_shared_prefix_page_once():
    """Resident requests sharing cached prefix pages: the device KV reported is the pages held, each
    once (it counted a shared page once per holder: over twice the whole pool)."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    with _stats_llm(tiny, residency="device", max_model_len=256, num_kv_pages=40,
                    max_num_batched_tokens=256, prefix_cache=True) as llm:
        e = llm.engine
        prefix = torch.randint(3, 500, (224,), generator=torch.Generator().manual_seed(0)).tolist()   # 14 pages
        llm.generate([prefix + [5]], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        for i in range(6):
            e.add_request(prefix + [10 + i] * 3, SamplingParams(max_tokens=4, ignore_eos=True))
        page = e.sparse.manager.device_page_bytes
        shared = 0
        while e.has_unfinished_requests():
            e.step()
            kv_pages = e.sparse.memory()["device_kv_bytes_in_use"] // page
            assert kv_pages <= e.allocator.num_used   # (the pool's pages in use: cached ones included)
            shared = max(shared, sum(1 for s in e.scheduler.running if s.sparse))
        assert shared >= 2   # several requests did hold the prefix at once
        st = e.sparse.summary()
        assert st["peak_device_bytes_in_use"] <= e.allocator.num_pages * page + st["metadata_bytes"]


def test_summary_without_waiting_gives_the_same_figures_off_cuda():
    """`summary(blocking=False)` (the server's gauges) reads the same counters where nothing is async."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    with _stats_llm(tiny, residency="host", max_model_len=512, num_kv_pages=200) as llm:
        prompt = torch.randint(3, 500, (300,), generator=torch.Generator().manual_seed(0)).tolist()
        llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        blocking, not_blocking = llm.engine.sparse.summary(), llm.engine.sparse.summary(blocking=False)
        assert blocking["misses"] > 0 and blocking == not_blocking


def test_distinct_pages_of_prefix_sharing_requests_without_a_set_of_every_page():
    """The count `memory()` takes at every step equals a set's, for requests sharing leading runs."""
    import random

    from hisa.sparse.coordinator import _distinct_pages

    rng = random.Random(0)
    for _ in range(500):
        base, lists, fresh = list(range(1000, 1000 + rng.randint(0, 30))), [], 5000
        for _ in range(rng.randint(0, 6)):
            source = rng.choice(lists) if lists and rng.random() < 0.5 else base
            own = rng.randint(0, 10)
            lists.append(source[:rng.randint(0, len(source))] + list(range(fresh, fresh + own)))
            fresh += own
        assert _distinct_pages(lists) == len(set().union(*lists) if lists else ()), lists


def test_dsa_on_a_model_without_an_indexer_names_every_algorithm_that_works():
    from hisa.engine.llm_engine import LLMEngine
    from hisa.config import EngineConfig

    with pytest.raises(ConfigError, match="--sparse dsa needs a model with DSA's indexer .*lowbit.*quest-mean.*streaming"):
        LLMEngine(EngineConfig(model="random:tiny-llama", device="cpu", dtype="float32", page_size=16,
                               sparse=SparseConfig(algorithm="dsa")))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_prefetch_changes_no_token(preset):
    """Host-backed requests with the cross-layer prefetch (each global layer's list loaded into the
    next one's buffer while it computes) give the tokens of runs without it; the prefetched pages are
    counted apart. Gemma-3's sliding layers always prefetch the next one's window (the same pages):
    there their own misses must vanish."""
    tiny = load_model(f"random:{preset}", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (400, 300)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    runs = {}
    for prefetch in (False, True):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                      residency="host", prefetch=prefetch))
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[prefetch] = ([o.token_ids for o in outs], llm.engine.sparse.summary())
    assert runs[True][0] == runs[False][0]
    on, off = runs[True][1], runs[False][1]
    if preset == "tiny-llama":  # the global layers' guesses come on top
        assert on["prefetched_pages"] > off["prefetched_pages"] == 0
    else:  # layers 1 and 2 are sliding and follow a sliding layer: no own misses (one global layer: no guess)
        assert off["misses_per_layer"][1] == off["misses_per_layer"][2] == 0 < off["misses_per_layer"][0]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_warm_start_loads_fewer_pages_and_changes_no_token(preset):
    """A host-backed request's prefill leaves in each layer's device buffer the pages its first decode
    step will read (SparseConfig.warm_start): with streaming (sinks + recent pages, a sliding layer's
    window: a list known in advance) that first step misses nothing, where an empty buffer misses its
    every page; with quest (picks guessed from the last prompt token) the whole run misses fewer pages.
    The tokens are the same either way."""
    tiny = load_model(f"random:{preset}", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (400, 311)]

    def run(algorithm, warm, max_tokens):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  sparse=SparseConfig(algorithm=algorithm, token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                      residency="host", warm_start=warm))
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        st = llm.engine.sparse.summary()
        assert st["decode_steps"] > 0 and st["host_backed_requests"] == 0  # it ran host-backed, and ended
        assert llm.engine.sparse.host_allocator.num_free == llm.engine.sparse.host_allocator.num_pages
        return [o.token_ids for o in outs], st

    (cold_out, cold), (warm_out, warm) = run("streaming", False, 2), run("streaming", True, 2)
    assert warm_out == cold_out
    assert cold["misses"] > 0 == warm["misses"]  # one decode step each: every page but the tail missed, or none
    (cold_out, cold), (warm_out, warm) = run("quest", False, 24), run("quest", True, 24)
    assert warm_out == cold_out
    assert warm["selected_pages"] == cold["selected_pages"] and warm["misses"] < cold["misses"]


def test_warm_start_after_a_prefill_that_ends_one_token_short():
    """A prompt whose prefill leaves its last token alone (129 tokens, chunks of 128: a 1-token chunk) is
    warmed after that chunk: with streaming the first decode step misses nothing, with the tokens of a
    cold start."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    prompt = torch.randint(3, 500, (129,), generator=torch.Generator().manual_seed(5)).tolist()

    def run(warm):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=256,
                  max_num_batched_tokens=128,
                  sparse=SparseConfig(algorithm="streaming", token_budget=64, min_prompt_len=64, host_pool_gb=0.01,
                                      residency="host", warm_start=warm))
        out = llm.generate([prompt], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
        st = llm.engine.sparse.summary()
        assert st["decode_steps"] == 1
        return out.token_ids, st["misses"]

    (cold_out, cold), (warm_out, warm) = run(False), run(True)
    assert warm_out == cold_out and cold > 0 == warm


@pytest.mark.parametrize("algorithm", ["quest", "streaming"])
def test_a_sparse_prompt_gives_the_same_tokens_however_its_prefill_is_chunked(algorithm):
    """A prompt's last token attends to the whole prompt whether it is prefilled with the tokens before it
    or alone (129 tokens in chunks of 128: a 1-token chunk), not to a decode step's selected pages."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    with torch.no_grad():   # sharper attention than the random init's, so that what it reads shows in the tokens
        for p in tiny.model.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    prompt = torch.randint(3, 500, (129,), generator=torch.Generator().manual_seed(21)).tolist()
    outs = {}
    for residency in ("device", "host"):
        for chunk in (1024, 128):
            llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                      max_num_batched_tokens=chunk,
                      sparse=SparseConfig(algorithm=algorithm, token_budget=64, min_prompt_len=64, host_pool_gb=0.01,
                                          residency=residency))
            outs[residency, chunk] = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True),
                                                  use_tqdm=False)[0].token_ids
    assert len(set(map(tuple, outs.values()))) == 1, outs


@pytest.mark.parametrize("algorithm", ["quest", "streaming"])
def test_warm_start_of_prompts_shorter_than_their_sink_pages(algorithm):
    """Host-backed prompts that end inside their sink pages (10 tokens: no whole page; 20 tokens with
    two sink pages of 16) warm nothing they do not have: they decode, with the tokens of runs without
    the warm start, and give every host page back."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    prompts = [list(range(3, 13)), list(range(40, 60))]

    def run(warm):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=256,
                  sparse=SparseConfig(algorithm=algorithm, token_budget=96, sink_pages=2, min_prompt_len=1,
                                      host_pool_gb=0.01, residency="host", warm_start=warm))
        outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
        assert llm.engine.sparse.summary()["decode_steps"] > 0
        assert llm.engine.sparse.host_allocator.num_free == llm.engine.sparse.host_allocator.num_pages
        return [o.token_ids for o in outs]

    assert run(True) == run(False)


@pytest.mark.parametrize("preset, algorithm", [("tiny-llama", "lowbit"), ("tiny-llama", "quest"),
                                               ("tiny-gemma3", "quest")])
def test_dense_layers_equal_to_the_model_give_dense_tokens(preset, algorithm):
    """dense_layers = num_layers at a budget far below the context: every layer reads every page, so the
    tokens are dense's, and the counters say each layer attended the whole context."""
    tiny = load_model(f"random:{preset}", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    layers = tiny.config.num_layers
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (300, 220)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def run(sparse):
        return _generate_tiny(tiny, prompts, params, sparse)

    dense, _ = run(None)
    small = dict(algorithm=algorithm, token_budget=96, min_prompt_len=64, host_pool_gb=0.01, residency="device")
    all_dense, st = run(_sparse(**small, dense_layers=layers))
    assert all_dense == dense
    globals_ = [i for i, w in enumerate(tiny.config.layer_windows) if w is None]
    assert st["selected_per_layer"][globals_[0]] > st["decode_steps"] * (96 // 16) * 2  # more than the budget
    with pytest.raises(ConfigError, match=f"more than the model's {layers} layers"):
        LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
            sparse=_sparse(**small, dense_layers=layers + 1))


def _tiny_prompts_sharing(seed: int, common: int, tail: int):
    """The tiny random model and two random prompts that share their first `common` tokens."""
    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 500, (common,), generator=g).tolist()
    return tiny, [head + torch.randint(3, 500, (tail,), generator=g).tolist() for _ in range(2)]


def _shared_prefix_run(tiny, prompts, params, *, prefix_cache, num_kv_pages, residency="auto"):
    """Greedy tokens of `prompts` on the tiny model with quest (budget 96, page 16), each prompt
    added once the previous one's prefill is done (so a later one can find its pages), and what the
    run did: prefix tokens reused, demotions, each demotion's LRU slots (the logical page each holds),
    leaks checked."""
    llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
              num_kv_pages=num_kv_pages, max_num_batched_tokens=1024, prefix_cache=prefix_cache,
              sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01,
                                  residency=residency))
    e = llm.engine
    holding = []
    schedule = e.scheduler.schedule

    def watched():
        batch = schedule()
        holding.extend(d.holding for d in batch.demoted)
        return batch

    e.scheduler.schedule = watched
    ids, out = [], {}
    for p in prompts:
        ids.append(e.add_request(p, params))
        while any(s.num_computed < s.num_prompt for s in e.scheduler.running) or e.scheduler.waiting:
            for o in e.step():
                out[o.request_id] = o.token_ids
    while e.has_unfinished_requests():
        for o in e.step():
            out[o.request_id] = o.token_ids
    assert e.allocator.num_free == e.allocator.num_pages
    assert e.sparse.host_allocator.num_free == e.sparse.host_allocator.num_pages
    hit = e.prefix_cache.stats.tokens_hit if e.prefix_cache is not None else 0
    return [out[i] for i in ids], hit, e.scheduler.num_demotions, holding


def test_resident_sparse_requests_reuse_a_cached_prefix_with_the_same_tokens():
    """A second sparse request whose prompt starts with the first's 256 tokens takes those 16 pages from
    the pool instead of prefilling them, and quest's page summaries of them are built from their keys
    (a missing summary would change the picks at a budget of 96 of ~300 tokens): the same greedy
    tokens as without the prefix cache."""
    tiny, prompts = _tiny_prompts_sharing(11, 256, 44)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want, hit, _, _ = _shared_prefix_run(tiny, prompts, params, prefix_cache=False, num_kv_pages=200)
    assert hit == 0
    got, hit, demotions, _ = _shared_prefix_run(tiny, prompts, params, prefix_cache=True, num_kv_pages=200)
    assert got == want and hit == 256 and demotions == 0


def test_a_demoted_request_keeps_only_pages_it_holds_alone():
    """Two resident sparse requests share a 128-token prefix (8 pages) in a pool too small for both to
    grow: the younger is demoted mid-generation. Its LRU buffer is made of pages it holds alone (the
    shared ones, which the elder still reads, are let go, not overwritten), the newest of them, each
    still holding its logical page. Both requests' tokens equal a run where neither shares nor moves."""
    tiny, prompts = _tiny_prompts_sharing(12, 128, 200)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    want, _, demotions, _ = _shared_prefix_run(tiny, prompts, params, prefix_cache=False, num_kv_pages=200)
    assert demotions == 0
    got, hit, demotions, holding = _shared_prefix_run(tiny, prompts, params, prefix_cache=True, num_kv_pages=36)
    assert hit == 128 and demotions == 1
    kept = [p for p in holding[0] if p >= 0]
    # the slots hold the newest pages it holds alone (the sink, page 0, is shared: let go), in order
    assert kept and min(kept) >= 8 and kept == list(range(kept[0], kept[0] + len(kept)))
    assert got == want


def _tiny_quest_l3(tiny, l3):
    """The tiny model with resident quest (budget 96, page 16), the pool's prefix cache off, L3 at `l3`."""
    return LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
               max_num_batched_tokens=1024, prefix_cache=False, l3=l3,
               sparse=SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.01))


def test_a_resident_sparse_request_loads_its_prefix_from_l3(tmp_path):
    """Another engine's sparse request over the same 256-token prefix loads those 16 pages from L3
    (written by the first engine's resident sparse request) instead of prefilling them, rebuilds
    quest's summaries from their keys, and gives the tokens of a run without L3."""
    tiny, prompts = _tiny_prompts_sharing(13, 256, 44)
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    want = [o.token_ids for o in _tiny_quest_l3(tiny, None).generate(prompts, params, use_tqdm=False)]
    url = f"file:{tmp_path / 'l3'}"
    first = _tiny_quest_l3(tiny, url)
    assert first.generate(prompts[:1], params, use_tqdm=False)[0].token_ids == want[0]
    first.engine.l3_prefix.drain()
    second = _tiny_quest_l3(tiny, url)
    assert second.generate(prompts[1:], params, use_tqdm=False)[0].token_ids == want[1]
    m = second.engine.l3_prefix.metrics()
    assert m["pages_loaded"] == 16 and second.engine.sparse.summary()["decode_steps"] > 0
    e = second.engine
    assert e.allocator.num_free == e.allocator.num_pages


def test_a_resident_sparse_requests_cut_read_prefills_the_rest(tmp_path, monkeypatch):
    """A resident sparse request whose L3 read is cut by the I/O thread (here after its first batch of
    4 pages, made sure: CUT_MARGIN 0) takes the 4 pages read and prefills the other 12 (no read from
    the back for a sparse request: its summaries are built from its first chunk on), with the tokens
    of a run without L3 and nothing left behind."""
    import hisa.engine.l3_prefix as l3_prefix

    tiny, prompts = _tiny_prompts_sharing(13, 256, 44)
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    want = _tiny_quest_l3(tiny, None).generate(prompts[1:], params, use_tqdm=False)[0].token_ids
    url = f"file:{tmp_path / 'l3'}"
    first = _tiny_quest_l3(tiny, url)
    first.generate(prompts[:1], params, use_tqdm=False)
    first.engine.l3_prefix.drain()
    second = _tiny_quest_l3(tiny, url)
    second.generate([list(range(3, 200))], params, use_tqdm=False)   # a prefill timed (nothing in L3 for it)
    prefix = second.engine.l3_prefix
    monkeypatch.setattr(l3_prefix, "CUT_MARGIN", 0.0)
    monkeypatch.setattr(l3_prefix, "LAND_CHUNK_BYTES", 4 * prefix.page_bytes)   # batches of 4 pages
    assert second.generate(prompts[1:], params, use_tqdm=False)[0].token_ids == want
    m = prefix.metrics()
    assert m["loads_cut_short"] == 1 and m["loads_split"] == 0 and m["pages_loaded"] == 4, str(m)
    prefix.drain()
    assert prefix.rows.in_use == 0
    e = second.engine
    assert e.allocator.num_free == e.allocator.num_pages
