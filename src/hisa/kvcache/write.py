"""Write one new token per decode row into the KV pages: the device page, and the host page too.

A row's token goes to device page `pages[r]` at offset `(t[r] - 1) % S` and, where `host_pages[r]
>= 0` (host-backed sparse requests, whose full KV lives in the host pool), to that host page at the
same offset: write-through, so the host always holds the full KV and an evicted device page never
needs writing back. One Triton launch per layer on CUDA (the host side through UVA, no CPU copy, no
sync, so a captured decode step can replay it); the torch reference elsewhere.

Layout: a page of one layer is one row [2, S, KVH, D] (K then V), as in `PagedKVCache` and
`HostKVPool`.
"""

from __future__ import annotations

import torch

from hisa.ops import pdl


def write_token_kv(k: torch.Tensor, v: torch.Tensor, dev_rows: torch.Tensor, pages: torch.Tensor,
                   t: torch.Tensor, *, host_rows: torch.Tensor | None = None,
                   host_pages: torch.Tensor | None = None, page_size: int, use_triton: bool | None = None) -> None:
    """dev_rows[pages[r]] (and host_rows[host_pages[r]]) at token (t[r] - 1) % S <- k[r], v[r].

    k, v: [R, KVH, D] (rows may be strided views; the inner [KVH, D] contiguous).
    dev_rows: [P, ROW] one layer of the device pool; host_rows: [HP, ROW] that layer's host pool.
    pages, t: int32 [R] on the device; host_pages: int32 [R] (-1: no host copy). Rows with a page
    of -1 or t == 0 (padding) write nothing.
    """
    R, KVH, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    for name, x in (("k", k), ("v", v)):
        if x.stride(2) != 1 or x.stride(1) != D:
            raise ValueError(f"{name} must be contiguous within a row ([KVH, D]), got strides {x.stride()}")
    row = 2 * page_size * KVH * D
    if dev_rows.dim() != 2 or dev_rows.shape[1] != row:
        raise ValueError(f"dev_rows must be [pages, {row}] (2 * page_size * KVH * D), got {tuple(dev_rows.shape)}")
    if (host_rows is None) != (host_pages is None):
        raise ValueError("host_rows and host_pages go together")
    if host_rows is not None and (host_rows.dim() != 2 or host_rows.shape[1] != row):
        raise ValueError(f"host_rows must be [pages, {row}], got {tuple(host_rows.shape)}")
    if R == 0:
        return
    if use_triton is None:
        use_triton = k.is_cuda
    if not use_triton:
        write_token_kv_ref(k, v, dev_rows, pages, t, host_rows=host_rows, host_pages=host_pages,
                           page_size=page_size)
        return
    from hisa.kvcache.triton_write import write_token_kv_kernel

    kd = KVH * D
    has_host = host_rows is not None
    write_token_kv_kernel[(R,)](
        k, v, dev_rows, host_rows if has_host else dev_rows, pages, host_pages if has_host else pages, t,
        k.stride(0), v.stride(0), dev_rows.stride(0), host_rows.stride(0) if has_host else 0,
        KD=kd, S=page_size, BLOCK=triton_next_pow2(kd), HAS_HOST=has_host, num_warps=4 if kd >= 512 else 1,
        **pdl.launch_kwargs(k, "kv_write"))


def write_token_kv_ref(k, v, dev_rows, pages, t, *, host_rows=None, host_pages=None, page_size: int) -> None:
    """Plain-torch write_token_kv (same arguments)."""
    R, KVH, D = k.shape
    offsets = ((t.long() - 1) % page_size)
    for rows, where in ((dev_rows, pages), (host_rows, host_pages)):
        if rows is None:
            continue
        keep = (where >= 0) & (t > 0)
        idx = torch.nonzero(keep.to(rows.device), as_tuple=True)[0]  # syncs on CUDA: the reference path
        if idx.numel() == 0:
            continue
        view = rows.view(rows.shape[0], 2, page_size, KVH, D)
        p, o = where.to(rows.device).long()[idx], offsets.to(rows.device)[idx]
        view[p, 0, o] = k[idx.to(k.device)].to(device=rows.device, dtype=rows.dtype)
        view[p, 1, o] = v[idx.to(v.device)].to(device=rows.device, dtype=rows.dtype)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def write_token_rows(rows: torch.Tensor, host_rows: torch.Tensor, host_pages: torch.Tensor, t: torch.Tensor, *,
                     page_size: int) -> None:
    """MLA write-through: host_rows[host_pages[r]] at token (t[r] - 1) % S <- rows[r], for rows with
    host_pages[r] >= 0 and t[r] > 0.

    rows: [R, Dl + Dr] the new tokens' latent rows (device); host_rows: [HP, S * (Dl + Dr)] one
    layer of the host pool; host_pages, t: int32 [R] on the device. Through the I/O kernel (a UVA
    scatter on CUDA: no CPU copy, no sync; index copies elsewhere).
    """
    from hisa.kvcache.io import store_pages

    width = rows.shape[1]
    tokens = host_rows.view(-1, width)  # [HP * S, Dl + Dr]: one row per token
    keep = (host_pages >= 0) & (t > 0)
    dst = torch.where(keep, host_pages.long() * page_size + (t.long() - 1) % page_size, -1)
    store_pages(rows.to(host_rows.dtype).contiguous(), tokens, torch.arange(rows.shape[0], device=rows.device), dst)
