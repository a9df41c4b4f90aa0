"""The hierarchical sparse cache end to end on the CPU: equality with dense, memory, leaks, passkey."""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.errors import ConfigError
from hisa.sparse.config import SparseConfig
from tests.conftest import long_text


def _sparse(**kw) -> SparseConfig:
    kw.setdefault("min_prompt_len", 256)
    kw.setdefault("host_pool_gb", 1.0)
    return SparseConfig(**kw)


def _prompt(tokenizer, n, seed=0):
    return tokenizer.encode(long_text(n, seed))[:n]


@pytest.mark.parametrize("algorithm, n_prompt", [("quest", 1024), ("quest", 4000), ("quest-mean", 1500), ("oracle", 1500),
                                                 ("streaming", 1500)])
def test_full_budget_equals_dense(make_llm, algorithm, n_prompt):
    """With a budget covering the whole context, every page is selected: output == dense, token for token."""
    dense_llm = make_llm()
    ids = _prompt(dense_llm.tokenizer, n_prompt, seed=n_prompt)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    dense = dense_llm.generate([ids], params, use_tqdm=False)[0].token_ids
    llm = make_llm(sparse=_sparse(algorithm=algorithm, token_budget=8192), max_num_batched_tokens=1024)
    out = llm.generate([ids], params, use_tqdm=False)[0]
    assert out.token_ids == dense
    assert llm.engine.sparse.summary()["decode_steps"] == 63  # it really ran sparse
    assert llm.engine.allocator.num_used == 0  # and never touched the dense pool


def test_offloaded_equals_all_on_device(make_llm):
    """Same selection → same result whether the full KV lives in the host pool or on the device."""
    ids = _prompt(make_llm().tokenizer, 1500, seed=5)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    outs = []
    for offload in (True, False):
        llm = make_llm(sparse=_sparse(algorithm="quest", token_budget=256, offload=offload))
        outs.append(llm.generate([ids], params, use_tqdm=False)[0].token_ids)
        assert llm.engine.sparse.manager.host.data.device.type == "cpu"  # on a CPU machine both are CPU memory
    assert outs[0] == outs[1]


def test_device_bytes_do_not_grow_with_the_prompt(smollm2):
    """A fixed budget gives the same device KV bytes per request at 1K, 4K and 8K prompt tokens."""
    from hisa.models.factory import load_model

    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    per_request, host_used = {}, {}
    for n in (1024, 4096, 8192):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False,
                  sparse=_sparse(algorithm="quest", token_budget=512))
        engine = llm.engine
        engine.add_request([1 + i % 500 for i in range(n)], SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
            for seq in engine.scheduler.running:
                per_request[n] = engine.sparse.device_bytes(seq)["kv_buffer"]
                host_used[n] = engine.sparse.memory()["host_bytes_in_use"]
        assert engine.allocator.num_used == 0
    assert per_request[1024] == per_request[4096] == per_request[8192] > 0
    assert host_used[8192] > 7 * host_used[1024]  # the full KV went to the host pool instead


def test_nothing_leaks_after_finish_abort_and_preemption(make_llm):
    llm = make_llm(sparse=_sparse(algorithm="quest", token_budget=256, max_sparse_requests=2),
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
    assert (m.buffer_pages == -1).all()


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
    sparse_llm = make_llm(sparse=_sparse(algorithm="quest", token_budget=256, min_prompt_len=1024))
    out = sparse_llm.generate([ids], params, use_tqdm=False)[0]
    st = sparse_llm.engine.sparse.summary()
    with capsys.disabled():
        print(f"\n[passkey] prompt {len(ids)} tok; quest@256: {out.text!r}; hit rate {st['hit_rate']:.3f}, "
              f"{st['bytes_h2d_per_step'] / 2**20:.3f} MiB H2D per step over {st['decode_steps']} steps")
    assert "58261" in out.text
    assert st["decode_steps"] > 0 and st["hit_rate"] > 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_budget=32), "smaller than the sinks"),
    (dict(buffer_ratio=0.5), "buffer_ratio must be >= 1"),
    (dict(algorithm="magic"), "unknown sparse algorithm 'magic'; choose one of: .*oracle.*quest.*streaming"),
])
def test_invalid_configurations_fail_at_construction(kwargs, message):
    from hisa.config import EngineConfig

    with pytest.raises(ConfigError, match=message):
        EngineConfig(device="cpu", page_size=16, sparse=SparseConfig(**kwargs))
