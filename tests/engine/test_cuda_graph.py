"""Captured decode steps (hisa.engine.cuda_graph), dense and sparse, compute what eager steps compute.

On the CPU the capture is replaced by a recorder that re-runs the recorded step at each replay:
that checks everything around the graph (the static decode buffers refilled each step, the
per-step preparation inside the step, the clock as a device tensor, miss counters, one capture
per padded row count). On CUDA the same runs use real CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.engine.cuda_graph import DecodeGraphs
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.factory import random_model
from hisa.sparse.config import SparseConfig

# prompts of 230 / 250 / 180 tokens and answers of different lengths: the batch shrinks as requests
# finish (3 rows padded to 4, then 2, then 1: three shapes)
PROMPT_LENS = (230, 250, 180)
MAX_TOKENS = (40, 24, 12)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def rerun(body):
    """The CPU stand-in for a CUDA graph: 'replaying' runs the recorded step again."""
    return body


def _run(loaded, device: str, dtype: str, algorithm: str | None, *, graphs: str | None, min_prompt_len: int = 64,
         residency: str = "auto"):
    """graphs: None = eager, "rerun" = the CPU recorder, "cuda" = real CUDA graphs. algorithm None: dense."""
    sparse = None if algorithm is None else SparseConfig(
        algorithm=algorithm, token_budget=96, min_prompt_len=min_prompt_len, host_pool_gb=0.05, max_sparse_requests=4,
        residency=residency)
    llm = LLM(loaded=loaded, device=device, dtype=dtype, progress=False, sparse=sparse, max_model_len=1024,
              kv_cache_gb=0.05, cuda_graphs=graphs == "cuda")
    runner, coordinator = llm.engine.runner, llm.engine.sparse
    if graphs == "rerun" and (coordinator is None or coordinator.algorithm.graph_safe):
        runner.graphs = DecodeGraphs(torch.device(device), capture=rerun)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in MAX_TOKENS]
    outs = llm.generate(_prompts(loaded.config.vocab_size), params, use_tqdm=False)
    summary = coordinator.summary() if coordinator is not None else {}
    return [o.token_ids for o in outs], summary, runner.graphs


def _tiny(preset: str, device: str, dtype: torch.dtype):
    return random_model(ModelConfig(**PRESETS[preset]), device=torch.device(device), dtype=dtype, seed=1)


@pytest.mark.parametrize("preset,algorithm,residency", [
    ("tiny-llama", "quest", "auto"), ("tiny-llama", "quest", "host"), ("tiny-llama", "quest-mean", "host"),
    ("tiny-llama", "streaming", "auto"), ("tiny-gemma3", "quest", "host"), ("tiny-gemma3", "quest", "auto"),
    ("tiny-llama", "lowbit", "host"), ("tiny-gemma3", "lowbit", "auto")])
def test_replayed_steps_equal_eager_steps(preset, algorithm, residency):
    loaded = _tiny(preset, "cpu", torch.float32)
    eager, eager_stats, _ = _run(loaded, "cpu", "float32", algorithm, graphs=None, residency=residency)
    replayed, stats, graphs = _run(loaded, "cpu", "float32", algorithm, graphs="rerun", residency=residency)
    assert replayed == eager
    assert graphs.captures == 3  # 3 rows (padded to 4), then 2, then 1: one capture each
    assert graphs.replays > 0
    for key in ("hits", "misses", "selected_pages", "bytes_h2d", "misses_per_layer"):
        assert stats[key] == eager_stats[key], key
    if residency == "host":
        assert stats["misses"] > 0


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_replayed_dense_steps_equal_eager_steps(preset):
    loaded = _tiny(preset, "cpu", torch.float32)
    eager, _, _ = _run(loaded, "cpu", "float32", None, graphs=None)
    replayed, _, graphs = _run(loaded, "cpu", "float32", None, graphs="rerun")
    assert replayed == eager
    assert graphs.captures == 3 and graphs.captures + graphs.replays == max(MAX_TOKENS) - 1  # every decode step


def test_steps_mixing_dense_and_sparse_requests_are_captured_too():
    """The 180-token prompt runs dense (min_prompt_len 200), the others sparse: decode steps that mix
    them are captured and replayed like any other."""
    loaded = _tiny("tiny-llama", "cpu", torch.float32)
    eager, _, _ = _run(loaded, "cpu", "float32", "quest", graphs=None, min_prompt_len=200, residency="host")
    replayed, stats, graphs = _run(loaded, "cpu", "float32", "quest", graphs="rerun", min_prompt_len=200,
                                   residency="host")
    assert replayed == eager
    assert graphs.captures + graphs.replays == max(MAX_TOKENS) - 1  # every decode step


def test_every_decode_step_after_the_first_of_a_shape_is_a_replay():
    loaded = _tiny("tiny-llama", "cpu", torch.float32)
    _, stats, graphs = _run(loaded, "cpu", "float32", "quest", graphs="rerun")
    assert graphs.captures + graphs.replays == stats["decode_steps"]


def test_oracle_steps_stay_eager():
    loaded = _tiny("tiny-llama", "cpu", torch.float32)
    eager, _, _ = _run(loaded, "cpu", "float32", "oracle", graphs=None)
    out, _, graphs = _run(loaded, "cpu", "float32", "oracle", graphs="rerun")
    assert out == eager and graphs is None  # an algorithm that is not graph_safe gets no graphs


def test_a_shape_whose_capture_fails_runs_eagerly():
    """A capture that raises (an op a graph cannot hold) costs nothing but speed: the step's results
    stand, a warning says so, and later steps of that shape run eagerly."""
    loaded = _tiny("tiny-llama", "cpu", torch.float32)
    eager, eager_stats, _ = _run(loaded, "cpu", "float32", "quest", graphs=None)
    sparse = SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.05,
                          max_sparse_requests=4)
    llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, sparse=sparse, max_model_len=1024,
              kv_cache_gb=0.05)

    def failing(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(torch.device("cpu"), capture=failing)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in MAX_TOKENS]
    with pytest.warns(RuntimeWarning, match="could not capture"):
        outs = llm.generate(_prompts(loaded.config.vocab_size), params, use_tqdm=False)
    assert [o.token_ids for o in outs] == eager
    assert llm.engine.sparse.summary()["misses"] == eager_stats["misses"]
    assert runner.graphs.captures == 0 and runner.graphs.replays == 0 and len(runner.graphs._eager_only) == 3


def test_cuda_graphs_are_off_on_the_cpu():
    loaded = _tiny("tiny-llama", "cpu", torch.float32)
    sparse = SparseConfig(algorithm="quest", token_budget=96, min_prompt_len=64, host_pool_gb=0.05)
    llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, sparse=sparse, max_model_len=1024,
              kv_cache_gb=0.05)
    assert llm.engine.runner.graphs is None


@pytest.mark.parametrize("preset,algorithm,dense_first", [
    ("tiny-llama", "quest", False), ("tiny-gemma3", "quest", False), ("tiny-llama", "lowbit", False),
    ("tiny-llama", "quest", True)])
def test_rows_decoded_in_groups_equal_rows_decoded_together(monkeypatch, preset, algorithm, dense_first):
    """A captured resident step runs its rows in groups, each on its own CUDA stream
    (SparseConfig.decode_streams). Off CUDA the groups run one after another: the same coordinator
    calls on row ranges, the same attention into views of the output, so the tokens must be those
    of the rows decoded together. (dense_first: the first layer attends densely.)"""
    loaded = _tiny(preset, "cpu", torch.float32)
    from hisa.engine.step_attention import StepAttention

    def run(groups: int):
        sparse = SparseConfig(algorithm=algorithm, token_budget=96, min_prompt_len=64, max_sparse_requests=4,
                              residency="device", decode_streams=groups, dense_layers=1 if dense_first else 0)
        llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, sparse=sparse, max_model_len=1024,
                  kv_cache_gb=0.05)
        llm.engine.runner.cpu_kv = None  # every row on the paged path, grouped or not
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in MAX_TOKENS]
        outs = llm.generate(_prompts(loaded.config.vocab_size), params, use_tqdm=False)
        return [o.token_ids for o in outs]

    def grouped(self, q):
        d, n = self.decode, self.sparse.config.decode_streams
        if not d.has_sparse or d.has_host_backed or n < 2 or q.shape[0] < 2:
            return []
        cut = [q.shape[0] * i // n for i in range(n + 1)]
        grouped.steps += 1
        return [slice(a, b) for a, b in zip(cut, cut[1:])]

    grouped.steps = 0
    together = run(1)
    monkeypatch.setattr(StepAttention, "_row_groups", grouped)
    in_groups = run(2)
    assert grouped.steps > 0
    assert in_groups == together


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,algorithm,dtype,residency", [
    ("tiny-llama", "quest", torch.float32, "host"), ("tiny-llama", "quest", torch.bfloat16, "auto"),
    ("tiny-llama", "quest-mean", torch.bfloat16, "host"), ("tiny-gemma3", "quest", torch.bfloat16, "host"),
    ("tiny-gemma3", "quest", torch.float32, "auto"), ("tiny-llama", "streaming", torch.bfloat16, "host"),
    ("tiny-llama", None, torch.bfloat16, "auto"), ("tiny-gemma3", None, torch.float32, "auto"),
    ("tiny-llama", "lowbit", torch.bfloat16, "host"), ("tiny-llama", "lowbit-2bit", torch.float16, "auto"),
    ("tiny-gemma3", "lowbit", torch.bfloat16, "auto")])
def test_cuda_graph_replays_equal_eager_on_cuda(preset, algorithm, dtype, residency):
    loaded = _tiny(preset, "cuda", dtype)
    name = str(dtype).replace("torch.", "")
    eager, eager_stats, eager_graphs = _run(loaded, "cuda", name, algorithm, graphs=None, residency=residency)
    assert eager_graphs is None
    replayed, stats, graphs = _run(loaded, "cuda", name, algorithm, graphs="cuda", residency=residency)
    assert graphs.captures == 3 and graphs.replays > 0
    assert replayed == eager
    for key in ("hits", "misses", "selected_pages", "misses_per_layer"):
        assert stats.get(key) == eager_stats.get(key), key
