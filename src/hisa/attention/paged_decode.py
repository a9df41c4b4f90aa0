"""Paged decode attention, dense and sparse alike: one query token per request over its KV pages.

A request's KV sequence is the concatenation of the pages listed in its page-table row; dense
paging lists all its pages in order (the last one partial), sparse attention lists a selected
subset of full pages with the partially-filled newest page last. Both are the same call.

`paged_decode_attention` is the entry point: it checks its arguments, then runs the Triton
split-KV kernels (`triton_paged_decode.py`) on CUDA, or the torch reference (`reference.py`)
elsewhere. It reads no tensor value on the host (no `.item()`), so it can be captured in a CUDA
graph; the number of splits depends only on shapes and the device.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from hisa.attention.reference import paged_decode_attention_ref
from hisa.ops import pdl

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KV_EVICT = os.environ.get("HISA_KV_EVICT", "")  # L2 eviction hint of the split kernel's K/V loads (A/B runs)
_MAX_SPLITS = 128  # the combine kernel holds one [num_splits, D] fp32 tile in registers
_AUTO_MAX_SPLITS = 64
_PROGRAMS_PER_SM = 4  # programs of the split kernel resident per SM (see default_num_splits)
_INTERPRETER_SMS = 4  # stand-in SM count off CUDA (interpreter): a few splits, fast tests
_LOG2E = 1.4426950408889634


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           page_table: torch.Tensor, kv_lens: torch.Tensor, *, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           use_triton: bool | None = None, block_n: int | None = None,
                           window: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Attention of each request's new token over its paged KV (GQA, softmax in fp32).

    q:          [B, H, D] fp16/bf16/fp32, last dim contiguous.
    k_cache:    [P, S, KVH, D] keys, P physical pages of S tokens; any strides but a contiguous
                last dim (usually k = kv[:, 0] of one [P, 2, S, KVH, D] tensor).
    v_cache:    [P, S, KVH, D] values, same shape and dtype as k_cache (e.g. kv[:, 1]).
    page_table: int32 [B, max_pages] physical page ids in virtual order; entries past the
                request's pages are -1 and never read.
    kv_lens:    int32 [B] valid tokens per request (0 for padded rows, which output zeros);
                token i is page_table[b, i // S] at offset i % S; kv_lens[b] <= max_pages * S.
    scale:      softmax scale, usually D ** -0.5.
    num_splits: KV splits per (request, kv head) (flash-decoding); None picks enough to fill the
                GPU from B, KVH, max_pages and the SM count (`default_num_splits`).
    out:        optional [B, H, D] output in q's dtype to write into.
    use_triton: None = Triton iff q is on CUDA; True forces Triton (on CPU only under
                TRITON_INTERPRET=1); False forces the torch reference.
    block_n:    tokens per kernel iteration (a tuning knob, power of two >= 16); None = 64.
    num_stages: software-pipelining depth of the split kernel on CUDA (a tuning knob); None = 3.
    window:     sliding-window attention (Gemma-3's local layers): only the last `window` tokens
                of each request's virtual sequence are attended, positions kv_len - window ..
                kv_len - 1 (the newest token included); the kernel skips the older blocks. The
                page table's tail must then hold the contiguous latest pages. None = all tokens.
    Returns [B, H, D] in q's dtype. Query head h reads kv head h // (H // KVH). When q's dtype
    differs from the cache's, the kernel casts q to the cache dtype before the products.

    Example::

        kv = torch.randn(64, 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda")  # [P, 2, S, KVH, D]
        q = torch.randn(2, 32, 128, dtype=torch.bfloat16, device="cuda")           # [B, H, D]
        table = torch.tensor([[5, 9, 2], [7, -1, -1]], dtype=torch.int32, device="cuda")
        lens = torch.tensor([40, 3], dtype=torch.int32, device="cuda")
        o = paged_decode_attention(q, kv[:, 0], kv[:, 1], table, lens, scale=128 ** -0.5)  # [2, 32, 128]
    """
    _validate(q, k_cache, v_cache, page_table, kv_lens, scale=scale, num_splits=num_splits, out=out,
              block_n=block_n)
    if window is not None and not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if use_triton is None:
        use_triton = q.is_cuda
    if not use_triton:
        ref = paged_decode_attention_ref(q, k_cache, v_cache, page_table, kv_lens, scale=scale, window=window)
        if out is None:
            return ref
        return out.copy_(ref)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("use_triton=True with CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported; move the tensors to CUDA or pass use_triton=False")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.shape[0] == 0:
        return out
    _launch_triton(q, k_cache, v_cache, page_table, kv_lens, out, scale=scale, num_splits=num_splits,
                   block_n=64 if block_n is None else block_n, window=window, num_stages=num_stages)
    return out


def default_num_splits(*, batch: int, num_kv_heads: int, max_tokens: int, block_n: int,
                       device: torch.device) -> int:
    """The most splits whose batch * num_kv_heads * splits programs still run in one wave.

    One wave = 4 programs per SM (at D=128 the split kernel takes 128 registers x 128 threads, so 4
    fit). Filling it hides the dependent page-table -> K/V loads; a partial second wave is worse
    (H100, bf16, 8 kv heads, 32k tokens: B=8 reads 2.9 TB/s at 8 splits, 512 programs, and 2.2 TB/s
    at 9 splits, 576). Capped by the KV blocks and at 64; at least 1. Depends only on shapes and
    the device (never on kv_lens values), so it is graph-safe.
    """
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _INTERPRETER_SMS
    want = _PROGRAMS_PER_SM * sms // max(1, batch * num_kv_heads)
    max_blocks = max(1, -(-max_tokens // block_n))
    return max(1, min(want, max_blocks, _AUTO_MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                   kv_lens: torch.Tensor, out: torch.Tensor, *, scale: float, num_splits: int | None,
                   block_n: int, window: int | None, num_stages: int | None = None) -> None:
    from hisa.attention.triton_paged_decode import paged_decode_combine_kernel, paged_decode_split_kernel

    B, H, D = q.shape
    S, KVH = k_cache.shape[1], k_cache.shape[2]
    G = H // KVH
    max_tokens = page_table.shape[1] * S
    if num_splits is None:
        # a window caps the tokens any request reads: fewer splits then fill the GPU just as well
        attended = max_tokens if window is None else min(max_tokens, window)
        num_splits = default_num_splits(batch=B, num_kv_heads=KVH, max_tokens=attended, block_n=block_n,
                                        device=q.device)
    block_g = max(16, _next_pow2(G))  # tl.dot needs M >= 16
    block_d = max(16, _next_pow2(D))
    direct = num_splits == 1
    m_ws, l_ws, acc_ws = split_workspaces(out, num_splits, D)
    gpu = q.is_cuda
    paged_decode_split_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, page_table, kv_lens, out, m_ws, l_ws, acc_ws,
        scale * _LOG2E,
        H, max_tokens, num_splits, max_tokens if window is None else window,  # no window: all tokens
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0), kv_lens.stride(0),
        out.stride(0), out.stride(1),
        D=D, S=S, G=G, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, DIRECT_OUT=direct,
        INTERPRETER=os.environ.get("TRITON_INTERPRET") == "1", KV_EVICT=KV_EVICT if gpu else "",
        num_warps=4 if gpu else 1, num_stages=(num_stages or 3) if gpu else 1, **pdl.launch_kwargs(q, "attention"),
    )
    if not direct:
        block_s = _next_pow2(num_splits)  # one [BLOCK_S, BLOCK_D] fp32 tile per program
        paged_decode_combine_kernel[(B, H)](
            m_ws, l_ws, acc_ws, out, H, D, num_splits, out.stride(0), out.stride(1),
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=8 if block_s * block_d > 8192 else 4,
            **pdl.launch_kwargs(q, "attention"),
        )


def split_workspaces(out: torch.Tensor, num_splits: int, d: int) -> tuple[torch.Tensor, ...]:
    """The split kernels' fp32 partials for out [B, H, *]: (max [B, H, NS], sum [B, H, NS], acc
    [B, H, NS, d]); with one split the kernel writes `out` directly and these are not read."""
    if num_splits == 1:
        return out, out, out
    B, H = out.shape[:2]
    f32 = dict(dtype=torch.float32, device=out.device)
    return (torch.empty(B, H, num_splits, **f32), torch.empty(B, H, num_splits, **f32),
            torch.empty(B, H, num_splits, d, **f32))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _validate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
              kv_lens: torch.Tensor, *, scale: float, num_splits: int | None, out: torch.Tensor | None,
              block_n: int | None) -> None:
    """Raise ValueError with an actionable message on any bad argument (shapes, dtypes, devices, strides)."""
    for name, t, ndim, shape in (("q", q, 3, "[B, H, D]"), ("k_cache", k_cache, 4, "[P, S, KVH, D]"),
                                 ("v_cache", v_cache, 4, "[P, S, KVH, D]"),
                                 ("page_table", page_table, 2, "[B, max_pages]"), ("kv_lens", kv_lens, 1, "[B]")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(t.shape)}")
    B, H, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    P, S, KVH, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has D={D}, k_cache/v_cache have D={Dk}")
    if S < 1 or KVH < 1 or D < 1:
        raise ValueError(f"page_size, num_kv_heads and head_dim must be >= 1, got cache shape {tuple(k_cache.shape)}")
    if H % KVH != 0:
        raise ValueError(f"num query heads H={H} must be a multiple of num kv heads KVH={KVH} (GQA)")
    if page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32, got {page_table.dtype}; convert with .to(torch.int32)")
    if kv_lens.dtype != torch.int32:
        raise ValueError(f"kv_lens must be int32, got {kv_lens.dtype}; convert with .to(torch.int32)")
    if page_table.shape[0] != B or kv_lens.shape[0] != B:
        raise ValueError(f"batch mismatch: q has B={B}, page_table has {page_table.shape[0]} rows, "
                         f"kv_lens has {kv_lens.shape[0]} entries")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q dtype must be one of {_FLOAT_DTYPES}, got {q.dtype}")
    if k_cache.dtype not in _FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share one dtype of {_FLOAT_DTYPES}, "
                         f"got {k_cache.dtype} and {v_cache.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, page_table, kv_lens)}
    if len(devices) != 1:
        raise ValueError(f"q, k_cache, v_cache, page_table, kv_lens must be on one device, got "
                         f"{q.device}, {k_cache.device}, {v_cache.device}, {page_table.device}, {kv_lens.device}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("page_table", page_table)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}; "
                             "call .contiguous() or pass a view with unit stride there")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if num_splits is not None and not (isinstance(num_splits, int) and 1 <= num_splits <= _MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {_MAX_SPLITS}], got {num_splits!r}")
    if block_n is not None and not (isinstance(block_n, int) and block_n >= 16 and block_n & (block_n - 1) == 0):
        raise ValueError(f"block_n must be None or a power of two >= 16, got {block_n!r}")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be [B, H, D] = {tuple(q.shape)} {q.dtype} on {q.device}, "
                             f"got {tuple(out.shape)} {out.dtype} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError(f"out must be contiguous in its last dim, got strides {out.stride()}")
