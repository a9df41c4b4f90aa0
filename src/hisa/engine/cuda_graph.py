"""CUDA graphs for sparse decode steps.

A sparse decode step launches a few thousand small kernels from Python (per layer: the model's
projections and norms, the algorithm's page scores and top-k, compose, the LRU diff, the miss
loads, the page-table gather, the paged attention, the representation update), so without graphs
it is bound by the host, not the GPU (bench/results/sparse_decode_profile_gpu.txt). Every kernel of
that chain reads its shapes from the batch and its values from device tensors, with no host sync,
so the whole forward of a step can be captured once and replayed.

A captured step is tied to its shapes: the number of decode rows R and the width of the host
page table the selection reads (`SparseCoordinator.table_width_bucket`, a power of two, so a
context can double before the step is captured again). The first step of a (R, width) pair runs
eagerly, as it would without graphs (that run is also the warm-up: Triton kernels compiled,
cuBLAS workspaces made), and is then captured; later steps of the pair copy their inputs (token
ids, positions, the sparse plan) into the captured tensors and replay. What the step writes
(device KV buffer, LRU state, representations, the staged new K/V) lands in the same persistent
tensors as in eager mode, and the host-side end of the step (offload to the host pool, stats)
runs after the replay exactly as before, so a graph replay and an eager step compute the same
thing (tests/engine/test_cuda_graph.py checks greedy tokens against eager on CUDA).

Steps that mix in prefills or dense requests, and algorithms that read host memory (oracle),
run eagerly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    replay: Callable[[], torch.Tensor]  # runs the step on the static tensors, returns hidden [R, hidden]
    input_ids: torch.Tensor  # int64 [R] (static)
    positions: torch.Tensor  # int64 [R] (static)
    plan: object  # the coordinator's _DecodePlan whose tensors the step reads
    misses: torch.Tensor  # int64 [layers] the step accumulates into


class SparseDecodeGraphs:
    """Captures and replays the model forward of pure sparse-decode steps.

    `capture(body)` records `body` (a no-argument function running the step's forward on the
    static tensors and returning the hidden states) and returns a function that replays it and
    returns the hidden states, having set the coordinator's staged K/V. The default records a
    CUDA graph; tests pass one that re-runs `body` eagerly to check the bookkeeping on the CPU.

    Example (what `ModelRunner.run` does)::

        graphs = SparseDecodeGraphs(model, coordinator, max_model_len=32768)
        if graphs.eligible(batch):
            hidden = graphs.forward(plan, attn)   # eager the first time per shape, then replays
    """

    def __init__(self, model: torch.nn.Module, sparse, *, max_model_len: int, max_graphs: int = 32,
                 capture: Callable | None = None):
        self.model, self.sparse, self.max_model_len = model, sparse, max_model_len
        self.max_graphs = max_graphs
        self._capture_fn = capture or self._capture_cuda_graph
        self._graphs: OrderedDict[tuple[int, int], _Captured] = OrderedDict()
        self._pool = None
        self.captures = 0  # steps captured so far (a new shape each)
        self.replays = 0  # steps served by a replay

    def eligible(self, batch) -> bool:
        """A step whose every request is a sparse decode (one new token after a computed context)."""
        if not self.sparse.graph_safe:
            return False
        return all(seq.sparse and n == 1 and seq.num_computed > 0
                   for seq, n in zip(batch.seqs, batch.num_new_tokens))

    def forward(self, plan, attn) -> torch.Tensor:
        """Hidden states [R, hidden] of the step (`attn` is the coordinator after forward_begin)."""
        key = self.sparse.graph_key()
        entry = self._graphs.get(key)
        if entry is None:
            hidden = self.model(plan.input_ids, plan.positions, attn, plan.max_position)  # the real step
            self._capture(key, plan, attn)
            return hidden
        self._graphs.move_to_end(key)
        entry.input_ids.copy_(plan.input_ids, non_blocking=True)
        entry.positions.copy_(plan.positions, non_blocking=True)
        self.sparse.bind_decode_state(entry.plan, entry.misses)
        self.replays += 1
        return entry.replay()

    def _capture(self, key, plan, attn) -> None:
        """Record the step just run (same inputs, same state tensors); nothing runs a second time.

        The step's state writes were done by its eager run; recording launches nothing, so nothing
        is applied twice. The eager run's staged K/V and miss counts stay the step's for forward_end.
        """
        sparse = self.sparse
        eager_staged, eager_misses = sparse.staged, sparse.misses
        for rope in (getattr(self.model, "rope", None), getattr(self.model, "rope_local", None)):
            if rope is not None:  # the rotary tables must not grow inside the graph
                rope._ensure(self.max_model_len, plan.input_ids.device)
        ids, pos = plan.input_ids.clone(), plan.positions.clone()
        misses = torch.zeros_like(eager_misses)
        d = sparse.decode_plan
        sparse.staged = []
        sparse.bind_decode_state(d, misses)
        max_position = plan.max_position
        replay = self._capture_fn(lambda: self.model(ids, pos, attn, max_position))
        self._graphs[key] = _Captured(replay=replay, input_ids=ids, positions=pos, plan=d, misses=misses)
        sparse.staged, sparse.misses = eager_staged, eager_misses
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

    def _capture_cuda_graph(self, body: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every captured shape
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = body()
        staged = list(self.sparse.staged)  # the tensors the graph writes the new K/V into

        def replay() -> torch.Tensor:
            graph.replay()
            self.sparse.staged = list(staged)
            return hidden

        return replay
