"""Greedy decoding's argmax over the vocabulary, one token per row, on the device.

torch.argmax over a decode batch's logits ([8, 128256] bf16, after a cast to fp32) took 27 µs on an
H200: one reduction kernel with too few blocks for 8 long rows. `argmax` cuts each row into chunks
(program (row, chunk) writes the chunk's best value and its first index), and a second launch
merges a row's chunks: two short kernels, no cast. The same index as torch.argmax: the first
maximum; a NaN counts as larger than any number (the first NaN wins), as torch's CUDA argmax does.
"""

from __future__ import annotations

import torch

from hisa.ops._checks import FLOAT_DTYPES, check_tensor, next_pow2, want_triton

CHUNK = 4096  # columns per program of the first kernel


def argmax(logits: torch.Tensor, *, use_triton: bool | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """logits [B, V] fp16/bf16/fp32 (contiguous last dim) → int64 [B], the index of each row's maximum.

    use_triton: None = Triton iff on CUDA; True forces it (CPU only under TRITON_INTERPRET=1)."""
    check_tensor("logits", logits, ndim=2, layout="[B, V]", dtype=FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError("argmax of an empty row: logits must have at least one column")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    if not want_triton(use_triton, logits):
        return logits.argmax(dim=-1)
    from hisa.ops.triton_argmax import argmax_chunks_kernel, argmax_merge_kernel

    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    chunk = min(chunk, next_pow2(V))
    C = -(-V // chunk)
    vals = torch.empty(B, C, dtype=torch.float32, device=logits.device)
    idx = torch.empty(B, C, dtype=torch.int32, device=logits.device)
    warps = 8 if logits.is_cuda and chunk >= 2048 else 4 if logits.is_cuda else 1
    argmax_chunks_kernel[(B, C)](logits, vals, idx, V, C, logits.stride(0), CHUNK=chunk, num_warps=warps)
    argmax_merge_kernel[(B,)](vals, idx, out, C, BLOCK_C=max(2, next_pow2(C)), num_warps=1)
    return out
