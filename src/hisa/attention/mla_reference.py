"""Plain-torch reference of MLA decode attention over the paged latent cache (absorbed form).

Slow, simple, obviously right: the Triton path (`hisa.attention.mla_decode`) is tested against it,
and the launcher falls back to it when q is not on CUDA.

The absorbed form: with the latent cache row of token t, c_t = [latent_t (Dl) | k_pe_t (Dr)], and
kv_b_proj's key part W_UK [H, nope, Dl] and value part W_UV [H, v, Dl], head h's score is
q_nope·(W_UK c) + q_pe·k_pe = [q_nope W_UK | q_pe]·c_t, so the query is absorbed once per token
(q = [q_nope W_UK | q_pe], [H, Dl + Dr]) and every head reads the same rows; the output in latent
space, o = softmax(q·c) latent, goes through W_UV afterwards. One latent "head" serves all heads.
"""

from __future__ import annotations

import torch


def mla_decode_attention_ref(q: torch.Tensor, latent_cache: torch.Tensor, page_table: torch.Tensor,
                             kv_lens: torch.Tensor, *, scale: float, kv_lora_rank: int,
                             indices: torch.Tensor | None = None) -> torch.Tensor:
    """One absorbed query token per request attends to its latent rows (softmax in fp32).

    q:            [B, H, Dl + Dr] absorbed queries (latent part, then rope part).
    latent_cache: [P, S, Dl + Dr] one layer's latent rows in pages of S tokens (may be a strided view).
    page_table:   int32 [B, max_pages] physical pages in token order; token i of request b lives
                  at page page_table[b, i // S], offset i % S.
    kv_lens:      int32 [B] tokens of each request (0 for padded rows, which output zeros).
    scale:        softmax scale.
    kv_lora_rank: Dl, the value width (the first Dl values of a row).
    indices:      int32 [B, K] token positions each request attends to (DSA's top-k), -1 padded;
                  entries < 0 or >= kv_len are skipped. None: all kv_len tokens.
    Returns [B, H, Dl] in q's dtype.

    Example::

        cache = torch.randn(8, 4, 48)                           # [P, S, Dl + Dr], Dl = 32, Dr = 16
        q = torch.randn(1, 4, 48)                               # [B, H, Dl + Dr]
        table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
        out = mla_decode_attention_ref(q, cache, table, torch.tensor([10], dtype=torch.int32), scale=0.1,
                                       kv_lora_rank=32, indices=torch.tensor([[9, 0, 4, -1]], dtype=torch.int32))
    """
    B, H, _ = q.shape
    S = latent_cache.shape[1]
    out = torch.zeros(B, H, kv_lora_rank, dtype=torch.float32, device=q.device)
    for b, kv_len in enumerate(kv_lens.tolist()):
        if indices is None:
            pos = torch.arange(kv_len, device=q.device)  # [n]
        else:
            row = indices[b].long()
            pos = row[(row >= 0) & (row < kv_len)]  # [n]
        if pos.numel() == 0:
            continue
        pages = page_table[b].long()[pos // S]  # [n]
        if bool((pages < 0).any()):
            raise ValueError(f"request {b}: a selected token lies on a -1 page of the page table")
        rows = latent_cache[pages, pos % S].float()  # [n, Dl + Dr]
        scores = (q[b].float() @ rows.T) * scale  # [H, n]
        out[b] = scores.softmax(dim=-1) @ rows[:, :kv_lora_rank]  # [H, Dl]
    return out.to(q.dtype)
