"""Oracle: exact top-k pages by true attention mass (the accuracy upper bound; reads every key)."""

from __future__ import annotations

import torch

from hisa.sparse.base import BaseSparseAlgorithm, DecodeRows, register


@register("oracle")
class OracleAlgorithm(BaseSparseAlgorithm):
    """Computes softmax(q·k) over every token of the middle range and ranks pages by their mass
    (summed over heads). It reads all keys of the layer each step (from the host pool for a
    host-backed request), so it moves O(context) bytes: use it to measure what a perfect selector
    would reach, not for speed."""

    def retrieve_topk(self, layer, q, rows: DecodeRows):
        keys = rows.page_keys(layer).to(q.device).float()  # [R, P, S, KVH, D]
        r, p, s = keys.shape[:3]
        g = self.num_heads // self.num_kv_heads
        qg = q.float().view(r, self.num_kv_heads, g, self.head_dim)
        logits = torch.einsum("rkgd,rtkd->rkgt", qg, keys.view(r, p * s, self.num_kv_heads, self.head_dim))
        tok = torch.arange(p * s, device=q.device)
        page = tok // s
        valid = ((page[None, :] >= rows.lo.long()[:, None]) & (page[None, :] < rows.hi.long()[:, None])
                 & (tok[None, :] < rows.t.long()[:, None]))  # [R, P*S]: middle pages, written tokens
        logits = (logits * self.scale).masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        mass = probs.view(r, self.num_kv_heads, g, p, s).sum(dim=(1, 2, 4))  # [R, P]
        pages = torch.arange(p, device=q.device)
        in_mid = (pages[None, :] >= rows.lo.long()[:, None]) & (pages[None, :] < rows.hi.long()[:, None])
        return self.topk_of(mass.masked_fill(~in_mid, float("-inf")), rows.num_select)
