"""Quest: per-page, per-channel key min/max; a query-aware upper bound on each page's attention score.

Also `quest-mean`, which adds each page's mean key: the bound says how high a page *could* score,
the mean how it scores on average, and ranking by both keeps retrieval heads on their page far more
often on small models (docs/eval.md has the numbers, bench/selection_recall.py the per-layer recall).
"""

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

    graph_safe = True  # device tensors only, no host sync: decode steps can be replayed from CUDA graphs

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

    def page_logits(self, layer: int, q: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
        """Quest's scaled upper bound of each page's best logit, per query head: fp32 [R, M, KVH, G]."""
        r, m = hp.shape
        g = self.num_heads // self.num_kv_heads
        kmin = self.kmin[layer][hp].float()  # [R, M, KVH, D]
        kmax = self.kmax[layer][hp].float()
        qg = q.float().view(r, 1, self.num_kv_heads, g, self.head_dim)  # [R, 1, KVH, G, D]
        return torch.maximum(qg * kmin[:, :, :, None, :], qg * kmax[:, :, :, None, :]).sum(-1) * self.scale

    def page_mass(self, layer: int, q: torch.Tensor, hp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Each page's score for the shared list: per head a softmax over the valid pages, summed over
        heads. hp, valid: [R, M] → fp32 [R, M] (invalid pages hold 0)."""
        bound = self.page_logits(layer, q, hp).masked_fill(~valid[:, :, None, None], float("-inf"))
        return torch.softmax(bound, dim=1).nan_to_num(0.0).sum(dim=(2, 3))

    def retrieve_topk(self, layer, q, ctx: SelectionContext):
        m = max(0, ctx.host_table.shape[1] - ctx.middle_start)
        hp, valid = self.middle_host_pages(ctx, m)  # [R, M]
        mass = self.page_mass(layer, q, hp, valid)
        return self.topk_from_scores(mass.masked_fill(~valid, float("-inf")), ctx)


@register("quest-mean")
class QuestMeanAlgorithm(QuestAlgorithm):
    """Quest's bound plus each page's mean key.

    Per query head, two distributions over the middle pages: softmax of Quest's upper bounds and
    softmax of q·mean(k) (the page's average logit). Their sum, summed over heads, ranks the pages.
    The bound alone favours pages whose keys merely *spread* wide in a channel the query weights;
    the mean alone misses pages where one key stands out. Both are exact for a page of one token.
    Representations: kmin/kmax/kmean [layers, host_pages, KVH, D] (1.5x Quest's metadata).
    The mean is kept as a running mean over the page's tokens (offset + 1 of them after an update).
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self.kmean = torch.empty_like(self.kmin)

    def metadata_bytes_per_page(self) -> int:
        return 3 * self.num_layers * self.num_kv_heads * self.head_dim * self.kmin.element_size()

    def construct_representations(self, layer, host_pages, keys):
        super().construct_representations(layer, host_pages, keys)
        k = keys.view(host_pages.numel(), self.page_size, self.num_kv_heads, self.head_dim).float()
        self.kmean[layer, host_pages] = k.nanmean(1).to(self.dtype)  # the tail of a partial page is NaN

    def update_representations(self, layer, host_pages, offsets, keys):
        super().update_representations(layer, host_pages, offsets, keys)
        w = (1.0 / (offsets + 1).float())[:, None, None]
        cur, k = self.kmean[layer, host_pages].float(), keys.float()
        first = (offsets == 0)[:, None, None]  # a fresh page: the mean is the key (the slot holds garbage)
        self.kmean[layer, host_pages] = torch.where(first, k, cur + (k - cur) * w).to(self.dtype)

    def page_mass(self, layer, q, hp, valid):
        mean = self.mean_logits(layer, q, hp).masked_fill(~valid[:, :, None, None], float("-inf"))
        return super().page_mass(layer, q, hp, valid) + torch.softmax(mean, dim=1).nan_to_num(0.0).sum((2, 3))

    def mean_logits(self, layer: int, q: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
        """Each page's average logit q·mean(k) · scale, per query head: fp32 [R, M, KVH, G]."""
        g = self.num_heads // self.num_kv_heads
        qg = q.float().view(q.shape[0], self.num_kv_heads, g, self.head_dim)
        return torch.einsum("rmkd,rkgd->rmkg", self.kmean[layer][hp].float(), qg) * self.scale
