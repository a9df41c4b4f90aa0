"""I/O step: copy missed pages (rows) from the host pool into device slots, and back (offload).

Layout: one layer's pages are rows. host_kv [H_PAGES, ROW] (pinned CPU when the engine runs on
CUDA) and dev_kv [D_SLOTS, ROW], ROW = 2 * page_size * kv_heads * head_dim (a page's K then V).
Either may be a row view of a bigger tensor (e.g. `pool[layer]` of [layers, pages, ROW]): any
stride of dim 0 is honoured, the last dim must be contiguous.

Paths:
  * Triton (a CUDA tensor on either side, the other on CUDA or pinned host): one kernel gathers
    the rows; a pinned host tensor is read/written in place through unified virtual addressing
    (zero-copy, ~PCIe bandwidth for rows >= 1 KiB). No host sync, so it is graph-capturable.
  * torch (CPU tensors, or an unpinned host side): index_select + index_copy_. It filters the
    -1 entries with a boolean mask, which syncs on CUDA: a fallback, not the hot path.

Mapping logical pages to rows: `resolve_host_rows` turns a diff step's (load_pages, load_slots)
into (src_rows, dst_rows) with torch ops only.

Example::

    src, dst = resolve_host_rows(res.load_pages, res.load_slots,
                                 host_page_table=host_table, slot_base=slot_base)
    load_pages(pool.layer_rows(layer), buffer_kv[layer], src, dst)
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_BYTES = 16384  # bytes one Triton program copies (a row of 256 KiB -> 16 programs)


def load_pages(host_kv: torch.Tensor, dev_kv: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor,
               *, backend: str = "auto", block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
    """dev_kv[dst_rows[i]] = host_kv[src_rows[i]] for every i where both entries are >= 0.

    host_kv: [H_PAGES, ROW] source rows (pinned CPU for the zero-copy path, or any device).
    dev_kv: [D_SLOTS, ROW] destination rows, same dtype and ROW.
    src_rows, dst_rows: int32/int64 [N], on dev_kv's device for the Triton path (N is fixed, -1
      entries are skipped, so a padded batch keeps one shape). dst rows must be distinct.
    backend: "auto" (Triton when a CUDA tensor is involved and the other side is CUDA or pinned),
      "triton" (on CPU tensors only under TRITON_INTERPRET=1) or "torch".
    block_bytes: bytes per Triton program (a power of two >= 16).
    """
    copy_rows(host_kv, dev_kv, src_rows, dst_rows, backend=backend, block_bytes=block_bytes)


def store_pages(dev_kv: torch.Tensor, host_kv: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor,
                *, backend: str = "auto", block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
    """Offload: host_kv[dst_rows[i]] = dev_kv[src_rows[i]] where both are >= 0 (load_pages reversed).

    dev_kv [D_SLOTS, ROW] -> host_kv [H_PAGES, ROW]; with a pinned host_kv on the CUDA path the
    GPU writes host memory directly. Same rules as `load_pages`.
    """
    copy_rows(dev_kv, host_kv, src_rows, dst_rows, backend=backend, block_bytes=block_bytes)


def copy_rows(src_kv: torch.Tensor, dst_kv: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor,
              *, backend: str = "auto", block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
    """dst_kv[dst_rows[i]] = src_kv[src_rows[i]] where both >= 0; the direction-free core of the I/O step."""
    _validate(src_kv, dst_kv, src_rows, dst_rows, block_bytes)
    if backend == "auto":
        backend = "triton" if _uva_ok(src_kv, dst_kv) else "torch"
    if backend == "torch":
        _copy_rows_torch(src_kv, dst_kv, src_rows, dst_rows)
    elif backend == "triton":
        _copy_rows_triton(src_kv, dst_kv, src_rows, dst_rows, block_bytes)
    else:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def resolve_host_rows(load_pages: torch.Tensor, load_slots: torch.Tensor, *, host_page_table: torch.Tensor,
                      slot_base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a diff step's misses into row pairs for `load_pages`; torch ops only, no sync.

    load_pages: int32 [R, K] logical page ids to load (-1 padded), load_slots: int32 [R, K] local
      slots to fill (as returned by `lru_diff`).
    host_page_table: int32/int64 [R, max_logical_pages], host pool row of each logical page of
      request row r (-1 = not on the host); every loaded page id must be < max_logical_pages.
    slot_base: int32/int64 [R], first global slot of row r in the device buffer.
    Returns (src_rows, dst_rows), int64 [R * K]: host row and global device slot of each miss,
    both -1 where there is nothing to load (padding, or a page with no host row).
    """
    has = (load_pages >= 0) & (load_slots >= 0)  # [R, K]
    host = host_page_table.gather(1, load_pages.clamp(min=0).long()).long()  # [R, K]
    src = torch.where(has & (host >= 0), host, -1)
    dst = torch.where(src >= 0, slot_base.long()[:, None] + load_slots.long(), -1)
    return src.reshape(-1), dst.reshape(-1)


# -- internals -----------------------------------------------------------------------------------
def _validate(src_kv, dst_kv, src_rows, dst_rows, block_bytes) -> None:
    for name, t in (("source rows tensor", src_kv), ("destination rows tensor", dst_kv)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be [rows, ROW], got shape {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if src_kv.dtype != dst_kv.dtype or src_kv.shape[1] != dst_kv.shape[1]:
        raise ValueError(f"rows differ: {src_kv.dtype} [*, {src_kv.shape[1]}] vs {dst_kv.dtype} [*, {dst_kv.shape[1]}]")
    for name, t in (("src_rows", src_rows), ("dst_rows", dst_rows)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32/int64 [N], got {t.dtype} {tuple(t.shape)}")
    if src_rows.shape != dst_rows.shape or src_rows.device != dst_rows.device:
        raise ValueError(f"src_rows {tuple(src_rows.shape)} on {src_rows.device} and dst_rows "
                         f"{tuple(dst_rows.shape)} on {dst_rows.device} must match")
    if block_bytes < 16 or block_bytes & (block_bytes - 1):
        raise ValueError(f"block_bytes must be a power of two >= 16, got {block_bytes}")


def _uva_ok(src_kv: torch.Tensor, dst_kv: torch.Tensor) -> bool:
    """True when a CUDA kernel can address both tensors (CUDA, or pinned host memory)."""
    if not (src_kv.is_cuda or dst_kv.is_cuda):
        return False
    if all(t.is_cuda for t in (src_kv, dst_kv)):
        return True
    if torch.cuda.is_current_stream_capturing():
        # a captured decode step (hisa.engine.cuda_graph) records the calls its eager run just made
        # with these very tensors, where this check passed; is_pinned() is a driver query, kept
        # out of the capture
        return True
    return all(t.is_cuda or t.is_pinned() for t in (src_kv, dst_kv))


def _copy_rows_torch(src_kv, dst_kv, src_rows, dst_rows) -> None:
    keep = (src_rows >= 0) & (dst_rows >= 0)
    s = src_rows[keep].to(src_kv.device).long()  # boolean indexing: a sync on CUDA (fallback path)
    d = dst_rows[keep].to(dst_kv.device).long()
    rows = src_kv.index_select(0, s)  # [n, ROW] on the source device
    dst_kv.index_copy_(0, d, rows.to(dst_kv.device, non_blocking=rows.is_pinned()))


def _pick_unit(*tensors: torch.Tensor) -> int:
    """Widest unit (4, 2 or 1 bytes) dividing every row width, row stride and base address."""
    for unit in (4, 2, 1):
        if all((t.shape[1] * t.element_size()) % unit == 0 and (t.stride(0) * t.element_size()) % unit == 0
               and t.data_ptr() % unit == 0 for t in tensors):
            return unit
    return 1


def _copy_rows_triton(src_kv, dst_kv, src_rows, dst_rows, block_bytes) -> None:
    from hisa.kvcache.triton_io import copy_rows_kernel

    n = src_rows.shape[0]
    if n == 0 or src_kv.shape[1] == 0:
        return
    if (src_kv.is_cuda or dst_kv.is_cuda) and not _uva_ok(src_kv, dst_kv):
        raise ValueError("the Triton path reads host memory through UVA: allocate the host tensor with "
                         "pin_memory=True (or call with backend='torch')")
    kernel_dev = dst_kv.device if dst_kv.is_cuda else src_kv.device
    if src_rows.device != kernel_dev:
        raise ValueError(f"src_rows/dst_rows must be on {kernel_dev} for the Triton path, got {src_rows.device}")
    unit = _pick_unit(src_kv, dst_kv)
    src_u, dst_u = src_kv.view(_UNIT_DTYPES[unit]), dst_kv.view(_UNIT_DTYPES[unit])  # [*, W] units
    W = src_u.shape[1]
    block = min(max(16, block_bytes // unit), _next_pow2(W))
    grid = (n, -(-W // block))
    copy_rows_kernel[grid](src_u, dst_u, src_rows, dst_rows, W, src_u.stride(0), dst_u.stride(0),
                           BLOCK=block, num_warps=4 if block >= 1024 else 1)


_UNIT_DTYPES = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
