"""CUDA graphs for decode steps (dense and sparse).

A decode step launches many small kernels from Python; a sparse one a few thousand (per layer: the
model's projections and norms, the algorithm's page scores and top-k, compose, the LRU diff, the
miss loads, the page-table gather, the paged attention, the representation update), so without
graphs it is bound by the host, not the GPU (bench/results/sparse_decode_profile_gpu.txt). Every
kernel of a decode step reads its shapes from the batch and its values from device tensors, with
no host sync, so the model forward of a step can be captured once and replayed.

A captured step is tied to its shapes: for a sparse step, the number of decode rows and the width
of the host page table its selection reads; for a dense step, the batch size and the width of its
page table. With graphs on, both widths are rounded up by `width_bucket`, so a context doubles
before a step is captured again. The first step of a shape
runs eagerly, as it would without graphs (that run is also the warm-up: Triton kernels compiled,
cuBLAS workspaces made), and is then captured; later steps of the shape copy their inputs (token
ids, positions, the dense step plan, the sparse plan) into the captured tensors and replay. What a
step writes (the KV cache, the sparse buffer, LRU state and representations, the staged new K/V)
lands in the same persistent tensors as in eager mode, and the host-side end of a sparse step
(offload to the host pool, stats) runs after the replay as before, so a replay computes what an
eager step computes (tests/engine/test_cuda_graph.py compares greedy tokens with eager runs).

Steps with prefill chunks, steps mixing dense and sparse requests, and algorithms that read host
memory (oracle) run eagerly.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

def width_bucket(width: int, limit: int) -> int:
    """`width` rounded up to a power of two, at least 16 and at most `limit`: the page-table widths
    captured steps are tied to, so a context doubles before a step is captured again."""
    bucket = 16
    while bucket < width:
        bucket *= 2
    return min(bucket, limit)


# the StepPlan fields a captured step reads (copied in before each replay)
_STEP_PLAN_FIELDS = ("input_ids", "positions", "write_rows", "write_pages", "write_offsets", "decode_rows",
                     "decode_page_table", "decode_kv_lens")


@dataclass
class _Captured:
    replay: Callable[[], torch.Tensor]  # runs the step on the static tensors, returns hidden [T, hidden]
    plan: object  # the StepPlan whose tensors the step reads
    sparse_plan: object | None = None  # sparse steps: the coordinator's _DecodePlan the step reads
    misses: torch.Tensor | None = None  # sparse steps: int64 [layers] the step accumulates into


class DecodeGraphs:
    """Captures and replays the model forward of pure decode steps (all dense or all sparse).

    `capture(body)` records `body` (a no-argument function running the step's forward on the
    static tensors and returning the hidden states) and returns a function that replays it and
    returns the hidden states, having set a sparse coordinator's staged K/V. The default records a
    CUDA graph; tests pass one that re-runs `body` eagerly to check the bookkeeping on the CPU.

    Example (what `ModelRunner.run` does)::

        graphs = DecodeGraphs(model, coordinator_or_None, max_model_len=32768)
        if graphs.eligible(batch, attn):
            hidden = graphs.forward(plan, attn)   # eager the first time per shape, then replays
    """

    def __init__(self, model: torch.nn.Module, sparse=None, *, max_model_len: int, max_graphs: int = 32,
                 capture: Callable | None = None):
        self.model, self.sparse, self.max_model_len = model, sparse, max_model_len
        self.max_graphs = max_graphs
        self._capture_fn = capture or self._capture_cuda_graph
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._eager_only: set[tuple] = set()  # shapes whose capture failed: they run eagerly
        self._pool = None
        self.device = next(model.parameters()).device
        if sparse is not None:  # captured sparse steps read a rounded table width (eager ones exact)
            sparse.round_table_widths = sparse.graph_safe
        self.captures = 0  # steps captured so far (a new shape each)
        self.replays = 0  # steps served by a replay

    def eligible(self, batch, attn) -> bool:
        """A step whose every request decodes one token after a computed context, all dense (and
        `attn` the dense attention) or all sparse with a graph-safe algorithm."""
        if not all(n == 1 and seq.num_computed > 0 for seq, n in zip(batch.seqs, batch.num_new_tokens)):
            return False
        if self.sparse is not None and attn is self.sparse:
            return self.sparse.graph_safe and all(seq.sparse for seq in batch.seqs)
        return not any(seq.sparse for seq in batch.seqs)

    def forward(self, plan, attn) -> torch.Tensor:
        """Hidden states [T, hidden] of the step (`attn`: the step's DenseAttention, or the coordinator
        after forward_begin)."""
        sparse_step = self.sparse is not None and attn is self.sparse
        if sparse_step:
            key = ("sparse", *self.sparse.graph_key())
        else:
            key = ("dense", *plan.decode_page_table.shape)
        entry = self._graphs.get(key)
        if entry is None:
            hidden = self.model(plan.input_ids, plan.positions, attn, plan.max_position)  # the real step
            if key not in self._eager_only:
                self._capture(key, plan, attn, sparse_step)
            return hidden
        self._graphs.move_to_end(key)
        for name in _STEP_PLAN_FIELDS:
            getattr(entry.plan, name).copy_(getattr(plan, name), non_blocking=True)
        if sparse_step:
            self.sparse.bind_decode_state(entry.sparse_plan, entry.misses)
        self.replays += 1
        return entry.replay()

    def _capture(self, key, plan, attn, sparse_step: bool) -> None:
        """Record the step just run (same inputs, same state tensors); nothing runs a second time.

        The step's state writes were done by its eager run; recording launches nothing, so nothing
        is applied twice. A sparse step's staged K/V and miss counts stay the eager run's for
        forward_end. The step's own plan (and sparse plan) become the captured tensors.
        """
        for rope in (getattr(self.model, "rope", None), getattr(self.model, "rope_local", None)):
            if rope is not None:  # the rotary tables must not grow inside the graph
                rope._ensure(self.max_model_len, plan.input_ids.device)
        entry = _Captured(replay=None, plan=plan)
        sparse = self.sparse if sparse_step else None
        if sparse is not None:  # the eager run's staged K/V and miss counts stay the step's (forward_end)
            eager_staged, eager_misses = sparse.staged, sparse.misses
            entry.sparse_plan, entry.misses = sparse.decode_plan, torch.zeros_like(eager_misses)
            sparse.staged, sparse.misses = [], entry.misses
        max_position = plan.max_position
        try:
            replay = self._capture_fn(lambda: self.model(plan.input_ids, plan.positions, attn, max_position))
            captured_staged = list(sparse.staged) if sparse is not None else []  # where a graph writes new K/V
        except Exception as e:  # the eager step already ran: keep its results, run this shape eagerly
            self._eager_only.add(key)
            warnings.warn(f"hisa: could not capture a decode step of shape {key} in a CUDA graph "
                          f"({type(e).__name__}: {e}); steps of that shape run eagerly", RuntimeWarning, stacklevel=2)
            return
        finally:
            if sparse is not None:
                sparse.staged, sparse.misses = eager_staged, eager_misses
        if sparse is not None:
            def replay_sparse(inner=replay) -> torch.Tensor:
                sparse.staged = list(captured_staged)
                return inner()

            replay = replay_sparse
        entry.replay = replay
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

    def _capture_cuda_graph(self, body: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every captured shape
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):  # the model's GPU, whichever is current
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=self._pool):
                hidden = body()

        def replay() -> torch.Tensor:
            with torch.cuda.device(self.device):
                graph.replay()
            return hidden

        return replay
