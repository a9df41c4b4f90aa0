"""Plain-torch reference of paged decode attention: simple, obviously right, and the CPU path.

The Triton path (`hisa.attention.paged_decode`) is tested against this; the launcher also runs
it when q is not on CUDA, so it reads only the pages a request attends to (one gather of K and
of V) and attends with SDPA's fused kernel (a CPU decode step at 4K tokens spent ~1/3 of its
time here with repeat_interleave + einsum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for b, kv_len in enumerate(kv_lens.tolist()):
        if kv_len == 0:
            continue
        first = 0 if window is None else max(0, kv_len - window)  # older tokens are never read (may be NaN)
        lo = first // S  # the first page holding an attended token
        pages = page_table[b, lo: -(-kv_len // S)].long()  # [n_pages]
        # index_select fails loudly on a -1 page (negative indexing would silently wrap)
        span = slice(first - lo * S, kv_len - lo * S)
        k, v = gather_head_runs(k_cache, pages, span), gather_head_runs(v_cache, pages, span)  # [KVH, n, D] each
        # softmax(q k^T * scale) v per query head, kv head h // (H // KVH): the G query heads of a kv
        # head are its G query rows (one token attends, so nothing is masked), and SDPA's fused CPU
        # kernel reads each kv head's keys and values once, front to back
        qg = q[b].float().view(KVH, H // KVH, D)[None]  # [1, KVH, G, D]
        out[b] = F.scaled_dot_product_attention(qg, k[None], v[None], scale=scale)[0].reshape(H, D)
    return out.to(q.dtype)


def gather_head_runs(cache: torch.Tensor, pages: torch.Tensor, span: slice) -> torch.Tensor:
    """The tokens `span` of pages `pages` of cache [P, S, KVH, D], one contiguous [n, D] run per kv head:
    fp32 [KVH, n, D]. (One index_select over the 5-D view [1, KVH, P, S, D] writes that layout
    directly; a CPU decode step of SmolLM2 at 4K tokens spends ~30% less in attention this way than
    gathering token-major and letting SDPA stride over the heads.)"""
    KVH, D = cache.shape[2:]
    g = cache[None].permute(0, 3, 1, 2, 4).index_select(2, pages)  # [1, KVH, n_pages, S, D]
    return g.view(KVH, -1, D)[:, span].float()
