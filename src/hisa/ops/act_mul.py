"""The gated MLP's activation: act(gate) * up over a fused gate|up projection, one launch on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hisa.ops import pdl
from hisa.ops._checks import FLOAT_DTYPES, check_tensor, next_pow2, want_triton

ACTIVATIONS = ("silu", "gelu_tanh")  # Llama family, Gemma-3


def act_mul(gate_up: torch.Tensor, *, act: str, use_triton: bool | None = None) -> torch.Tensor:
    """act(gate) * up, the input of the MLP's down projection.

    gate_up:    [T, 2 * I] fp16/bf16/fp32, rows [gate | up] (a fused gate|up GEMM's output; any
                row stride, contiguous last dim).
    act:        "silu" (Llama, Mistral, Qwen2) or "gelu_tanh" (Gemma-3: GELU, tanh approximation).
    use_triton: None = Triton iff gate_up is on CUDA; True forces it (on CPU only under TRITON_INTERPRET=1).
    Returns [T, I] in gate_up's dtype, contiguous.

    Example::

        h = mlp.down_proj(act_mul(mlp.gate_up_proj(x), act="silu"))
    """
    check_tensor("gate_up", gate_up, ndim=2, layout="[T, 2 * I]", dtype=FLOAT_DTYPES)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must hold two halves [gate | up], got an odd width {gate_up.shape[1]}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if want_triton(use_triton, gate_up):
        return _launch_triton(gate_up, act)
    return act_mul_ref(gate_up, act=act)


def act_mul_ref(gate_up: torch.Tensor, *, act: str) -> torch.Tensor:
    """Plain-torch definition of `act_mul` (also its CPU path: two ops, no faster torch form)."""
    gate, up = gate_up.chunk(2, dim=-1)
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")
    return a * up


def _launch_triton(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    from hisa.ops.triton_act_mul import act_mul_kernel

    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(1024, next_pow2(inter))
    act_mul_kernel[(t, -(-inter // block))](gate_up, out, inter, gate_up.stride(0), ACT=ACTIVATIONS.index(act),
                                            BLOCK=block, num_warps=4 if gate_up.is_cuda else 1,
                                            **pdl.launch_kwargs(gate_up, "linear"))
    return out
