"""Plain-torch reference of paged decode attention: slow, simple, obviously right.

The Triton path (`hisa.attention.paged_decode`) is tested against this; the launcher also falls
back to it when q is not on CUDA.
"""

from __future__ import annotations

import torch


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               page_table: torch.Tensor, kv_lens: torch.Tensor, *, scale: float,
                               window: int | None = None) -> torch.Tensor:
    """One query token per request attends to its paged KV sequence (softmax in fp32).

    q:          [B, H, D] query of the newest token of each request.
    k_cache:    [P, S, KVH, D] keys, P physical pages of S tokens (may be a strided view).
    v_cache:    [P, S, KVH, D] values, same shape and dtype as k_cache.
    page_table: int32 [B, max_pages] physical page ids in virtual order, -1 past the request's pages.
    kv_lens:    int32 [B] valid tokens; token i lives at page page_table[b, i // S], offset i % S.
    scale:      softmax scale, usually D ** -0.5.
    window:     sliding window: only tokens kv_len - window .. kv_len - 1 are attended (of the
                virtual sequence; the newest token counts); None = all kv_len tokens.
    Returns [B, H, D] in q's dtype; rows with kv_lens[b] == 0 are zeros.
    GQA: query head h reads kv head h // (H // KVH).

    Example::

        kv = torch.randn(4, 2, 16, 2, 64)                       # [P, 2, S, KVH, D]
        q = torch.randn(1, 8, 64)                               # [B, H, D]
        out = paged_decode_attention_ref(q, kv[:, 0], kv[:, 1], torch.tensor([[3, 1]], dtype=torch.int32),
                                         torch.tensor([20], dtype=torch.int32), scale=64 ** -0.5)
    """
    B, H, D = q.shape
    S, KVH = k_cache.shape[1], k_cache.shape[2]
    group = H // KVH
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for b, kv_len in enumerate(kv_lens.tolist()):
        if kv_len == 0:
            continue
        n_pages = -(-kv_len // S)
        pages = page_table[b, :n_pages].long()  # [n_pages]
        # index_select fails loudly on a -1 page (negative indexing would silently wrap)
        k = k_cache.index_select(0, pages).reshape(n_pages * S, KVH, D)[:kv_len].float()  # [kv_len, KVH, D]
        v = v_cache.index_select(0, pages).reshape(n_pages * S, KVH, D)[:kv_len].float()  # [kv_len, KVH, D]
        k = k.repeat_interleave(group, dim=1)  # [kv_len, H, D]
        v = v.repeat_interleave(group, dim=1)  # [kv_len, H, D]
        if window is not None:  # older tokens are never read (they may hold anything, NaN included)
            k, v = k[max(0, kv_len - window):], v[max(0, kv_len - window):]  # [min(kv_len, window), H, D]
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # [H, n]
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)  # [H, D]
    return out.to(q.dtype)
