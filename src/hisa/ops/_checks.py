"""Argument checks shared by the launchers of `hisa.ops` (one message style, raised at the boundary)."""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, *, ndim: int, layout: str, dtype: torch.dtype | tuple | None = None,
                 like: torch.Tensor | None = None, shape: tuple | None = None) -> None:
    """Raise ValueError unless `t` is a tensor of `ndim` dims (`layout` names them in the message),
    of `dtype` (one dtype or a tuple), on `like`'s device, of `shape` (None entries match any size),
    with a contiguous last dim."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if shape is not None and any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}{',' if len(shape) == 1 else ''}) {layout}, "
                         f"got {tuple(t.shape)}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,) if dtype is not None else None
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}; move them to one device")
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}; call .contiguous()")


def check_eps(name: str, eps) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {eps!r}")


def want_triton(use_triton: bool | None, x: torch.Tensor) -> bool:
    """None: Triton iff `x` is on CUDA. True on CPU tensors needs TRITON_INTERPRET=1 (tests)."""
    if use_triton is None:
        return x.is_cuda
    if use_triton and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("use_triton=True with CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                         "imported; move the tensors to CUDA or pass use_triton=False")
    return bool(use_triton)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
