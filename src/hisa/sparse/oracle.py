"""Oracle: exact top-k pages by true attention mass (the accuracy upper bound; reads every key)."""

from __future__ import annotations

import torch

from hisa.sparse.base import BaseSparseAlgorithm, SelectionContext, register


@register("oracle")
class OracleAlgorithm(BaseSparseAlgorithm):
    """Computes softmax(q·k) over every token of the middle range and ranks pages by their mass
    (summed over heads). It reads all keys of the layer from the host pool each step, so it moves
    O(context) bytes: use it to measure what a perfect selector would reach, not for speed."""

    def retrieve_topk(self, layer, q, ctx: SelectionContext):
        r, s = q.shape[0], self.page_size
        m = max(0, ctx.host_table.shape[1] - ctx.middle_start)
        hp, valid = self.middle_host_pages(ctx, m)  # [R, M]
        keys = ctx.host_keys[hp.reshape(-1).to(ctx.host_keys.device)]  # [R*M, S, KVH, D]
        keys = keys.to(q.device, non_blocking=True).float().view(r, m * s, self.num_kv_heads, self.head_dim)
        g = self.num_heads // self.num_kv_heads
        qg = q.float().view(r, self.num_kv_heads, g, self.head_dim)
        logits = torch.einsum("rkgd,rtkd->rkgt", qg, keys) * self.scale  # [R, KVH, G, M*S]
        tok = torch.arange(m * s, device=q.device)
        tok_valid = valid.repeat_interleave(s, dim=1)  # [R, M*S]
        if ctx.num_valid_tokens is not None:  # the partial last page holds stale slots past the end
            tok_valid &= (tok[None, :] + ctx.middle_start * s) < ctx.num_valid_tokens[:, None]
        logits = logits.masked_fill(~tok_valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        mass = probs.view(r, self.num_kv_heads, g, m, s).sum(dim=(1, 2, 4))  # [R, M]
        return self.topk_from_scores(mass.masked_fill(~valid, float("-inf")), ctx)
