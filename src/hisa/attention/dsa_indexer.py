"""DeepSeek Sparse Attention's lightning indexer: scores and top-k token selection (torch).

The indexer scores token t for a query as

    I(t) = sum_h w_h * relu(scale * q_h · k_t)        (h over the indexer's heads)

with the query's per-head `q_h` [IH, ID] and weights `w_h` [IH] (the model folds `IH ** -0.5` into
w), one key `k_t` [ID] per token and layer (the indexer key cache), and `scale = ID ** -0.5`. Each
query attends to its `topk` best tokens among those it may see (causal); while it sees at most
`topk` tokens it attends to all of them. The arithmetic follows transformers' DeepseekV32Indexer
(fp32 products, ReLU, then the weighted sum over heads as a second product).

Ties: ReLU makes many scores exactly 0 (every head negative); where fewer than `topk` tokens score
above 0 the choice among the zeros is torch.topk's, which is arbitrary (transformers' own prefill and
decode disagree there). Nothing here depends on which zero-score tokens are taken.

`indexer_topk` (decode, paged keys, the whole batch in one call, no host sync) is what a sparse
algorithm's `retrieve_topk` calls; `indexer_topk_prefill` serves the queries of one prompt chunk.
"""

from __future__ import annotations

import torch

_PREFILL_BLOCK_BYTES = 256 * 2**20  # fp32 scores per query block in prefill ([qb, IH, ctx])
_DECODE_BLOCK_BYTES = 2 * 2**30  # decode: gathered keys + fp32 scores of one block of rows


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Indexer scores, fp32 [B, N]: q [B, IH, ID], weights fp32 [B, IH], keys [B or 1, N, ID]."""
    s = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale  # [B, IH, N]
    s = torch.relu(s)
    return torch.matmul(weights.float().unsqueeze(-2), s).squeeze(-2)  # [B, N]


def _topk_or_pad(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [B, k] positions of the k best finite scores of each row, -1 where a row has fewer."""
    values, idx = scores.topk(k, dim=-1)  # [B, k]
    return torch.where(values == float("-inf"), -1, idx).to(torch.int32)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, page_table: torch.Tensor,
                 lengths: torch.Tensor, *, topk: int, scale: float) -> torch.Tensor:
    """Each request's top-`topk` tokens for its decode query (one query per request).

    q:           [B, IH, ID] indexer queries (roped).
    weights:     fp32 [B, IH] per-head weights (IH ** -0.5 folded in).
    index_cache: [P, S, ID] one layer's indexer keys in pages of S tokens (may be a strided view).
    page_table:  int32 [B, W] pages in token order, -1 past a request's pages.
    lengths:     int32 [B] tokens of each request (the new one included).
    Returns int32 [B, min(topk, W * S)] token positions, best first, -1 padded when a request has
    fewer tokens. Shapes depend only on the arguments' shapes: graph-safe. Rows are scored in blocks
    of at most `_DECODE_BLOCK_BYTES` of intermediates (a fixed split by shapes, same results).

    Example::

        ids = indexer_topk(q, w, cache.index_keys(layer), table, lens, topk=2048, scale=128 ** -0.5)
    """
    B, W = page_table.shape
    S, ID = index_cache.shape[1], index_cache.shape[-1]
    k = min(topk, W * S)
    # rows per block so the gathered keys (bf16 + fp32) and the fp32 scores (products, ReLU) of a block
    # stay under _DECODE_BLOCK_BYTES: ~160 MiB per row at 128K, 25 GiB for a batch of 160 at once
    per_row = W * S * (ID * (index_cache.element_size() + 4) + 2 * 4 * q.shape[1] + 8)
    block = max(1, _DECODE_BLOCK_BYTES // per_row)
    if block >= B:
        return _indexer_topk_rows(q, weights, index_cache, page_table, lengths, k=k, scale=scale)
    out = torch.empty(B, k, dtype=torch.int32, device=q.device)
    for lo in range(0, B, block):  # a fixed split by shapes: no host sync, graph-safe
        hi = min(B, lo + block)
        out[lo:hi] = _indexer_topk_rows(q[lo:hi], weights[lo:hi], index_cache, page_table[lo:hi], lengths[lo:hi],
                                        k=k, scale=scale)
    return out


def _indexer_topk_rows(q, weights, index_cache, page_table, lengths, *, k: int, scale: float) -> torch.Tensor:
    """indexer_topk over all of its rows at once (k = min(topk, W * S))."""
    B, W = page_table.shape
    S = index_cache.shape[1]
    pages = page_table.long().clamp(min=0)  # [B, W]; -1 pages are masked by length below
    keys = index_cache[pages].reshape(B, W * S, index_cache.shape[-1])  # [B, W*S, ID]
    scores = index_scores(q, weights, keys, scale=scale)  # [B, W*S]
    pos = torch.arange(W * S, device=q.device)
    scores = scores.masked_fill(pos[None, :] >= lengths.long()[:, None], float("-inf"))
    return _topk_or_pad(scores, k)


def indexer_topk_prefill(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, *, topk: int,
                         scale: float) -> torch.Tensor:
    """Top-`topk` tokens of each query of a prompt chunk, causal.

    q:       [n, IH, ID] queries of the chunk's tokens, positions ctx - n .. ctx - 1.
    weights: fp32 [n, IH].
    keys:    [ctx, ID] indexer keys of the whole context so far (this chunk included).
    Returns int32 [n, min(topk, ctx)] positions, best first, -1 padded (a query at position p sees
    tokens 0 .. p). Queries are scored in blocks so the fp32 scores stay under 256 MiB.
    """
    n, ih = q.shape[:2]
    ctx = keys.shape[0]
    k = min(topk, ctx)
    out = torch.empty(n, k, dtype=torch.int32, device=q.device)
    block = max(1, _PREFILL_BLOCK_BYTES // (4 * ih * ctx))
    kpos = torch.arange(ctx, device=q.device)
    keys = keys.float().unsqueeze(0)  # [1, ctx, ID], converted once for every block
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        scores = index_scores(q[lo:hi], weights[lo:hi], keys, scale=scale)  # [qb, ctx]
        qpos = torch.arange(ctx - n + lo, ctx - n + hi, device=q.device)  # [qb]
        scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
        out[lo:hi] = _topk_or_pad(scores, k)
    return out
