"""CUDA graphs for decode steps.

Every kernel of a decode step takes its shapes from the padded row count and its values from the
static decode buffers (`hisa.engine.decode_batch`), with no host sync, so the whole step (the
per-step preparation, the model, the sparse hooks of every layer) is captured once per shape and
replayed. A shape is (padded rows, any sparse rows, any host-backed rows): rows are padded to a
few bucket sizes, page tables always have the engine's full width and kernels read each row's
real length on the device, so the number of captures does not grow with the context or with the
batch sizes a server sees.

The first step of a shape runs eagerly (that run is also the warm-up: Triton kernels compiled,
cuBLAS workspaces made) and is then captured: recording launches nothing, so the step's state
writes (KV pages, LRU state, representations, the clock) happen once. Later steps of the shape
only copy their rows into the buffers (one pinned copy, done by the caller) and replay.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch


class DecodeGraphs:
    """Captures and replays decode steps, one per shape key.

    `capture(body)` records `body` (a no-argument function running the step on the static buffers
    and returning the hidden states) and returns a function that replays it. The default records a
    CUDA graph; tests pass one that re-runs `body` eagerly to check the bookkeeping on the CPU.

    Example (what `ModelRunner.run` does)::

        graphs = DecodeGraphs(device)
        hidden = graphs.run(key, body)   # eager the first time per key, then replays
    """

    def __init__(self, device: torch.device, *, max_graphs: int = 32, capture: Callable | None = None):
        self.device = device
        self.max_graphs = max_graphs
        self._capture_fn = capture or self._capture_cuda_graph
        self._graphs: OrderedDict[tuple, Callable[[], torch.Tensor]] = OrderedDict()
        self._eager_only: set[tuple] = set()  # shapes whose capture failed: they run eagerly
        self._pool = None
        self.captures = 0  # steps captured so far (a new shape each)
        self.replays = 0  # steps served by a replay

    def run(self, key: tuple, body: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Hidden states of the step: a replay of `key`'s graph, or `body()` run eagerly (then captured)."""
        replay = self._graphs.get(key)
        if replay is not None:
            self._graphs.move_to_end(key)
            self.replays += 1
            return replay()
        hidden = body()  # the real step
        if key not in self._eager_only:
            try:
                self._graphs[key] = self._capture_fn(body)
                self.captures += 1
            except Exception as e:  # the eager step already ran: keep its results, run this shape eagerly
                self._eager_only.add(key)
                warnings.warn(f"hisa: could not capture a decode step of shape {key} in a CUDA graph "
                              f"({type(e).__name__}: {e}); steps of that shape run eagerly", RuntimeWarning,
                              stacklevel=2)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        return hidden

    def close(self) -> None:
        """Drop every captured graph and its memory pool."""
        self._graphs.clear()
        self._pool = None

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
