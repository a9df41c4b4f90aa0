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

    Every path runs a fused SDPA kernel (flash / memory-efficient), which takes only 4-D inputs:
    3-D or masked-math inputs fall back to the math kernel, which materializes H x n x ctx scores
    (on the CPU that made a 2K chunk after a 2K prefix ~4x slower).
    """
    n, ctx = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, n, D], [1, KVH, ctx, D]
    whole = window is None or window >= ctx
    if q.is_cuda:
        out = _prefill_cuda(qh, kh, vh, scale=scale, window=None if whole else window)
    elif n == ctx and whole:  # CPU, a prompt's first chunk: the flash kernel, causal (skips masked blocks)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    elif whole:  # CPU, a chunk after a cached prefix
        out = _prefill_cpu_after_prefix(qh, kh, vh, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=_mask(n, ctx, window, q.device), scale=scale,
                                             enable_gqa=True)
    return out[0].transpose(0, 1)


def _mask(n: int, ctx: int, window: int | None, device: torch.device) -> torch.Tensor:
    """bool [n, ctx]: query i (position ctx - n + i) sees key j."""
    qpos = torch.arange(ctx - n, ctx, device=device)[:, None]  # [n, 1]
    kpos = torch.arange(ctx, device=device)[None, :]  # [1, ctx]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


NATIVE_GQA = True  # CUDA: let the flash kernel read grouped K/V in place (False: expand them first, as before)


def _flash_reads_groups(qh, kh, vh) -> bool:
    """Whether SDPA's flash kernel takes these grouped inputs as they are (`enable_gqa`): half
    precision, one head size of at most 256 on both sides, flash enabled."""
    d = qh.shape[-1]
    return (NATIVE_GQA and qh.dtype in (torch.float16, torch.bfloat16) and d == vh.shape[-1] and d <= 256
            and d % 8 == 0 and torch.backends.cuda.flash_sdp_enabled())


def _prefill_cuda(qh, kh, vh, *, scale, window):
    n, ctx = qh.shape[2], kh.shape[2]
    if window is None and qh.shape[1] != kh.shape[1] and _flash_reads_groups(qh, kh, vh):
        # each KV head is read once for its query heads: no expanded copy of the whole context's K/V
        # per layer (4x their bytes at 32 query / 8 KV heads; 11 of a 16K prefix's 20 ms of kernels)
        if n == ctx:
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, ctx), scale=scale,
                                              enable_gqa=True)
    # the other fused CUDA kernels want K/V with every head (grouped inputs fall back to the math kernel)
    g = qh.shape[1] // kh.shape[1]
    if g > 1:
        kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    if n == ctx and window is None:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    if window is None:  # causal aligned to the bottom right, a bias object the memory-efficient kernel applies
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, ctx), scale=scale)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=_mask(n, ctx, window, qh.device), scale=scale)


def _prefill_cpu_after_prefix(qh, kh, vh, *, scale):
    """[1, H, n, D] queries after a cached prefix of ctx - n keys, on the CPU.

    Two flash calls instead of one masked one: the chunk attends to the whole prefix (no mask)
    and causally to itself (a square block, where upper-left and lower-right causal agree, so
    the kernel skips the masked half); the two softmaxes are merged by their log-sum-exps.
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    n, ctx = qh.shape[2], kh.shape[2]
    if flash is None or vh.shape[-1] > qh.shape[-1]:  # a torch without the CPU flash op (it returns the
        # log-sum-exp we need), or values wider than keys (the op wants one head size; narrower V is padded)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=_mask(n, ctx, None, qh.device), scale=scale,
                                              enable_gqa=True)
    g = qh.shape[1] // kh.shape[1]
    if g > 1:  # the op has no GQA: every query head gets its K/V
        kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)  # [1, H, ctx, D]
    dv = vh.shape[-1]
    if dv != qh.shape[-1]:  # the op wants one head size (MLA's V is the latent's first part): pad V with zeros
        vh = F.pad(vh, (0, qh.shape[-1] - dv))
    p = ctx - n
    o_prefix, lse_prefix = flash(qh, kh[:, :, :p], vh[:, :, :p], 0.0, False, scale=scale)  # [1, H, n, D], [1, H, n]
    o_chunk, lse_chunk = flash(qh, kh[:, :, p:], vh[:, :, p:], 0.0, True, scale=scale)
    m = torch.maximum(lse_prefix, lse_chunk)
    w_prefix, w_chunk = (lse_prefix - m).exp_(), (lse_chunk - m).exp_()
    total = w_prefix + w_chunk
    out = o_prefix.float() * (w_prefix / total)[..., None]
    out.addcmul_(o_chunk.float(), (w_chunk / total)[..., None])
    return out[..., :dv].to(qh.dtype)
