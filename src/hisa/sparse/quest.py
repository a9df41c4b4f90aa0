"""Quest: per-page, per-channel key min/max; a query-aware upper bound on each page's attention score.

Also `quest-mean`, which adds each page's mean key: the bound says how high a page *could* score,
the mean how it scores on average, and ranking by both keeps retrieval heads on their page far more
often on small models (docs/eval.md has the numbers, bench/selection_recall.py the per-layer recall).
"""

from __future__ import annotations

import torch

from hisa.ops import pdl
from hisa.sparse.base import BaseSparseAlgorithm, DecodeRows, register
from hisa.sparse.page_scores import page_scores, select_pages


@register("quest")
class QuestAlgorithm(BaseSparseAlgorithm):
    """Scores page p for query q by Σ_d max(q_d·min_{p,d}, q_d·max_{p,d}) ≥ max_{k∈p} q·k.

    The bounds are turned into a per-head distribution over pages (softmax of scaled bounds) and
    summed over heads, so one page list serves all heads of a request (our page table is shared).
    Representations: kmin/kmax [layers, slots + 1, max_pages, KVH, D] on the device, indexed by
    (sparse slot, logical page). Scoring and top-k for the whole batch: three Triton kernels per
    layer (`hisa.sparse.page_scores`: logits + softmax partials, scores, top-k select); the update
    after attention: one kernel.
    """

    writes_layout = True  # select_pages lays resident rows out (rows.layout)
    graph_safe = True  # device tensors only, no host sync: decode steps can be replayed from CUDA graphs
    has_mean = False

    def __init__(self, **kw):
        super().__init__(**kw)
        shape = (self.num_layers, self.max_requests + 1, self.max_pages, self.num_kv_heads, self.head_dim)
        # written by construct (prefill) or by the first update of a fresh page before any read
        self.kmin = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.kmax = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.kmean = torch.empty(shape, dtype=self.dtype, device=self.device) if self.has_mean else None

    def _summaries(self) -> list[torch.Tensor]:
        return [self.kmin, self.kmax] + ([self.kmean] if self.has_mean else [])

    def metadata_bytes_per_page(self) -> int:
        return len(self._summaries()) * self.num_layers * self.num_kv_heads * self.head_dim * self.kmin.element_size()

    def construct_representations(self, layer, slot, first_page, keys):
        n = keys.shape[0] // self.page_size
        k = keys.view(n, self.page_size, self.num_kv_heads, self.head_dim).float()  # [n, S, KVH, D]
        pad = torch.isnan(k)
        pages = slice(first_page, first_page + n)
        self.kmin[layer, slot, pages] = k.masked_fill(pad, float("inf")).amin(1).to(self.dtype)
        self.kmax[layer, slot, pages] = k.masked_fill(pad, float("-inf")).amax(1).to(self.dtype)
        if self.has_mean:
            self.kmean[layer, slot, pages] = k.nanmean(1).to(self.dtype)  # the tail of a partial page is NaN

    def update_representations(self, layer, rows: DecodeRows, keys):
        quest_update(self.kmin[layer], self.kmax[layer], self.kmean[layer] if self.has_mean else None, keys,
                     rows.sparse_slots, rows.t, page_size=self.page_size, sentinel=self.max_requests)

    def retrieve_topk(self, layer, q, rows: DecodeRows):
        scores = page_scores(q, self.kmin[layer], self.kmax[layer], rows.sparse_slots, rows.lo, rows.hi,
                             scale=self.scale, kmean=self.kmean[layer] if self.has_mean else None)
        return select_pages(scores, rows.lo, rows.hi, rows.num_select, layout=rows.layout)  # in page order


@register("quest-mean")
class QuestMeanAlgorithm(QuestAlgorithm):
    """Quest's bound plus each page's mean key.

    Per query head, two distributions over the middle pages: softmax of Quest's upper bounds and
    softmax of q·mean(k) (the page's average logit). Their sum, summed over heads, ranks the pages.
    The bound alone favours pages whose keys merely *spread* wide in a channel the query weights;
    the mean alone misses pages where one key stands out. Both are exact for a page of one token.
    Representations: kmin/kmax/kmean (1.5x Quest's metadata); the mean is a running mean over the
    page's tokens (offset + 1 of them after an update).
    """

    has_mean = True


def quest_update(kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor | None, keys: torch.Tensor,
                 sparse_slots: torch.Tensor, t: torch.Tensor, *, page_size: int, sentinel: int,
                 use_triton: bool | None = None) -> None:
    """Fold each row's new key into its page's summaries, in place (one layer).

    kmin/kmax/kmean: [SS, MAXP, KVH, D]; keys: [R, KVH, D] (rows may be strided); sparse_slots, t:
    int32 [R]. Row r's key is token t - 1 of its request: page (t - 1) // S of slot sparse_slots[r];
    a page's first token (offset 0) resets the summaries to the key. Rows of the sentinel slot or
    with t == 0 are skipped. One Triton launch on CUDA (no sync), the torch reference elsewhere.
    """
    R = keys.shape[0]
    if R == 0:
        return
    if keys.stride(2) != 1 or keys.stride(1) != keys.shape[2]:
        raise ValueError(f"keys must be contiguous within a row, got strides {keys.stride()}")
    if use_triton is None:
        use_triton = keys.is_cuda
    if use_triton:
        from hisa.sparse.triton_quest_update import quest_update_kernel

        kd = keys.shape[1] * keys.shape[2]
        quest_update_kernel[(R,)](
            keys, kmin, kmax, kmean if kmean is not None else kmin, sparse_slots, t,
            keys.stride(0), kmin.stride(0), kmin.stride(1), sentinel,
            S=page_size, KD=kd, BLOCK=1 << max(0, kd - 1).bit_length(), HAS_MEAN=kmean is not None,
            num_warps=4 if kd >= 512 else 1, **pdl.launch_kwargs(keys, "kv_write"))
        return
    keep = (sparse_slots != sentinel) & (t > 0)
    s, tt = sparse_slots[keep].long(), t[keep].long()
    page, off = (tt - 1) // page_size, (tt - 1) % page_size
    k = keys[keep].float()
    first = (off == 0)[:, None, None]  # a fresh page starts its summaries at the new key
    lo, hi = kmin[s, page].float(), kmax[s, page].float()
    kmin[s, page] = torch.where(first, k, torch.minimum(lo, k)).to(kmin.dtype)
    kmax[s, page] = torch.where(first, k, torch.maximum(hi, k)).to(kmax.dtype)
    if kmean is not None:
        cur = kmean[s, page].float()
        mean = cur + (k - cur) / (off + 1).float()[:, None, None]
        kmean[s, page] = torch.where(first, k, mean).to(kmean.dtype)
