"""The selection side of the sparse cache: `BaseSparseAlgorithm` and its registry.

An algorithm keeps compact per-page representations on the device and, each decode step and
layer, picks which LOGICAL pages of each request attention should read. It never sees physical
pages or moves KV: the SparseKVCacheManager and the BackendAdaptor do that. Representations are
indexed by (sparse slot, logical page), so they stay valid whichever tier holds the KV (a resident
request that is demoted to the host pool keeps them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hisa.sparse.page_scores import TableLayout

_REGISTRY: dict[str, type["BaseSparseAlgorithm"]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make an algorithm available by name (`SparseConfig(algorithm=name)`)."""

    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_algorithms() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def create_algorithm(name: str, **kwargs) -> "BaseSparseAlgorithm":
    _import_builtin()
    return _REGISTRY[name](**kwargs)


def _import_builtin() -> None:
    from hisa.sparse import dsa, lowbit, oracle, quest, streaming  # noqa: F401  (registration side effect)


@dataclass
class DecodeRows:
    """The sparse side of one decode step, shared by every layer (device tensors, R = padded rows).

    sparse_slots: int32 [R] each row's sparse slot (a sentinel row for dense and padding rows).
    t: int32 [R] tokens of each row's context once this step's token is written.
    lo, hi: int32 [R] each row's middle range [lo, hi) of logical pages to choose from (empty for
      rows that do not select: dense rows, padding).
    num_select: how many middle pages a row attends (K).
    page_keys: only for algorithms that read the exact keys (oracle): page_keys(layer) -> keys of
      every context page of every row, [R, P, S, KVH, D] (from the device or the host pool).
    """

    sparse_slots: torch.Tensor
    t: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    num_select: int
    page_keys: Callable[[int], torch.Tensor] | None = None
    layout: TableLayout | None = None  # a step without host-backed rows: where select_pages may also lay
    # the resident rows out for attention (algorithms with writes_layout = True pass it on)


class BaseSparseAlgorithm:
    """Selection policy. Subclasses override the hooks they need; the defaults keep nothing.

    Shapes: q [R, H, D]; keys [T, KVH, D]. `retrieve_topk` returns [R, num_select] LOGICAL page
    ids (int32 or int64): the first min(num_select, hi - lo) entries of a row must be distinct pages
    of [lo, hi), in any order (later entries are ignored). `scale` is the model's attention scale (Gemma-3 uses
    query_pre_attn_scalar ** -0.5, not head_dim ** -0.5), so scores match attention's.
    """

    name = "base"
    # Opt in (True) when retrieve_topk / update_representations run only device work, with no host
    # sync and no Python state that changes between steps, so a decode step can be captured in a
    # CUDA graph (hisa.engine.cuda_graph) and replayed; the default keeps an algorithm eager.
    graph_safe = False
    # retrieve_topk hands rows.layout to select_pages, which then writes the resident rows' attention
    # table itself (the coordinator skips the adaptor's compose launch)
    writes_layout = False
    # False: the algorithm picks no middle pages (sinks + recent window only, e.g. streaming)
    selects = True
    # True: retrieve_topk returns TOKEN positions (DSA's indexer), which the adaptor maps to the pages
    # holding them; False: logical page ids in the [sinks | picks | recent] layout
    token_level = False

    def __init__(self, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 max_requests: int, max_pages: int, scale: float, device: torch.device, dtype: torch.dtype):
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.head_dim, self.page_size = head_dim, page_size
        self.max_requests, self.max_pages = max_requests, max_pages  # slots: max_requests + 1 (sentinel)
        self.device, self.dtype, self.scale = device, dtype, scale

    def metadata_bytes_per_page(self) -> int:
        """Device bytes of representations per logical page, all layers (counts toward the budget)."""
        return 0

    def construct_representations(self, layer: int, slot: int, first_page: int, keys: torch.Tensor) -> None:
        """After prefill wrote logical pages first_page.. of the request in `slot`: keys
        [n * S, KVH, D] of those pages (page-aligned, the tail of the last page NaN)."""

    def update_representations(self, layer: int, rows: DecodeRows, keys: torch.Tensor) -> None:
        """Fold each row's new key (keys [R, KVH, D], at token t - 1) into its page; skip rows with
        rows.sparse_slots == the sentinel."""

    def retrieve_topk(self, layer: int, q: torch.Tensor, rows: DecodeRows) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement retrieve_topk")

    # -- shared helper --------------------------------------------------------------------------
    @staticmethod
    def topk_of(scores: torch.Tensor, num_select: int) -> torch.Tensor:
        """scores fp32 [R, P] (-inf outside each row's middle range) -> int64 [R, num_select] pages."""
        k = min(num_select, scores.shape[1])
        idx = scores.topk(k, dim=1, sorted=True).indices
        if k < num_select:
            idx = torch.cat([idx, idx.new_full((idx.shape[0], num_select - k), -1)], dim=1)
        return idx
