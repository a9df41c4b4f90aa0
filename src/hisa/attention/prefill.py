"""Prefill attention over paged KV: the new chunk's queries attend to the whole context so far."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """cache: [P, S, KVH, D] (may be a strided view), pages: int64 [n] → contiguous [length, KVH, D]."""
    chunk = cache.index_select(0, pages)  # [n, S, KVH, D]
    return chunk.reshape(-1, *cache.shape[2:])[:length]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Causal attention of the last `n` positions of a context.

    q: [n, H, D] queries of positions ctx-n .. ctx-1; k, v: [ctx, KVH, D] (the whole context,
    this chunk included) → [n, H, D]. GQA: H is a multiple of KVH.
    """
    n, ctx = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, n, D], [KVH, ctx, D]
    if n == ctx:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        qpos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]  # [n, ctx]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
