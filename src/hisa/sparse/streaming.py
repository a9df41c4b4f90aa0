"""StreamingLLM: attention sinks plus the most recent pages; nothing query-dependent."""

from __future__ import annotations

import torch

from hisa.sparse.base import BaseSparseAlgorithm, SelectionContext, register


@register("streaming")
class StreamingAlgorithm(BaseSparseAlgorithm):
    """Selects the latest middle pages, so the budget becomes sinks + one long recent window."""

    graph_safe = True  # device tensors only, no host sync

    def retrieve_topk(self, layer, q, ctx: SelectionContext):
        k = ctx.num_select
        offs = torch.arange(k, 0, -1, device=ctx.middle_end.device)  # K..1
        pages = ctx.middle_end[:, None] - offs[None, :]  # [R, K] the K pages before the window
        pages = torch.where(pages >= ctx.middle_start, pages, torch.full_like(pages, -1))
        # valid first: rows with few pages have their -1s at the front; move them to the back
        order = torch.argsort((pages < 0).to(torch.int8), dim=1, stable=True)
        return pages.gather(1, order)
