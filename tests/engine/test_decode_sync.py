"""A decode step reads nothing back from the device but the sampled tokens.

On the GPU: the profiler counts device-to-host copies in one decode step (eager, and replayed from a
CUDA graph): exactly one, the sampled token ids. On the CPU: a guard counts every host read of a
tensor value (`.item()`, `.tolist()`, `bool(t)`, data-dependent ops such as `nonzero`) made by the
engine's own code during a decode step: the planning, the per-step preparation, the sparse
coordinator, adaptor and manager. The kernels' torch references (what runs here instead of Triton)
and the sampler are exempt: on CUDA the kernels never read back, and reading the sampled tokens is
the one sync a step needs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hisa import LLM, SamplingParams
from hisa.models.factory import load_model
from hisa.sparse.config import SparseConfig

aten = torch.ops.aten
_DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten._unique2.default, aten.item.default, aten.is_nonzero.default}


class HostReadGuard(TorchDispatchMode):
    """Records host reads of tensor values while not paused."""

    def __init__(self):
        super().__init__()
        self.paused = 0
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func in _DATA_DEPENDENT:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))

    def exempt(self, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            self.paused += 1
            try:
                return fn(*a, **k)
            finally:
                self.paused -= 1
        return wrapper


def _params(i: int, sampled: bool | str) -> SamplingParams:
    if sampled == "penalties":  # adjusted on the device from host counts: still no read (a synchronous step)
        return SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.8 * (i % 2), seed=i,
                              presence_penalty=0.3, frequency_penalty=0.2, logit_bias={5 + i: 1.5})
    if sampled:  # drawn on the device: temperature, top-k, top-p, min-p, each request its own seed
        return SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, seed=i)
    return SamplingParams(max_tokens=30, ignore_eos=True)


def _engine(device: str, dtype: str, residency: str, graphs: bool = False, algorithm: str = "quest",
            overlap: bool = False, sampled: bool | str = False):
    loaded = load_model("random:tiny-llama", device=torch.device(device), dtype=getattr(torch, dtype), progress=False)
    llm = LLM(loaded=loaded, device=device, dtype=dtype, progress=False, page_size=16, max_model_len=1024,
              kv_cache_gb=0.05, cuda_graphs=graphs, overlap=overlap,
              sparse=SparseConfig(algorithm=algorithm, token_budget=96, min_prompt_len=64, host_pool_gb=0.02,
                                  residency=residency))
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((300, 40, 200)):  # two sparse requests and a dense one decode together
        engine.add_request(torch.randint(3, 500, (n,), generator=g).tolist(), _params(i, sampled))
    while any(s.num_computed < s.num_prompt for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()  # a first pure decode step (captured when graphs are on; with overlap, left in flight)
    if overlap:
        assert engine._in_flight is not None
    return llm, engine


@pytest.mark.parametrize("residency, algorithm, overlap, sampled",
                         [("host", "quest", False, False), ("auto", "quest", False, False),
                          ("host", "lowbit", False, False), ("host", "quest", True, False),
                          ("auto", "quest", True, False), ("host", "quest", False, True),
                          ("auto", "quest", True, True), ("auto", "quest", False, "penalties")])
def test_a_decode_step_reads_nothing_back_on_the_cpu(monkeypatch, residency, algorithm, overlap, sampled):
    """Overlap mode: the step launched, and the tokens of the one before read back (the one read,
    exempt). Sampled requests (temperature, top-k/p, min-p) are drawn on the device: no read per row."""
    llm, engine = _engine("cpu", "float32", residency, algorithm=algorithm, overlap=overlap, sampled=sampled)
    guard = HostReadGuard()
    import hisa.attention.paged_decode as pd
    import hisa.engine.overlap as overlap_mod
    import hisa.engine.sampler as sampler
    import hisa.kvcache.io as io
    import hisa.kvcache.manager as manager
    import hisa.kvcache.write as write
    import hisa.sparse.adaptor as adaptor
    import hisa.sparse.page_scores as scores
    import hisa.sparse.quest as quest

    # the torch references of the Triton kernels (CUDA runs the kernels), and the sampler
    for module, name in ((pd, "paged_decode_attention_ref"), (adaptor, "_compose_ref"), (manager, "lru_diff_mapped"),
                         (io, "_copy_rows_torch"), (write, "write_token_kv_ref"), (scores, "page_scores_ref"),
                         (scores, "_layout_ref"), (quest, "quest_update")):
        monkeypatch.setattr(module, name, guard.exempt(getattr(module, name)))
    monkeypatch.setattr(sampler.DeviceDraw, "read", guard.exempt(sampler.DeviceDraw.read))
    monkeypatch.setattr(overlap_mod.InFlightStep, "read", guard.exempt(overlap_mod.InFlightStep.read))
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def counted(real):
        def read(t, *a, **k):
            if not guard.paused:
                guard.reads.append(real.__name__)
            return real(t, *a, **k)
        return read

    monkeypatch.setattr(torch.Tensor, "tolist", counted(real_tolist))
    monkeypatch.setattr(torch.Tensor, "item", counted(real_item))
    kinds_before = {s.host_backed for s in engine.scheduler.running if s.sparse}
    with guard:
        for _ in range(3):
            outs = engine.step()
    assert len(outs) == 3  # three requests decoded in each guarded step
    assert engine.num_overlapped_steps == (3 if overlap else 0)
    assert kinds_before == {residency == "host"}
    assert guard.reads == [], f"host reads in a decode step: {guard.reads}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("residency, algorithm, sampled", [("host", "quest", False), ("auto", "quest", False),
                                                           ("host", "lowbit", False), ("auto", "quest", True)])
def test_a_decode_step_copies_only_the_sampled_tokens_to_the_host_on_cuda(graphs, residency, algorithm, overlap,
                                                                          sampled):
    """With overlap, one step() launches a step (its tokens' copy) and reads the step before's from
    pinned memory: still one device-to-host copy, with sampled requests too."""
    llm, engine = _engine("cuda", "bfloat16", residency, graphs=graphs, algorithm=algorithm, overlap=overlap,
                          sampled=sampled)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        outs = engine.step()
        torch.cuda.synchronize()
    assert len(outs) == 3
    d2h = [e.name for e in prof.events() if "DtoH" in e.name or "Device -> Pageable" in e.name
           or "Device -> Pinned" in e.name]
    assert len(d2h) == 1, d2h  # the sampled token ids
    assert engine.num_overlapped_steps == (1 if overlap else 0)
    if graphs:
        assert engine.runner.graphs.replays >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("residency", ["host", "auto"])
def test_the_servers_per_step_sparse_gauges_never_wait_on_the_device(residency):
    """The server reads the sparse stats at every step, while the step runs (`on_schedule`) and after
    it: they read the device counters with a blocking `.tolist()`, a sync that serialized the host
    work overlap mode hides. Read without waiting, the counters lag, then land."""
    from hisa.server.async_engine import read_sparse_stats

    llm, engine = _engine("cuda", "bfloat16", residency, graphs=True, overlap=True)
    seen = []

    def read():
        torch.cuda.set_sync_debug_mode("error")   # any implicit sync (a .tolist() of a CUDA tensor) raises
        try:
            seen.append(read_sparse_stats(engine))
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.on_schedule = read   # while the step runs, as the server reads them
    for _ in range(6):
        engine.step()
        read()                  # and after it
    assert len(seen) == 12 and all(s["decode_steps"] >= 1 for s in seen)
    torch.cuda.synchronize()
    read_sparse_stats(engine)   # the copy in flight has landed: the next read takes it
    landed = read_sparse_stats(engine)
    exact = engine.sparse.summary()   # blocking
    assert landed["misses"] == exact["misses"] and landed["prefetched_pages"] == exact["prefetched_pages"]
    if residency == "host":
        assert exact["misses"] > 0
    llm.close()
