"""The selection side of the sparse cache: `BaseSparseAlgorithm` and its registry.

An algorithm keeps compact per-page representations on the device and, each decode step and
layer, picks which LOGICAL pages of each request attention should read. It never sees physical
slots or moves KV: the SparseKVCacheManager and the BackendAdaptor do that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
    from hisa.sparse import oracle, quest, streaming  # noqa: F401  (registration side effect)


@dataclass
class SelectionContext:
    """What `retrieve_topk` may read for one layer of one step (device tensors, R = sparse decode rows).

    host_table: int64 [R, max_pages] host pool page of each logical page (-1 past the end).
    middle_start: first selectable logical page (after the sinks), the same for every row.
    middle_end: int64 [R] one past the last selectable page (the recent window starts there).
    num_select: how many middle pages to return per row (K).
    host_keys: the layer's keys in the host pool, [host_pages, S, KVH, D] (only oracle reads them).
    num_valid_tokens: int64 [R] tokens in the context (for masking the partial last page).
    """

    host_table: torch.Tensor
    middle_start: int
    middle_end: torch.Tensor
    num_select: int
    host_keys: torch.Tensor | None = None
    num_valid_tokens: torch.Tensor | None = None


class BaseSparseAlgorithm:
    """Selection policy. Subclasses override the three hooks they need; the defaults do nothing.

    Shapes: q [R, H, D]; keys [T, KVH, D]; host pages are int64 ids into the host pool.
    `retrieve_topk` returns int64 [R, K] LOGICAL page ids in [middle_start, middle_end), best
    first, padded with -1 at the end of each row.
    """

    name = "base"
    # Opt in (True) when retrieve_topk / update_representations run only device work, with no host
    # sync and no Python state that changes between steps, so a decode step can be captured in a
    # CUDA graph (hisa.engine.cuda_graph) and replayed; the default keeps an algorithm eager.
    graph_safe = False

    def __init__(self, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 num_host_pages: int, device: torch.device, dtype: torch.dtype):
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.head_dim, self.page_size, self.num_host_pages = head_dim, page_size, num_host_pages
        self.device, self.dtype = device, dtype
        self.scale = head_dim ** -0.5

    def metadata_bytes_per_page(self) -> int:
        """Device bytes of representations per logical page, all layers (counts toward the budget)."""
        return 0

    def construct_representations(self, layer: int, host_pages: torch.Tensor, keys: torch.Tensor) -> None:
        """After prefill wrote `keys` [len(host_pages) * S, KVH, D] (page-aligned, the tail of the last
        page padded with NaN) into `host_pages` int64 [n]: build their representations."""

    def update_representations(self, layer: int, host_pages: torch.Tensor, offsets: torch.Tensor,
                               keys: torch.Tensor) -> None:
        """Fold one new key per row into its page: host_pages, offsets int64 [R]; keys [R, KVH, D]."""

    def retrieve_topk(self, layer: int, q: torch.Tensor, ctx: SelectionContext) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must implement retrieve_topk")

    # -- shared helper --------------------------------------------------------------------------
    def topk_from_scores(self, scores: torch.Tensor, ctx: SelectionContext) -> torch.Tensor:
        """scores: fp32 [R, M] for middle pages middle_start + j (invalid pages may hold anything).

        Masks pages past middle_end, returns the K best as logical ids, -1 where fewer exist.
        """
        r, m = scores.shape
        j = torch.arange(m, device=scores.device)
        valid = (ctx.middle_start + j)[None, :] < ctx.middle_end[:, None]  # [R, M]
        scores = scores.masked_fill(~valid, float("-inf"))
        k = min(ctx.num_select, m)
        if k == 0:
            return torch.full((r, ctx.num_select), -1, dtype=torch.int64, device=scores.device)
        vals, idx = scores.topk(k, dim=-1, sorted=True)  # valid pages (finite) come first
        pages = torch.where(torch.isfinite(vals), idx + ctx.middle_start, torch.full_like(idx, -1))
        if k < ctx.num_select:
            pad = torch.full((r, ctx.num_select - k), -1, dtype=torch.int64, device=scores.device)
            pages = torch.cat([pages, pad], dim=1)
        return pages

    def middle_host_pages(self, ctx: SelectionContext, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host pages of the middle range, [R, m] (clamped to 0 where invalid), and the valid mask."""
        cols = ctx.middle_start + torch.arange(m, device=ctx.host_table.device)
        hp = ctx.host_table[:, ctx.middle_start:ctx.middle_start + m]
        valid = (cols[None, :] < ctx.middle_end[:, None]) & (hp >= 0)
        return hp.clamp(min=0), valid
