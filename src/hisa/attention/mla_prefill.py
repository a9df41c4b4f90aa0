"""MLA prefill attention in the absorbed form (torch): a chunk's queries over the latent rows of the
context, each query over its own DSA selection, or causal over everything while the context is
no longer than the selection.

Same arithmetic as `mla_reference` (score = q·row, value = the row's latent part), for many queries.
"""

from __future__ import annotations

import torch

from hisa.attention.prefill import prefill_attention

_BLOCK_BYTES = 512 * 2**20  # gathered rows + fp32 scores per query block


def mla_prefill_attention(q: torch.Tensor, kv: torch.Tensor, *, scale: float, kv_lora_rank: int,
                          indices: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the last n positions of a context over its latent rows.

    q:            [n, H, Dl + Dr] absorbed queries of positions ctx - n .. ctx - 1.
    kv:           [ctx, Dl + Dr] latent rows of the whole context (this chunk included).
    scale:        softmax scale.
    kv_lora_rank: Dl (the value is a row's first Dl values).
    indices:      int32 [n, K] each query's selected positions (-1 padded, all <= its own position),
                  or None: causal attention over every earlier token.
    Returns [n, H, Dl] in q's dtype.

    Example::

        out = mla_prefill_attention(q, rows, scale=0.1, kv_lora_rank=512, indices=topk)  # [n, H, 512]
    """
    if indices is None:
        # one latent head shared by every query head: grouped attention with a single kv head
        return prefill_attention(q, kv[:, None, :], kv[:, None, :kv_lora_rank], scale=scale)
    n, H, Dq = q.shape
    K = indices.shape[1]
    out = torch.empty(n, H, kv_lora_rank, dtype=q.dtype, device=q.device)
    per_query = K * Dq * 4 + H * K * 4 * 2  # fp32 rows, scores and probabilities
    block = max(1, _BLOCK_BYTES // per_query)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        idx = indices[lo:hi].long()  # [qb, K]
        rows = kv[idx.clamp(min=0)].float()  # [qb, K, Dq]; fp32 products, as the decode kernel accumulates
        scores = torch.bmm(q[lo:hi].float(), rows.transpose(1, 2)) * scale  # [qb, H, K]
        scores = scores.masked_fill((idx < 0)[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)  # [qb, H, K]
        out[lo:hi] = torch.bmm(probs, rows[:, :, :kv_lora_rank]).to(q.dtype)  # [qb, H, Dl]
    return out
