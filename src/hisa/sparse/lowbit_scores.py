"""Page scores for the whole decode batch from low-bit token keys (the `lowbit` algorithm).

Row r scores every token of its middle range (the tokens of pages [lo, hi)) for every query head h
with the dequantized key: l_h(τ) = scale * q_h · k̂(τ). Per head the logits become a softmax over the
row's middle tokens, p_h(τ). A page's value for head h is the largest p_h of its tokens (`page`
"max": one needle token lifts its page) or their sum ("mass": the attention the page would get,
what `oracle` ranks by with exact keys; a needle token lifts its page too); the query heads of a KV
group share one value, their mean or their max (`pool`); the page score is the sum over KV heads:

    score(page) = Σ_kvh pool_{h ∈ group(kvh)} max_{τ ∈ page} p_h(τ)      (page "max")
    score(page) = Σ_kvh pool_{h ∈ group(kvh)} Σ_{τ ∈ page} p_h(τ)        (page "mass")

Both are 2^(v_h(page) - M_h) / Z_h with v_h the page's largest logit (max) or the log-sum-exp of
its logits (mass), M_h and Z_h the head's softmax max and normalizer: kernel 1 (grid rows x 32-page
blocks x KV heads) dequantizes each token once per KV head into q's dtype, computes its group's
logits with one tensor-core dot per `sub_tokens` tokens and writes v_h of each page plus the
block's softmax partials (max, sum); kernel 2 (grid rows x page blocks) merges the partials into
each head's M_h and Z_h and writes the page scores. `select_pages` then takes the top k. No host
sync: a captured decode step replays it.

Shapes: q [R, H, D]; codes uint8 [SS, MAXT, KVH, DB] and scales fp16 [SS, MAXT, KVH, NG, 2] (one
layer; MAXT = MAXP * page_size tokens per slot, see `hisa.sparse.lowbit_keys`); sslots, lo, hi int32
[R]. Returns fp32 [R, MAXP], >= 0 inside [lo, hi), -inf outside.
"""

from __future__ import annotations

import torch

from hisa.sparse.lowbit_keys import check_layout, dequantize_keys

_LOG2E = 1.4426950408889634
BLOCK_P = 32  # pages per program of kernel 1 (one softmax partial per block), as Quest's kernels
SUB_TOKENS = 64  # tokens kernel 1 dequantizes per tl.dot (a tuning knob; `bench/selection_kernels_gpu.py`)
LOGITS_WARPS = 4


def lowbit_page_scores(q: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, sslots: torch.Tensor,
                       lo: torch.Tensor, hi: torch.Tensor, *, scale: float, page_size: int, bits: int,
                       group_size: int, pool: str = "mean", page: str = "mass", use_triton: bool | None = None,
                       sub_tokens: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Score every page of each row's middle range (see the module docstring). fp32 [R, MAXP].

    q fp32, fp16 or bf16: kernel 1's dot multiplies q with keys dequantized to q's dtype (fp32: exact
    fp32 products). sub_tokens (tokens dequantized per dot, a power of two >= 16; a page at least)
    and num_warps tune kernel 1; None takes the module's SUB_TOKENS / LOGITS_WARPS.

    Example: lowbit_page_scores(q, codes, scales, sslots, lo, hi, scale=128 ** -0.5, page_size=32,
    bits=4, group_size=32) -> [R, MAXP], then `select_pages(scores, lo, hi, k)`."""
    R, H, D = q.shape
    SS, MAXT, KVH, DB = codes.shape
    check_layout(D, bits, group_size)
    if H % KVH or DB * 8 != D * bits or MAXT % page_size or scales.shape != (SS, MAXT, KVH, D // group_size, 2):
        raise ValueError(f"q {tuple(q.shape)} does not fit codes {tuple(codes.shape)} / scales {tuple(scales.shape)} "
                         f"at {bits} bits, groups of {group_size}, page {page_size}")
    if pool not in ("mean", "max"):
        raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
    if page not in ("max", "mass"):
        raise ValueError(f"page must be 'max' or 'mass', got {page!r}")
    if not (codes.stride(3) == 1 and codes.stride(2) == DB and scales.stride(4) == 1 and scales.stride(3) == 2
            and scales.stride(2) == 2 * (D // group_size) and scales.stride(1) == KVH * scales.stride(2)):
        raise ValueError("codes and scales must be contiguous per token (a slot/layer slice of the full tensors)")
    if q.stride(2) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if use_triton is None:
        use_triton = q.is_cuda
    if not use_triton:
        return lowbit_page_scores_ref(q, codes, scales, sslots, lo, hi, scale=scale, page_size=page_size, bits=bits,
                                      group_size=group_size, pool=pool, page=page)
    from hisa.sparse.triton_lowbit import lowbit_logits_kernel, lowbit_scores_kernel

    sub_tokens = SUB_TOKENS if sub_tokens is None else sub_tokens
    num_warps = LOGITS_WARPS if num_warps is None else num_warps
    if sub_tokens < 16 or sub_tokens & (sub_tokens - 1):
        raise ValueError(f"sub_tokens must be a power of two >= 16 (tl.dot's smallest N), got {sub_tokens}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be fp32, fp16 or bf16, got {q.dtype}")
    S = page_size
    MAXP = MAXT // S
    G = H // KVH
    NG = D // group_size
    sub_p = max(1, sub_tokens // S)  # pages per dot: sub_p * S = max(sub_tokens, S) tokens
    block_p = max(BLOCK_P, sub_p)
    PB = -(-MAXP // block_p)
    f32 = dict(dtype=torch.float32, device=q.device)
    logits = torch.empty(R, H, MAXP, **f32)  # each page's v_h (log2 domain)
    mpart = torch.empty(R, PB, H, **f32)
    spart = torch.empty(R, PB, H, **f32)
    scores = torch.empty(R, MAXP, **f32)
    if R == 0:
        return scores
    lowbit_logits_kernel[(R, PB, KVH)](
        q, codes, scales, sslots, lo, hi, logits, mpart, spart,
        scale * _LOG2E, MAXP, PB,
        q.stride(0), q.stride(1), codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1),
        # tl.dot needs M, N, K >= 16: the query heads pad to 16 rows, D to whole groups (>= 16 channels)
        H=H, G=G, BLOCK_G=max(16, _next_pow2(G)), S=S, SUB_P=sub_p, NSUB=block_p // sub_p, DB=DB, NG=NG,
        BLOCK_NG=max(_next_pow2(NG), -(-16 // group_size)), GROUP=group_size, BITS=bits, PAGE_MASS=page == "mass",
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps)
    lowbit_scores_kernel[(R, -(-MAXP // BLOCK_P))](
        logits, mpart, spart, lo, hi, scores, MAXP, PB,
        H=H, G=G, KVH=KVH, BLOCK_P=BLOCK_P, BLOCK_PB=max(2, _next_pow2(PB)), BLOCK_H=max(2, _next_pow2(H)),
        POOL_MAX=pool == "max", num_warps=4)
    return scores


def lowbit_page_scores_ref(q, codes, scales, sslots, lo, hi, *, scale: float, page_size: int, bits: int,
                           group_size: int, pool: str = "mean", page: str = "mass") -> torch.Tensor:
    """Plain-torch lowbit_page_scores (same arguments): the semantics, spelled out."""
    R, H, D = q.shape
    SS, MAXT, KVH, DB = codes.shape
    S, MAXP, G = page_size, MAXT // page_size, H // KVH
    s = sslots.long()
    k = dequantize_keys(codes[s], scales[s], bits=bits, group_size=group_size)  # [R, MAXT, KVH, D]
    logits = torch.einsum("rkgd,rtkd->rkgt", q.float().view(R, KVH, G, D), k) * scale  # [R, KVH, G, MAXT]
    p = torch.arange(MAXP, device=q.device)
    valid = (p[None, :] >= lo.long()[:, None]) & (p[None, :] < hi.long()[:, None])  # [R, MAXP]
    logits = logits.masked_fill(~valid.repeat_interleave(S, 1)[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without a middle range: all zero
    per_page = probs.view(R, KVH, G, MAXP, S)
    value = per_page.amax(-1) if page == "max" else per_page.sum(-1)  # [R, KVH, G, MAXP] per head
    pooled = value.mean(2) if pool == "mean" else value.amax(2)  # [R, KVH, MAXP]
    return pooled.sum(1).masked_fill(~valid, float("-inf"))


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
