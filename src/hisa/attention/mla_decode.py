"""MLA decode attention (absorbed form) over the paged latent cache, dense or over DSA's top-k.

`mla_decode_attention` checks its arguments, then runs the Triton split kernel
(`triton_mla_decode.py`) on CUDA, or the torch reference (`mla_reference.py`) elsewhere. It reads
no tensor value on the host (no `.item()`), so it can be captured in a CUDA graph; the number of
splits depends only on shapes and the device.
"""

from __future__ import annotations

import math
import os

import torch

from hisa.attention.mla_reference import mla_decode_attention_ref
from hisa.attention.paged_decode import _sm_count, split_workspaces

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 32  # the combine kernel holds one [num_splits, Dl] fp32 tile (Dl = 512 for DeepSeek)
_PROGRAMS_PER_SM = 4
_INTERPRETER_SMS = 4  # stand-in SM count off CUDA (interpreter): a few splits, fast tests
_LOG2E = 1.4426950408889634


def mla_decode_attention(q: torch.Tensor, latent_cache: torch.Tensor, page_table: torch.Tensor,
                         kv_lens: torch.Tensor, *, scale: float, kv_lora_rank: int,
                         indices: torch.Tensor | None = None, num_splits: int | None = None,
                         out: torch.Tensor | None = None, use_triton: bool | None = None,
                         block_h: int | None = None, block_n: int | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """Attention of each request's new (absorbed) query over its latent rows, softmax in fp32.

    q:            [B, H, Dl + Dr] fp16/bf16/fp32 absorbed queries, [q_nope W_UK | q_pe] per head
                  (see `mla_reference`), last dim contiguous.
    latent_cache: [P, S, Dl + Dr] one layer's latent rows (normed latent, then roped key), pages of S
                  tokens; any strides but a contiguous last dim. Or uint8 [P, S, W]: the rows in
                  DeepSeek's FP8 layout (`hisa.kvcache.mla_fp8`, W = Dl + 4 Dl / 128 + 2 Dr bytes),
                  dequantized into q's dtype as they are read.
    page_table:   int32 [B, max_pages] physical pages in token order, -1 past the request's pages.
    kv_lens:      int32 [B] tokens of each request (0 for padded rows: zeros out).
    scale:        softmax scale (DeepSeek: qk_head_dim ** -0.5 times YaRN's mscale squared).
    kv_lora_rank: Dl, the width of the value (the first Dl values of every row).
    indices:      int32 [B, K] token positions to attend (DSA's indexer top-k), -1 padded; entries
                  < 0 or >= kv_len are skipped. None: all kv_len tokens (dense MLA).
    num_splits:   item splits per (request, head block); None fills the GPU (shapes only).
    out:          optional [B, H, Dl] output in q's dtype.
    use_triton:   None = Triton iff q is on CUDA; True forces it (CPU only under TRITON_INTERPRET=1).
    block_h, block_n, num_warps: kernel tiling (powers of two >= 16 for the blocks); None takes
                  `default_mla_tiling`'s.
    Returns [B, H, Dl] in q's dtype.

    Example::

        cache = torch.randn(4096, 64, 576, dtype=torch.bfloat16, device="cuda")   # [P, S, 512 + 64]
        q = torch.randn(2, 128, 576, dtype=torch.bfloat16, device="cuda")          # [B, H, Dl + Dr]
        table = torch.arange(2 * 512, dtype=torch.int32, device="cuda").view(2, 512)
        lens = torch.tensor([32768, 20000], dtype=torch.int32, device="cuda")
        topk = torch.randint(0, 20000, (2, 2048), dtype=torch.int32, device="cuda")
        o = mla_decode_attention(q, cache, table, lens, scale=0.1, kv_lora_rank=512, indices=topk)  # [2, 128, 512]
    """
    tiling = default_mla_tiling(batch=q.shape[0], heads=q.shape[1], device=q.device)
    block_h, block_n, num_warps = (tiling[0] if block_h is None else block_h, tiling[1] if block_n is None else block_n,
                                   tiling[2] if num_warps is None else num_warps)
    _validate(q, latent_cache, page_table, kv_lens, indices, scale=scale, kv_lora_rank=kv_lora_rank,
              num_splits=num_splits, out=out, block_h=block_h, block_n=block_n)
    if use_triton is None:
        use_triton = q.is_cuda
    if not use_triton:
        if latent_cache.dtype == torch.uint8:  # the pages the table names, dequantized
            latent_cache, page_table = _unpacked_pages(latent_cache, page_table, kv_lora_rank, q.dtype)
        ref = mla_decode_attention_ref(q, latent_cache, page_table, kv_lens, scale=scale,
                                       kv_lora_rank=kv_lora_rank, indices=indices)
        return ref if out is None else out.copy_(ref)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("use_triton=True with CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported; move the tensors to CUDA or pass use_triton=False")
    B, H, _ = q.shape
    if out is None:
        out = torch.empty(B, H, kv_lora_rank, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    _launch(q, latent_cache, page_table, kv_lens, indices, out, scale=scale, kv_lora_rank=kv_lora_rank,
            num_splits=num_splits, block_h=block_h, block_n=block_n, num_warps=num_warps)
    return out


def _unpacked_pages(packed: torch.Tensor, page_table: torch.Tensor, kv_lora_rank: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pages page_table names, unpacked to dtype [B * max_pages, S, Dl + Dr], their table): the
    torch path's view of an FP8 cache, without unpacking pages no request reads."""
    from hisa.kvcache.mla_fp8 import unpack_latent

    B, W = page_table.shape
    rows = unpack_latent(packed[page_table.clamp(min=0).long().flatten()], kv_lora_rank=kv_lora_rank, dtype=dtype)
    table = torch.arange(B * W, dtype=torch.int32, device=page_table.device).view(B, W)
    return rows, torch.where(page_table >= 0, table, -1)


def default_mla_tiling(*, batch: int, heads: int, device: torch.device) -> tuple[int, int, int]:
    """(block_h, block_n, num_warps) by shapes and the device. Large batches of many heads take 64 heads
    x 64 rows in 8 warps once batch x head blocks fills every SM without splits: each latent row then
    serves 64 heads instead of 16 (bench/mla_decode_gpu.py, H200, 128 heads, top-2048 at 128K, batch
    273: 1.06 ms against 2.36 ms for 16 x 32 in 4 warps). Otherwise 16 x 32 in 4 warps, which leaves
    room for splits at small batches."""
    if device.type == "cuda" and heads >= 64:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if batch * -(-heads // 64) >= sms:
            return 64, 64, 8
    return 16, 32, 4


def default_mla_splits(*, batch: int, head_blocks: int, max_items: int, block_n: int, device: torch.device) -> int:
    """Splits whose batch * head_blocks * splits programs fill about one wave (4 per SM), capped by the
    item blocks and by 32; at least 1. Shapes and the device only: graph-safe."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _INTERPRETER_SMS
    want = _PROGRAMS_PER_SM * sms // max(1, batch * head_blocks)
    return max(1, min(want, max(1, -(-max_items // block_n)), _MAX_SPLITS))


def _launch(q, latent_cache, page_table, kv_lens, indices, out, *, scale, kv_lora_rank, num_splits, block_h,
            block_n, num_warps) -> None:
    from hisa.attention.triton_mla_decode import mla_decode_split_kernel
    from hisa.attention.triton_paged_decode import paged_decode_combine_kernel

    B, H, Dq = q.shape
    S = latent_cache.shape[1]
    Dl, Dr = kv_lora_rank, Dq - kv_lora_rank
    max_tokens = page_table.shape[1] * S
    sparse = indices is not None
    num_items = indices.shape[1] if sparse else max_tokens
    head_blocks = -(-H // block_h)
    if num_splits is None:
        num_splits = default_mla_splits(batch=B, head_blocks=head_blocks, max_items=num_items, block_n=block_n,
                                        device=q.device)
    direct = num_splits == 1
    m_ws, l_ws, acc_ws = split_workspaces(out, num_splits, Dl)
    idx = indices if sparse else page_table  # not read when dense
    gpu = q.is_cuda
    mla_decode_split_kernel[(B, head_blocks, num_splits)](
        q, latent_cache, page_table, kv_lens, idx, out, m_ws, l_ws, acc_ws,
        scale * _LOG2E,
        H, max_tokens, num_items, num_splits,
        q.stride(0), q.stride(1),
        latent_cache.stride(0), latent_cache.stride(1),
        page_table.stride(0), kv_lens.stride(0), idx.stride(0),
        out.stride(0), out.stride(1),
        DL=Dl, DR=Dr, S=S, BLOCK_H=block_h, BLOCK_DL=max(16, _next_pow2(Dl)), BLOCK_DR=max(16, _next_pow2(Dr)),
        BLOCK_N=block_n, SPARSE=sparse, DIRECT_OUT=direct, INTERPRETER=os.environ.get("TRITON_INTERPRET") == "1",
        FP8=latent_cache.dtype == torch.uint8, HW_CVT=gpu and os.environ.get("HISA_FP8_CVT", "hw") == "hw",
        num_warps=num_warps if gpu else 1, num_stages=2 if gpu else 1,
    )
    if not direct:
        block_s = _next_pow2(num_splits)
        block_d = max(16, _next_pow2(Dl))
        paged_decode_combine_kernel[(B, H)](
            m_ws, l_ws, acc_ws, out, H, Dl, num_splits, out.stride(0), out.stride(1),
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=8 if block_s * block_d > 8192 else 4,
        )


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _validate(q, latent_cache, page_table, kv_lens, indices, *, scale, kv_lora_rank, num_splits, out, block_h,
              block_n) -> None:
    """Raise ValueError with an actionable message on any bad argument (shapes, dtypes, devices, strides)."""
    named = [("q", q, 3, "[B, H, Dl + Dr]"), ("latent_cache", latent_cache, 3, "[P, S, Dl + Dr]"),
             ("page_table", page_table, 2, "[B, max_pages]"), ("kv_lens", kv_lens, 1, "[B]")]
    if indices is not None:
        named.append(("indices", indices, 2, "[B, K]"))
    for name, t, ndim, shape in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(t.shape)}")
    B, H, Dq = q.shape
    if not (isinstance(kv_lora_rank, int) and 0 < kv_lora_rank < Dq):
        raise ValueError(f"kv_lora_rank must be an int in (0, {Dq}) (the latent part of a row), got {kv_lora_rank!r}")
    fp8 = latent_cache.dtype == torch.uint8
    if fp8:
        from hisa.kvcache.mla_fp8 import packed_width

        want = packed_width(kv_lora_rank, Dq - kv_lora_rank)  # (raises unless Dl is a multiple of 128)
        if latent_cache.shape[2] != want:
            raise ValueError(f"an FP8 latent cache for Dl = {kv_lora_rank}, Dr = {Dq - kv_lora_rank} has rows of {want} "
                             f"bytes, got {latent_cache.shape[2]}")
    elif latent_cache.shape[2] != Dq:
        raise ValueError(f"row width mismatch: q has {Dq} values per head, latent_cache rows have "
                         f"{latent_cache.shape[2]}")
    for name, t in (("page_table", page_table), ("kv_lens", kv_lens), ("indices", indices)):
        if t is not None and t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}; convert with .to(torch.int32)")
    rows = [page_table.shape[0], kv_lens.shape[0]] + ([indices.shape[0]] if indices is not None else [])
    if any(r != B for r in rows):
        raise ValueError(f"batch mismatch: q has B={B}, page_table/kv_lens/indices have {rows} rows")
    if q.dtype not in _FLOAT_DTYPES or latent_cache.dtype not in _FLOAT_DTYPES + (torch.uint8,):
        raise ValueError(f"q must be one of {_FLOAT_DTYPES} and latent_cache too (or uint8: FP8 rows), got {q.dtype} "
                         f"and {latent_cache.dtype}")
    tensors = [q, latent_cache, page_table, kv_lens] + ([indices] if indices is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"q, latent_cache, page_table, kv_lens and indices must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")
    for name, t in (("q", q), ("latent_cache", latent_cache), ("page_table", page_table), ("indices", indices)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if num_splits is not None and not (isinstance(num_splits, int) and 1 <= num_splits <= _MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {_MAX_SPLITS}], got {num_splits!r}")
    for name, v in (("block_h", block_h), ("block_n", block_n)):
        if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0):
            raise ValueError(f"{name} must be a power of two >= 16, got {v!r}")
    if out is not None and (out.shape != (B, H, kv_lora_rank) or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be [B, H, Dl] = {(B, H, kv_lora_rank)} {q.dtype} on {q.device} with a contiguous "
                         f"last dim, got {tuple(out.shape)} {out.dtype} on {out.device}")
