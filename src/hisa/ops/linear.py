"""Projections of a decode batch: y = x @ w^T (+ bias) with few rows, bound by the weight's bytes.

At decode a projection multiplies a handful of rows (the batch) by a weight of tens to hundreds of
MB: its time is the time to stream the weight from HBM. cuBLAS's choices for the small projections
of an 8B model at 8 rows (q|k|v, o) reach ~72% of HBM bandwidth (split-K and a reduce kernel;
bench/results/linear_gpu_h200.json); one Triton program per BLOCK_N weight rows, pipelined over K,
reaches more. `linear` runs that kernel where it is the faster one (CUDA, fp16/bf16, at most MAX_M
rows, enough weight rows to fill the GPU) and F.linear everywhere else; `Linear` is an nn.Linear
whose forward calls it (the models' projections).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hisa.ops._checks import check_tensor, want_triton

MAX_M = 16  # rows the Triton kernel takes (x's rows are padded to 16 for the tensor cores)
BLOCK_N = 16  # weight rows per program
BLOCK_K = 256  # weight columns per pipelined step
STAGES = 4
WARPS = 4
MIN_PROGRAMS = 128  # fewer programs than this leave SMs idle: F.linear (cuBLAS splits K) is faster there
ENABLED = True  # False: every projection runs F.linear (A/B comparisons)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           use_triton: bool | None = None, block_n: int | None = None, block_k: int | None = None,
           num_stages: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias), shaped as F.linear: x [..., K], weight [N, K] -> [..., N].

    use_triton: None = the Triton kernel where it pays (see the module docstring), True forces it (CPU
    only under TRITON_INTERPRET=1; x must have at most MAX_M rows), False = F.linear. block_n,
    block_k, num_stages, num_warps tune the kernel (None: the module's defaults)."""
    if use_triton is None:
        use_triton = (ENABLED and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                      and weight.dtype == x.dtype and x.numel() // max(1, x.shape[-1]) <= MAX_M
                      and -(-weight.shape[0] // (block_n or BLOCK_N)) >= MIN_PROGRAMS)
    elif use_triton:
        use_triton = want_triton(True, x)
    if not use_triton:
        return F.linear(x, weight, bias)
    check_tensor("weight", weight, ndim=2, layout="[N, K]", like=x)
    lead, k = x.shape[:-1], x.shape[-1]
    if weight.shape[1] != k:
        raise ValueError(f"x's last dim {k} does not match weight {tuple(weight.shape)} [N, K]")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype} but x is {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    if m > MAX_M:
        raise ValueError(f"the Triton kernel takes at most {MAX_M} rows, got {m}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        from hisa.ops.triton_linear import skinny_linear_kernel

        bn = block_n or BLOCK_N
        skinny_linear_kernel[(-(-n // bn),)](
            x2, weight, y, m, n, x2.stride(0), weight.stride(0), y.stride(0), K=k,
            BLOCK_M=16, BLOCK_N=bn, BLOCK_K=block_k or BLOCK_K, STAGES=num_stages or STAGES,
            num_warps=num_warps or (WARPS if x.is_cuda else 1))
    if bias is not None:
        y += bias
    return y.view(*lead, n)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (the same parameters and checkpoint names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
