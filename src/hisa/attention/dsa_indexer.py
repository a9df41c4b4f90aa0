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

Decode on CUDA: `indexer_scores` runs the fused Triton kernel (`triton_dsa_indexer.py`: keys gathered
through the page table, q · k on tensor cores, ReLU and the weighted sum over heads in registers,
fp32 scores [B, W * S] out), then torch.topk. Elsewhere (and as the reference) torch gathers the
keys and computes the fp32 [B, IH, W * S] products, a block of rows at a time.
"""

from __future__ import annotations

import math
import os

import torch

from hisa.kvcache.mla_fp8 import (fp8_index_queries, index_key_width, index_scale_offset, quantize_index_queries,
                                  unpack_index_keys)

_PREFILL_BLOCK_BYTES = 256 * 2**20  # fp32 scores per query block in prefill ([qb, IH, ctx])
_DECODE_BLOCK_BYTES = 2 * 2**30  # decode in torch: gathered keys + fp32 scores of one block of rows
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_T = 64  # tokens per tl.dot of the score kernel (a tuning knob; bench/dsa_indexer_gpu.py)
TILES = 8  # tiles of BLOCK_T tokens per program (H200: 156 µs vs 163 at 4 for 128K x 16; dsa_indexer_gpu_h200.json)
NUM_WARPS = 4
# FP8 keys and queries: (block_t, tiles, num_warps); HISA_DSA_FP8_TILING="128,4,8" overrides (A/B runs)
FP8_TILING = tuple(int(x) for x in os.environ.get("HISA_DSA_FP8_TILING", "64,8,4").split(","))


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
                 lengths: torch.Tensor, *, topk: int, scale: float, use_triton: bool | None = None) -> torch.Tensor:
    """Each request's top-`topk` tokens for its decode query (one query per request).

    q:           [B, IH, ID] indexer queries (roped).
    weights:     fp32 [B, IH] per-head weights (IH ** -0.5 folded in).
    index_cache: [P, S, ID] one layer's indexer keys in pages of S tokens (may be a strided view), or
                 uint8 [P, S, index_key_width(ID)]: the keys in FP8 (`hisa.kvcache.mla_fp8.pack_index_keys`).
    page_table:  int32 [B, W] pages in token order, -1 past a request's pages.
    lengths:     int32 [B] tokens of each request (the new one included).
    use_triton:  None = the fused score kernel iff q is on CUDA; True forces it (CPU: TRITON_INTERPRET=1).
    Returns int32 [B, min(topk, W * S)] token positions, best first, -1 padded when a request has
    fewer tokens (tokens on a -1 page are never selected). Shapes depend only on the arguments'
    shapes: graph-safe. The kernel's only intermediate is the fp32 scores [B, W * S]; torch scores
    rows in blocks of at most `_DECODE_BLOCK_BYTES` of intermediates (a fixed split by shapes, same
    results).

    Example::

        ids = indexer_topk(q, w, cache.index_keys(layer), table, lens, topk=2048, scale=128 ** -0.5)
    """
    B, W = page_table.shape
    S, ID = index_cache.shape[1], q.shape[-1]
    k = min(topk, W * S)
    if use_triton is None:
        use_triton = q.is_cuda
    if use_triton:
        return _topk_or_pad(indexer_scores(q, weights, index_cache, page_table, lengths, scale=scale,
                                           use_triton=True), k)
    # rows per block so the gathered keys (bf16 + fp32) and the fp32 scores (products, ReLU) of a block
    # stay under _DECODE_BLOCK_BYTES: ~160 MiB per row at 128K, 25 GiB for a batch of 160 at once
    per_row = W * S * (ID * (index_cache.element_size() + 4) + 2 * 4 * q.shape[1] + 8)
    block = max(1, _DECODE_BLOCK_BYTES // per_row)
    if block >= B:
        return _topk_or_pad(indexer_scores_ref(q, weights, index_cache, page_table, lengths, scale=scale), k)
    out = torch.empty(B, k, dtype=torch.int32, device=q.device)
    for lo in range(0, B, block):  # a fixed split by shapes: no host sync, graph-safe
        hi = min(B, lo + block)
        scores = indexer_scores_ref(q[lo:hi], weights[lo:hi], index_cache, page_table[lo:hi], lengths[lo:hi],
                                    scale=scale)
        out[lo:hi] = _topk_or_pad(scores, k)
    return out


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, page_table: torch.Tensor,
                   lengths: torch.Tensor, *, scale: float, use_triton: bool | None = None, block_t: int | None = None,
                   tiles: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Decode indexer scores of every token of every request, fp32 [B, W * S] (arguments as
    `indexer_topk`): I(t) for t < length on a page >= 0, -inf elsewhere.

    use_triton: None = the fused kernel iff q is on CUDA (else `indexer_scores_ref`). The kernel's
    dot runs in the wider of q's and the cache's dtypes (bf16 x bf16 products are exact in its fp32
    accumulator, as in the reference). block_t (tokens per dot, a power of two >= 16), tiles (tiles
    per program) and num_warps tune it (None: BLOCK_T, TILES, NUM_WARPS, or FP8_TILING for FP8 keys);
    they change nothing beyond fp32 summation order.

    Example::

        scores = indexer_scores(q, w, cache.index_keys(layer), table, lens, scale=128 ** -0.5)  # [B, W * S]
    """
    dflt = FP8_TILING if index_cache.dtype == torch.uint8 else (BLOCK_T, TILES, NUM_WARPS)
    block_t, tiles, num_warps = block_t or dflt[0], tiles or dflt[1], num_warps or dflt[2]
    _validate(q, weights, index_cache, page_table, lengths, scale=scale, block_t=block_t, tiles=tiles)
    if use_triton is None:
        use_triton = q.is_cuda
    if not use_triton:
        return indexer_scores_ref(q, weights, index_cache, page_table, lengths, scale=scale)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("use_triton=True with CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported; move the tensors to CUDA or pass use_triton=False")
    import triton

    from hisa.attention.triton_dsa_indexer import dsa_indexer_scores_kernel

    B, IH, ID = q.shape
    if B > 65535:
        raise ValueError(f"the kernel scores at most 65,535 rows per call (its grid's second axis), got {B}")
    W, S = page_table.shape[1], index_cache.shape[1]
    N = W * S
    out = torch.empty(B, N, dtype=torch.float32, device=q.device)
    if B == 0 or N == 0:
        return out
    fp8 = index_cache.dtype == torch.uint8
    hw_cvt = q.is_cuda and os.environ.get("HISA_FP8_CVT", "hw") == "hw"
    if fp8:  # FP8 queries too: e4m3 bytes, each head's scale folded into its weight (relu(s x) = s relu(x))
        q, q_scale = quantize_index_queries(q)
        weights = weights.float() * q_scale
        # the dot: FP8 x FP8 on the tensor cores (HW_CVT), else over the exact values in fp16
        dot_dtype = torch.float16
    else:
        dot_dtype = torch.promote_types(q.dtype, index_cache.dtype)
        q = q.to(dot_dtype)  # [B, IH, ID], a no-op when the dtypes agree
    block_d = max(32 if fp8 else 16, triton.next_power_of_2(ID))  # (FP8 tensor-core products take K >= 32)
    dsa_indexer_scores_kernel[(-(-N // (block_t * tiles)), B)](
        q, weights, index_cache, page_table, lengths, out, scale, N,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1),
        index_cache.stride(0), index_cache.stride(1), index_cache.stride(2),
        page_table.stride(0), page_table.stride(1), lengths.stride(0), out.stride(0),
        IH=IH, ID=ID, S=S, BLOCK_H=max(16, triton.next_power_of_2(IH)), BLOCK_D=block_d,
        BLOCK_T=block_t, TILES=tiles, DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        FP8=fp8, HW_CVT=hw_cvt,
        SCALE_AT=index_scale_offset(ID) if fp8 else 0,
        num_warps=num_warps if q.is_cuda else 1)
    return out


def indexer_scores_ref(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, page_table: torch.Tensor,
                       lengths: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Plain-torch `indexer_scores` (same arguments, fp32 [B, W * S]): gathers every key, fp32 products."""
    B, W = page_table.shape
    S = index_cache.shape[1]
    pages = page_table.long()  # [B, W]
    keys = index_cache[pages.clamp(min=0)].reshape(B, W * S, index_cache.shape[-1])  # [B, W*S, ID]
    if keys.dtype == torch.uint8:  # FP8 keys, and then FP8 queries: e4m3 * scale in fp32, as the kernel's
        keys = unpack_index_keys(keys, index_head_dim=q.shape[-1], dtype=torch.float32)
        q = fp8_index_queries(q)
    scores = index_scores(q, weights, keys, scale=scale)  # [B, W*S]
    pos = torch.arange(W * S, device=q.device)
    valid = (pos[None, :] < lengths.long()[:, None]) & (pages >= 0)[:, :, None].expand(B, W, S).reshape(B, W * S)
    return scores.masked_fill(~valid, float("-inf"))


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


def _validate(q, weights, index_cache, page_table, lengths, *, scale, block_t, tiles) -> None:
    """Raise ValueError with an actionable message on any bad argument of `indexer_scores`."""
    for name, t, ndim, shape in (("q", q, 3, "[B, IH, ID]"), ("weights", weights, 2, "[B, IH]"),
                                 ("index_cache", index_cache, 3, "[P, S, ID]"),
                                 ("page_table", page_table, 2, "[B, W]"), ("lengths", lengths, 1, "[B]")):
        if t.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(t.shape)}")
    B, IH, ID = q.shape
    if weights.shape != (B, IH) or page_table.shape[0] != B or lengths.shape[0] != B:
        raise ValueError(f"q {tuple(q.shape)} does not fit weights {tuple(weights.shape)}, page_table "
                         f"{tuple(page_table.shape)} or lengths {tuple(lengths.shape)}: [B, IH], [B, W], [B]")
    fp8 = index_cache.dtype == torch.uint8
    if index_cache.shape[2] != (index_key_width(ID) if fp8 else ID):
        raise ValueError(f"index_cache keys have {index_cache.shape[2]} {'bytes' if fp8 else 'values'}, q has {ID} "
                         f"per head" + (f" (FP8 keys: {index_key_width(ID)} bytes)" if fp8 else ""))
    if fp8 and index_cache.stride(2) != 1:
        raise ValueError(f"FP8 index_cache keys must be contiguous bytes, got strides {index_cache.stride()}")
    if q.dtype not in _FLOAT_DTYPES or index_cache.dtype not in _FLOAT_DTYPES + (torch.uint8,) \
            or weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q, weights and index_cache must be one of {_FLOAT_DTYPES}, got {q.dtype}, "
                         f"{weights.dtype} and {index_cache.dtype}")
    if page_table.dtype != torch.int32 or lengths.dtype != torch.int32:
        raise ValueError(f"page_table and lengths must be int32, got {page_table.dtype} and {lengths.dtype}; "
                         f"convert with .to(torch.int32)")
    tensors = (q, weights, index_cache, page_table, lengths)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"q, weights, index_cache, page_table and lengths must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float (ID ** -0.5), got {scale!r}")
    if not (isinstance(block_t, int) and block_t >= 16 and block_t & (block_t - 1) == 0):
        raise ValueError(f"block_t must be a power of two >= 16 (tl.dot's smallest dim), got {block_t!r}")
    if not (isinstance(tiles, int) and tiles >= 1):
        raise ValueError(f"tiles must be a positive int, got {tiles!r}")
