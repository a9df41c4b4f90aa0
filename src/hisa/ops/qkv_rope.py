"""Split a fused q|k|v projection into q, k, v and apply RoPE to q and k (Gemma-3: QK-norm first).

One kernel launch on CUDA where the unfused model runs three views, two norms and two rotations
of several ops each. The rotation is the rotate-half layout of Hugging Face Llama / Gemma (the
GGUF loader undoes llama.cpp's interleaving), computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hisa.ops import pdl
from hisa.ops._checks import FLOAT_DTYPES, check_eps, check_tensor, next_pow2, want_triton
from hisa.ops.rms_norm import _norm_ref


def qkv_rope(qkv: torch.Tensor, cos_sin: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int,
             q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
             eps: float = 1e-6, unit_offset: bool = True,
             use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a step from its fused projection, q and k rotated.

    qkv:           [T, (H + 2 * KVH) * D] fp16/bf16/fp32, rows [q heads | k heads | v heads]
                   (a fused q|k|v GEMM's output; any row stride, contiguous last dim).
    cos_sin:       fp32 [T, 2, D // 2]: cos and sin of each token's position per frequency
                   (`RotaryEmbedding.lookup`).
    num_heads, num_kv_heads, head_dim: H, KVH and D (D even).
    q_norm_weight, k_norm_weight: [D] each, or both None: Gemma-3's QK-norm, an RMSNorm over D per
                   head before the rotation (`eps`; `unit_offset` as in `hisa.ops.rms_norm.rms_norm`).
    use_triton:    None = Triton iff qkv is on CUDA; True forces it (on CPU only under TRITON_INTERPRET=1).
    Returns q [T, H, D], k [T, KVH, D], v [T, KVH, D], contiguous, in qkv's dtype. Reads no
    tensor value on the host (CUDA-graph safe).

    Example::

        qkv = layer.self_attn.qkv_proj(x)                      # [T, (H + 2 KVH) * D]
        q, k, v = qkv_rope(qkv, rope.lookup(positions), num_heads=32, num_kv_heads=8, head_dim=128)
    """
    _validate(qkv, cos_sin, num_heads, num_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps)
    args = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, q_norm_weight=q_norm_weight,
                k_norm_weight=k_norm_weight, eps=eps, unit_offset=unit_offset)
    if want_triton(use_triton, qkv):
        return _launch_triton(qkv, cos_sin, **args)
    if qkv.dtype == torch.float32 and all(w is None or w.dtype == torch.float32 for w in (q_norm_weight, k_norm_weight)):
        return _qkv_rope_fp32(qkv, cos_sin, **args)
    return qkv_rope_ref(qkv, cos_sin, **args)


def qkv_rope_ref(qkv: torch.Tensor, cos_sin: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, unit_offset: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch definition of `qkv_rope` (same arguments, same result)."""
    t, h, kvh, d = qkv.shape[0], num_heads, num_kv_heads, head_dim
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.reshape(t, h, d), k.reshape(t, kvh, d), v.reshape(t, kvh, d)
    if q_norm_weight is not None:
        q, k = _norm_ref(q, q_norm_weight, eps, unit_offset), _norm_ref(k, k_norm_weight, eps, unit_offset)
    cos = torch.cat([cos_sin[:, 0], cos_sin[:, 0]], dim=-1)[:, None]  # [T, 1, D]
    sin = torch.cat([cos_sin[:, 1], cos_sin[:, 1]], dim=-1)[:, None]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rotated = torch.cat([-xf[..., d // 2:], xf[..., : d // 2]], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k), v.contiguous()


def _qkv_rope_fp32(qkv, cos_sin, *, num_heads, num_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps,
                   unit_offset):
    """The CPU path in fp32 (nothing to round in between): 4 in-place-output ops per rotation."""
    t, h, kvh, d = qkv.shape[0], num_heads, num_kv_heads, head_dim
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.view(t, h, d), k.view(t, kvh, d), v.view(t, kvh, d)
    if q_norm_weight is not None:
        q = F.rms_norm(q, (d,), 1.0 + q_norm_weight if unit_offset else q_norm_weight, eps)
        k = F.rms_norm(k, (d,), 1.0 + k_norm_weight if unit_offset else k_norm_weight, eps)
    cos, sin = cos_sin[:, 0, None], cos_sin[:, 1, None]  # [T, 1, D/2]
    half = d // 2

    def rotate(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
        torch.mul(x1, cos, out=o1)
        o1.addcmul_(x2, sin, value=-1.0)
        torch.mul(x2, cos, out=o2)
        o2.addcmul_(x1, sin)
        return out

    return rotate(q), rotate(k), v.contiguous()


def _launch_triton(qkv, cos_sin, *, num_heads, num_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps,
                   unit_offset):
    from hisa.ops.triton_qkv_rope import qkv_rope_kernel

    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    if t == 0:
        return q, k, v
    norm = q_norm_weight is not None
    half = head_dim // 2
    qkv_rope_kernel[(t, num_heads + 2 * num_kv_heads)](
        qkv, cos_sin, q_norm_weight if norm else qkv, k_norm_weight if norm else qkv, q, k, v,
        qkv.stride(0), cos_sin.stride(0), float(eps),
        H=num_heads, KVH=num_kv_heads, HALF=half, BLOCK_H=next_pow2(half), HAS_NORM=norm,
        UNIT_OFFSET=bool(unit_offset), num_warps=1 if half <= 64 or not qkv.is_cuda else 2,
        **pdl.launch_kwargs(qkv, "linear"),
    )
    return q, k, v


def _validate(qkv, cos_sin, num_heads, num_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps) -> None:
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    check_tensor("qkv", qkv, ndim=2, layout="[T, (H + 2 KVH) * D]", dtype=FLOAT_DTYPES, shape=(None, width))
    check_tensor("cos_sin", cos_sin, ndim=3, layout="[T, 2, D // 2]", dtype=torch.float32, like=qkv,
                 shape=(qkv.shape[0], 2, head_dim // 2))
    if cos_sin.stride(1) != head_dim // 2:
        raise ValueError(f"cos_sin must be contiguous in its last two dims, got strides {cos_sin.stride()}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together: pass both (QK-norm) or neither")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None:
            check_tensor(name, w, ndim=1, layout="[D]", dtype=FLOAT_DTYPES, like=qkv, shape=(head_dim,))
    check_eps("eps", eps)
