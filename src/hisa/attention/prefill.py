"""Prefill attention over paged KV: the new chunk's queries attend to the whole context so far."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """cache: [P, S, KVH, D] (may be a strided view), pages: int64 [n] → contiguous [length, KVH, D]."""
    chunk = cache.index_select(0, pages)  # [n, S, KVH, D]
    return chunk.reshape(-1, *cache.shape[2:])[:length]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """Causal attention of the last `n` positions of a context.

    q: [n, H, D] queries of positions ctx-n .. ctx-1; k, v: [ctx, KVH, D] (the whole context,
    this chunk included, or any suffix of it that holds every key the window reaches) → [n, H, D].
    GQA: H is a multiple of KVH.
    window: sliding-window attention: the query at position p sees keys p-window+1 .. p (`window`
    tokens, itself included), as Gemma's sliding layers do; None = the whole causal context.
    """
    n, ctx = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, n, D], [KVH, ctx, D]
    gqa = True
    if q.is_cuda:
        # The fused kernels (flash, memory-efficient) take only 4-D inputs and K/V with every head;
        # 3-D or grouped inputs fall back to the math kernel, which materializes H x n x ctx scores.
        g = qh.shape[0] // kh.shape[0]
        if g > 1:
            kh, vh = kh.repeat_interleave(g, 0), vh.repeat_interleave(g, 0)
        qh, kh, vh, gqa = qh[None], kh[None], vh[None], False
    if n == ctx and (window is None or window >= ctx):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif window is None and q.is_cuda:
        # a chunk after a cached prefix: causal aligned to the bottom right, as a bias object the
        # memory-efficient kernel applies without an [n, ctx] mask
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, ctx), scale=scale)
    else:
        qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]  # [n, 1]
        kpos = torch.arange(ctx, device=q.device)[None, :]  # [1, ctx]
        mask = kpos <= qpos  # [n, ctx]
        if window is not None:
            mask &= kpos > qpos - window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if q.is_cuda:
        out = out[0]
    return out.transpose(0, 1)
