"""StreamingLLM: attention sinks plus the most recent pages; nothing query-dependent."""

from __future__ import annotations

import torch

from hisa.sparse.base import BaseSparseAlgorithm, DecodeRows, register


@register("streaming")
class StreamingAlgorithm(BaseSparseAlgorithm):
    """Selects the latest middle pages, so the budget becomes sinks + one long recent window."""

    graph_safe = True  # device tensors only, no host sync

    def retrieve_topk(self, layer, q, rows: DecodeRows):
        k = rows.num_select
        n_mid = torch.clamp(rows.hi - rows.lo, max=k).long()  # [R] pages a row attends from the middle
        return (rows.hi.long() - n_mid)[:, None] + torch.arange(k, device=q.device)[None, :]  # oldest first
