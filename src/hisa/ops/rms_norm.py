"""RMSNorm fused with the residual add (Llama and Gemma forms).

A pre-norm decoder layer computes, around each sublayer, `r = h + residual; x = norm(r)`; Gemma-3
also norms the sublayer's output first (`h = post_norm(h)`). `rms_norm` does all of it in one
pass and returns both the normed row (the next sublayer's input) and `r` (the next residual): one
kernel launch on CUDA instead of five to eight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hisa.ops import pdl
from hisa.ops._checks import FLOAT_DTYPES, check_eps, check_tensor, next_pow2, want_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float, unit_offset: bool = False,
             residual: torch.Tensor | None = None, pre_weight: torch.Tensor | None = None,
             pre_eps: float | None = None, use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed rows and the new residual: `(norm(r), r)` with `r = pre_norm(x) + residual`.

    x:           [T, N] fp16/bf16/fp32, contiguous last dim (a sublayer's output, or the
                 embeddings before the first layer).
    weight:      [N] the norm's weight, any float dtype.
    eps:         added to mean(x^2) under the square root.
    unit_offset: Gemma's form: scale by (1 + weight) in fp32, then round to x's dtype. Otherwise
                 Llama's: round the normalized row to x's dtype, then multiply by weight.
    residual:    [T, N] in x's dtype, or None: then r = x (the first layer) and pre_weight must be None.
    pre_weight:  [N] Gemma's post-sublayer norm, applied to x (same form, eps `pre_eps`, default
                 `eps`) before the add; None adds x as it is.
    use_triton:  None = Triton iff x is on CUDA; True forces it (on CPU only under TRITON_INTERPRET=1).
    Returns (out [T, N] in x's dtype, r [T, N]); r is x itself when residual is None. Never
    writes into its inputs. Reads no tensor value on the host (CUDA-graph safe).

    Example::

        h, residual = rms_norm(attn_out, layer.post_attention_layernorm.weight, eps=1e-5,
                               residual=residual)   # h: the MLP's input, residual: x + attn_out
    """
    check_tensor("x", x, ndim=2, layout="[T, N]", dtype=FLOAT_DTYPES)
    n = x.shape[1]
    check_tensor("weight", weight, ndim=1, layout="[N]", dtype=FLOAT_DTYPES, like=x, shape=(n,))
    check_eps("eps", eps)
    if residual is not None:
        check_tensor("residual", residual, ndim=2, layout="[T, N]", dtype=x.dtype, like=x, shape=tuple(x.shape))
    if pre_weight is not None:
        if residual is None:
            raise ValueError("pre_weight (a post-sublayer norm) needs a residual to add to")
        check_tensor("pre_weight", pre_weight, ndim=1, layout="[N]", dtype=FLOAT_DTYPES, like=x, shape=(n,))
    pre_eps = eps if pre_eps is None else pre_eps
    check_eps("pre_eps", pre_eps)
    if want_triton(use_triton, x):
        return _launch_triton(x, weight, eps=eps, unit_offset=unit_offset, residual=residual,
                              pre_weight=pre_weight, pre_eps=pre_eps)
    return _rms_norm_torch(x, weight, eps=eps, unit_offset=unit_offset, residual=residual,
                           pre_weight=pre_weight, pre_eps=pre_eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, *, eps: float, unit_offset: bool = False,
                 residual: torch.Tensor | None = None, pre_weight: torch.Tensor | None = None,
                 pre_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch definition of `rms_norm` (same arguments, same result), step by step as
    transformers' LlamaRMSNorm / Gemma3RMSNorm and decoder layers compute it."""
    r = x
    if residual is not None:
        h = x if pre_weight is None else _norm_ref(x, pre_weight, eps if pre_eps is None else pre_eps, unit_offset)
        r = h + residual
    return _norm_ref(r, weight, eps, unit_offset), r


def _norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return (weight * xf.to(x.dtype)).to(x.dtype)


def _rms_norm_torch(x, weight, *, eps, unit_offset, residual, pre_weight, pre_eps):
    """The CPU path: `rms_norm_ref`, with torch's one-call rms_norm where it computes the same thing
    (fp32 rows and weights: no intermediate rounding to skip)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or \
            (pre_weight is not None and pre_weight.dtype != torch.float32):
        return rms_norm_ref(x, weight, eps=eps, unit_offset=unit_offset, residual=residual,
                            pre_weight=pre_weight, pre_eps=pre_eps)
    n = (x.shape[1],)
    r = x
    if residual is not None:
        h = x if pre_weight is None else F.rms_norm(x, n, 1.0 + pre_weight if unit_offset else pre_weight, pre_eps)
        r = h + residual
    return F.rms_norm(r, n, 1.0 + weight if unit_offset else weight, eps), r


def _launch_triton(x, weight, *, eps, unit_offset, residual, pre_weight, pre_eps):
    from hisa.ops.triton_rms_norm import rms_norm_kernel

    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    if t == 0:
        return out, res_out
    block = next_pow2(n)
    rms_norm_kernel[(t,)](
        x, residual if residual is not None else x, weight, pre_weight if pre_weight is not None else weight,
        out, res_out, n, x.stride(0), residual.stride(0) if residual is not None else 0, float(eps), float(pre_eps),
        HAS_RESIDUAL=residual is not None, HAS_PRE=pre_weight is not None, UNIT_OFFSET=bool(unit_offset),
        BLOCK_N=block, num_warps=min(16, max(1, block // 256)) if x.is_cuda else 1, **pdl.launch_kwargs(x, "linear"),
    )
    return out, res_out


@dataclass(frozen=True)
class NormedRows:
    """The rows `rms_norm(x, weight, eps=eps)[0]` (Llama's form, no residual), not computed yet.

    Made by `hisa.ops.linear.linear_add_norm`: the projection that ends a sublayer adds the residual
    (x is the new stream) and, in the same kernel, prepares the norm: `scaled` = x * weight and
    `sumsq`, per-column-block partial sums of x^2 (`hisa.ops.triton_linear`, ADD_NORM). A decode-batch
    projection that receives them (`linear`, `gate_up_act`) streams `scaled` and applies the norm
    factor to its products, so no norm kernel runs. Any other consumer calls `materialize()`.
    """

    x: torch.Tensor                     # [..., K] the residual stream
    weight: torch.Tensor                # [K] the norm's weight
    eps: float
    scaled: torch.Tensor | None = None  # [..., K] x * weight in x's dtype; None: not prepared
    sumsq: torch.Tensor | None = None   # fp32 [P, 16] partial sums of x^2 over P column blocks (row m in column m)

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def materialize(self) -> torch.Tensor:
        """The normed rows, computed by `rms_norm` ([..., K] in x's dtype)."""
        rows = self.x.reshape(-1, self.x.shape[-1])
        return rms_norm(rows, self.weight, eps=self.eps)[0].view(self.x.shape)
