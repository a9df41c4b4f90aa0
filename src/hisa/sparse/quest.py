"""Quest: per-page, per-channel key min/max; a query-aware upper bound on each page's attention score."""

from __future__ import annotations

import torch

from hisa.sparse.base import BaseSparseAlgorithm, SelectionContext, register


@register("quest")
class QuestAlgorithm(BaseSparseAlgorithm):
    """Scores page p for query q by Σ_d max(q_d·min_{p,d}, q_d·max_{p,d}) ≥ max_{k∈p} q·k.

    The bounds are turned into a per-head distribution over pages (softmax of scaled bounds) and
    summed over heads, so one page list serves all heads of a request (our page table is shared).
    Representations: kmin/kmax [layers, host_pages, KVH, D] on the device, indexed by host page.
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        shape = (self.num_layers, self.num_host_pages, self.num_kv_heads, self.head_dim)
        # written by construct (prefill) or by the first update of a fresh page before any read
        self.kmin = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.kmax = torch.empty(shape, dtype=self.dtype, device=self.device)

    def metadata_bytes_per_page(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kmin.element_size()

    def construct_representations(self, layer, host_pages, keys):
        n = host_pages.numel()
        k = keys.view(n, self.page_size, self.num_kv_heads, self.head_dim).float()  # [n, S, KVH, D]
        pad = torch.isnan(k)
        self.kmin[layer, host_pages] = k.masked_fill(pad, float("inf")).amin(1).to(self.dtype)
        self.kmax[layer, host_pages] = k.masked_fill(pad, float("-inf")).amax(1).to(self.dtype)

    def update_representations(self, layer, host_pages, offsets, keys):
        first = (offsets == 0)[:, None, None]  # a fresh page starts its bounds at the new key
        k = keys.to(self.dtype)
        cur_min, cur_max = self.kmin[layer, host_pages], self.kmax[layer, host_pages]
        self.kmin[layer, host_pages] = torch.where(first, k, torch.minimum(cur_min, k))
        self.kmax[layer, host_pages] = torch.where(first, k, torch.maximum(cur_max, k))

    def retrieve_topk(self, layer, q, ctx: SelectionContext):
        r = q.shape[0]
        m = max(0, ctx.host_table.shape[1] - ctx.middle_start)
        hp, valid = self.middle_host_pages(ctx, m)  # [R, M]
        kmin = self.kmin[layer][hp].float()  # [R, M, KVH, D]
        kmax = self.kmax[layer][hp].float()
        g = self.num_heads // self.num_kv_heads
        qg = q.float().view(r, 1, self.num_kv_heads, g, self.head_dim)  # [R, 1, KVH, G, D]
        bound = torch.maximum(qg * kmin[:, :, :, None, :], qg * kmax[:, :, :, None, :]).sum(-1)  # [R, M, KVH, G]
        bound = (bound * self.scale).masked_fill(~valid[:, :, None, None], float("-inf"))
        mass = torch.softmax(bound, dim=1).nan_to_num(0.0).sum(dim=(2, 3))  # [R, M]
        return self.topk_from_scores(mass.masked_fill(~valid, float("-inf")), ctx)
