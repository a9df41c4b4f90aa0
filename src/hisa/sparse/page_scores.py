"""Page scores for the whole decode batch from per-page key summaries (Quest's bound, the page mean).

Each row (a sparse request) scores every page of its middle range [lo, hi) for every query head:
  * Quest's bound: sum_d max(q_d * kmin_d, q_d * kmax_d) >= max_{k in page} q . k  (times the
    attention scale);
  * optionally the page-mean key: q . mean(k) * scale (quest-mean).
Per head the logits become a softmax over the row's middle pages; the page score is the sum over
heads (and over both terms). One page list per request is then the top-k of that score.

`page_scores` runs two Triton kernels on CUDA (`triton_page_scores.py`), the torch reference
elsewhere; `select_pages` one more. No host sync: a captured decode step replays them.

Shapes: q [R, H, D]; kmin/kmax/kmean [SS, MAXP, KVH, D] (one layer; SS sparse slots, MAXP pages per
request); sslots, lo, hi int32 [R]. Returns fp32 [R, MAXP], -inf outside [lo, hi).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hisa.ops import pdl

_LOG2E = 1.4426950408889634
BLOCK_P = 64  # pages per program of the logits kernel (a tuning knob; `bench/selection_kernels_gpu.py`)
LOGITS_WARPS = 4
LOGITS_BLOCKS = 2  # page blocks per program of the logits kernel (a loop, software-pipelined; 2 was the
# fastest on an H200 at 32K x 8, 128K x 4 and 128K x 11: bench/results/selection_kernels_gpu_h200_v4.json)
LOGITS_STAGES = 2  # pipeline stages of that loop
SELECT_EARLY_EXIT = True  # select_pages stops its search once exactly k pages are at or above the cut
# select_pages' warps when the caller does not say (0: 8 from 2,048 pages up, else 4); HISA_SELECT_WARPS sets it
SELECT_WARPS = int(os.environ.get("HISA_SELECT_WARPS", "0"))


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, sslots: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor, *, scale: float, kmean: torch.Tensor | None = None,
                use_triton: bool | None = None, block_p: int | None = None,
                num_warps: int | None = None, blocks: int | None = None,
                num_stages: int | None = None) -> torch.Tensor:
    """Score every page of each row's middle range (see the module docstring). fp32 [R, MAXP].

    block_p (pages per block, a power of two >= 16), blocks (page blocks per program, a loop),
    num_stages (that loop's pipeline stages) and num_warps tune the logits kernel; None takes the
    module's BLOCK_P / LOGITS_BLOCKS / LOGITS_STAGES / LOGITS_WARPS."""
    R, H, D = q.shape
    SS, MAXP, KVH, Dm = kmin.shape
    if Dm != D or H % KVH or kmax.shape != kmin.shape or (kmean is not None and kmean.shape != kmin.shape):
        raise ValueError(f"q {tuple(q.shape)} does not fit the metadata {tuple(kmin.shape)}")
    for name, t in (("kmin", kmin), ("kmax", kmax)) + ((("kmean", kmean),) if kmean is not None else ()):
        if t.stride(3) != 1 or t.stride(2) != D:
            raise ValueError(f"{name} must be contiguous in its last two dims, got strides {t.stride()}")
    if q.stride(2) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    if use_triton is None:
        use_triton = q.is_cuda
    if not use_triton:
        return page_scores_ref(q, kmin, kmax, sslots, lo, hi, scale=scale, kmean=kmean)
    from hisa.sparse.triton_page_scores import page_logits_kernel, page_scores_kernel

    block_p = BLOCK_P if block_p is None else block_p
    num_warps = LOGITS_WARPS if num_warps is None else num_warps
    blocks = LOGITS_BLOCKS if blocks is None else blocks
    num_stages = LOGITS_STAGES if num_stages is None else num_stages
    if blocks < 1 or num_stages < 1:
        raise ValueError(f"blocks and num_stages must be >= 1, got {blocks} and {num_stages}")
    if block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two >= 16 (tl.dot's smallest M), got {block_p}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be fp32, fp16 or bf16, got {q.dtype}")
    q = q.to(kmin.dtype)  # one product dtype (the model's: they are the same in a decode step)
    PB = -(-MAXP // block_p)
    f32 = dict(dtype=torch.float32, device=q.device)
    n_terms = 1 if kmean is None else 2
    logits = torch.empty(n_terms, R, H, MAXP, **f32)
    mpart = torch.empty(n_terms, R, PB, H, **f32)
    spart = torch.empty(n_terms, R, PB, H, **f32)
    scores = torch.empty(R, MAXP, **f32)
    if R == 0:
        return scores
    second = (logits[-1], mpart[-1], spart[-1])
    page_logits_kernel[(R, -(-PB // blocks), KVH)](
        q, kmin, kmax, kmean if kmean is not None else kmin, sslots, lo, hi,
        logits[0], mpart[0], spart[0], *second,
        scale * _LOG2E, MAXP, PB,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), kmin.stride(2),
        H=H, G=H // KVH, D=D, BLOCK_P=block_p, BLOCK_D=max(16, _next_pow2(D)),
        BLOCK_G=max(16, _next_pow2(H // KVH)), HAS_MEAN=kmean is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCKS=blocks, STAGES=num_stages,
        num_warps=num_warps, **pdl.launch_kwargs(q, "selection"))
    page_scores_kernel[(R, PB)](
        logits[0], mpart[0], spart[0], *second, lo, hi, scores, MAXP, PB,
        H=H, BLOCK_P=block_p, BLOCK_PB=max(2, _next_pow2(PB)), BLOCK_H=max(2, _next_pow2(H)),
        HAS_MEAN=kmean is not None, num_warps=4, **pdl.launch_kwargs(q, "selection"))
    return scores


def page_scores_ref(q, kmin, kmax, sslots, lo, hi, *, scale: float, kmean=None) -> torch.Tensor:
    """Plain-torch page_scores (same arguments): the semantics, spelled out."""
    R, H, D = q.shape
    SS, MAXP, KVH, _ = kmin.shape
    s = sslots.long()
    qg = q.float().view(R, 1, KVH, H // KVH, D)  # [R, 1, KVH, G, D]
    lo_, hi_ = kmin[s].float()[:, :, :, None, :], kmax[s].float()[:, :, :, None, :]  # [R, MAXP, KVH, 1, D]
    logits = [torch.maximum(qg * lo_, qg * hi_).sum(-1) * scale]  # [R, MAXP, KVH, G]
    if kmean is not None:
        logits.append((qg * kmean[s].float()[:, :, :, None, :]).sum(-1) * scale)
    p = torch.arange(MAXP, device=q.device)
    valid = (p[None, :] >= lo.long()[:, None]) & (p[None, :] < hi.long()[:, None])  # [R, MAXP]
    score = torch.zeros(R, MAXP, dtype=torch.float32, device=q.device)
    for lg in logits:
        lg = lg.masked_fill(~valid[:, :, None, None], float("-inf"))
        score += torch.softmax(lg, dim=1).nan_to_num(0.0).sum(dim=(2, 3))
    return score.masked_fill(~valid, float("-inf"))


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class TableLayout:
    """Where select_pages also lays resident rows out for attention (the adaptor's compose, done by
    the top-k kernel itself: one launch fewer per layer). kind, slot, t: int32 [R] (`DecodeRowsView`);
    block_table int32 [*, MAXP]; table int32 [R, W] and kv_lens int32 [R] are written for rows of
    kind RESIDENT (1) only. Built by `hisa.sparse.coordinator.SparseCoordinator._layout`."""

    kind: torch.Tensor
    slot: torch.Tensor
    t: torch.Tensor
    block_table: torch.Tensor
    table: torch.Tensor
    kv_lens: torch.Tensor
    page_size: int


def select_pages(scores: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, k: int, *,
                 use_triton: bool | None = None, num_warps: int | None = None,
                 early_exit: bool | None = None, layout: TableLayout | None = None) -> torch.Tensor:
    """The k best pages of each row by score, in page order: int32 [R, k], -1 padded.

    scores: fp32 [R, MAXP] (what `page_scores` returns: >= 0 inside each row's [lo, hi), -inf
    outside); a row with fewer than k valid pages gets them all. Ties go to the lower page. One
    Triton launch on CUDA (a search over the scores' bit patterns: no sort, no host sync), the torch reference elsewhere.
    num_warps tunes the kernel; None = SELECT_WARPS, else 8 from 2,048 pages up, else 4. early_exit (None =
    SELECT_EARLY_EXIT) lets the search stop once exactly k pages are at or above its cut; False runs
    all 20 rounds (the same pages: the reference the tests compare it with).
    layout: also write the attention table of the resident rows (`TableLayout`), as
    `BackendAdaptor.compose` would from the returned picks.
    """
    R, MAXP = scores.shape
    if use_triton is None:
        use_triton = scores.is_cuda
    if not use_triton:
        out = select_pages_ref(scores, lo, hi, k)
        if layout is not None:
            _layout_ref(out, lo, hi, layout)
        return out
    from hisa.sparse.triton_page_scores import select_pages_kernel

    out = torch.empty(R, k, dtype=torch.int32, device=scores.device)
    if R and k:
        block = _next_pow2(MAXP)
        lay = {}
        if layout is not None:
            L = layout
            if L.block_table.shape[1] < MAXP or L.block_table.dtype != torch.int32 or L.table.dtype != torch.int32:
                raise ValueError("layout: block_table must be int32 [*, >= MAXP] and table int32 [R, W]")
            lay = dict(kind_ptr=L.kind, slot_ptr=L.slot, t_ptr=L.t, block_table_ptr=L.block_table, table_ptr=L.table,
                       kv_lens_ptr=L.kv_lens, stride_bt=L.block_table.stride(0), stride_tb=L.table.stride(0),
                       S=L.page_size, LAYOUT=True)
        select_pages_kernel[(R,)](scores, lo, hi, out, MAXP, out.stride(0), K=k, BLOCK=block,
                                  BLOCK_K=_next_pow2(k), num_warps=num_warps or SELECT_WARPS or (8 if block >= 2048 else 4),
                                  EARLY_EXIT=SELECT_EARLY_EXIT if early_exit is None else early_exit,
                                  **lay, **pdl.launch_kwargs(scores, "selection"))
    return out


def _layout_ref(picks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, layout: TableLayout) -> None:
    """TableLayout's writes in plain torch: the adaptor's compose reference over the resident rows
    alone (every other row is passed as dense, so it is left alone, as the kernel leaves it)."""
    from hisa.sparse.adaptor import DENSE, RESIDENT, _compose_ref

    L = layout
    kind = torch.where(L.kind == RESIDENT, L.kind, DENSE)
    unused = torch.empty(L.kind.shape[0], 1, dtype=torch.int32, device=L.kind.device)  # host-backed rows' lists
    _compose_ref(kind, L.slot, L.t, L.kind, lo, hi, picks, L.block_table, L.table, unused, L.kv_lens,
                 page_size=L.page_size, num_select=picks.shape[1], K=1, windowed=False)


def select_pages_ref(scores, lo, hi, k: int) -> torch.Tensor:
    """Plain-torch select_pages: a stable sort by score (ties: lower page first), the first k kept."""
    R, MAXP = scores.shape
    p = torch.arange(MAXP, device=scores.device)
    valid = (p[None, :] >= lo.long()[:, None]) & (p[None, :] < hi.long()[:, None])
    order = torch.sort(torch.where(valid, scores, float("-inf")), dim=1, descending=True, stable=True).indices
    n = valid.sum(1).clamp(max=k)  # [R]
    keep = torch.arange(min(k, MAXP), device=scores.device)[None, :] < n[:, None]
    picked = torch.where(keep, order[:, :k], MAXP)  # MAXP sorts after every page
    picked = torch.sort(picked, dim=1).values
    out = torch.where(picked < MAXP, picked, -1).to(torch.int32)
    if out.shape[1] < k:
        out = torch.cat([out, out.new_full((R, k - out.shape[1]), -1)], dim=1)
    return out
