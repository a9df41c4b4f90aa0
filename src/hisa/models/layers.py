"""Building blocks shared by the model families: fused projections and the residual RMSNorm.

`FusedLinear` runs several projections of one input as one GEMM (q|k|v, gate|up; `hisa.ops.linear`
at decode batch sizes on CUDA) and remembers
the checkpoint names of its parts, so `checkpoint_targets` maps every Hugging Face name
(`...self_attn.q_proj.weight`) to the rows of the fused parameter it fills: checkpoints load by
their own names, into the fused weights, with no copy of the parts kept.
"""

from __future__ import annotations

import torch
from torch import nn

from hisa.ops.linear import Linear, linear_add_norm, prepares_norm
from hisa.ops.rms_norm import NormedRows, rms_norm


class FusedLinear(Linear):
    """One GEMM for several projections of the same input; the output is their concatenation.

    parts: checkpoint name of each projection (a sibling of this module) → its output size, in
    output order. Example::

        qkv_proj = FusedLinear(576, {"q_proj": 576, "k_proj": 192, "v_proj": 192}, bias=False)
        qkv = qkv_proj(x)   # [T, 960] = [q | k | v]
    """

    def __init__(self, in_features: int, parts: dict[str, int], *, bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)


def checkpoint_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every checkpoint (Hugging Face) parameter name of `model` → the tensor a loader copies it into.

    A plain parameter is its own target; a `FusedLinear`'s weight (and bias) gives one target per
    part, a view of its rows (`model.layers.0.self_attn.k_proj.weight` → rows 576..767 of
    `model.layers.0.self_attn.qkv_proj.weight`). Tied parameters appear under every name.
    """
    fused = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, FusedLinear)}
    targets: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        module = fused.get(owner)
        if module is None:
            targets[name] = param
            continue
        parent = owner.rpartition(".")[0]
        start = 0
        for part, size in module.parts.items():
            targets[f"{parent}.{part}.{leaf}" if parent else f"{part}.{leaf}"] = param.detach()[start:start + size]
            start += size
    return targets


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, in fp32, cast back to the input dtype (`hisa.ops.rms_norm`).

    unit_offset=False is Llama's (weight starts at 1; `weight * normed.to(dtype)`), True is
    Gemma's (weight starts at 0, the offset from 1; `(normed * (1 + weight)).to(dtype)`).
    `forward(x)` norms; `add_norm(x, residual)` also adds the residual first and returns both, one
    kernel on CUDA.
    """

    def __init__(self, dim: int, eps: float, *, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] → [..., dim]."""
        rows = x.reshape(-1, x.shape[-1])  # [T, dim]
        return rms_norm(rows, self.weight, eps=self.eps, unit_offset=self.unit_offset)[0].view(x.shape)

    def add_norm(self, x: torch.Tensor | NormedRows, residual: torch.Tensor | None,
                 pre_norm: RMSNorm | None = None) -> tuple[torch.Tensor | NormedRows, torch.Tensor]:
        """(norm(r), r) with r = pre_norm(x) + residual: a sublayer's output x [T, dim] joins the
        residual stream and is normed for the next sublayer. residual None (the first layer): r = x.
        pre_norm: Gemma's post-sublayer norm, applied to x before the add (fused too).
        x may be this norm's `NormedRows` from `project_add` (the add done, the norm prepared): they
        pass through as norm(r), for the next projection to apply."""
        if isinstance(x, NormedRows):
            if x.weight is not self.weight or residual is not None or pre_norm is not None:
                raise ValueError("NormedRows reach add_norm only from project_add with this norm")
            return x, x.x
        if residual is None:
            return self(x), x
        if pre_norm is not None and pre_norm.unit_offset != self.unit_offset:
            raise ValueError("pre_norm and this norm must share one form (unit_offset)")
        return rms_norm(x, self.weight, eps=self.eps, unit_offset=self.unit_offset, residual=residual,
                        pre_weight=None if pre_norm is None else pre_norm.weight,
                        pre_eps=None if pre_norm is None else pre_norm.eps)


def project_add(proj: Linear, a: torch.Tensor, residual: torch.Tensor | None,
                norm: RMSNorm | None) -> tuple[torch.Tensor | NormedRows, torch.Tensor | None]:
    """A sublayer's last projection and its residual, as `norm.add_norm` takes them next: (proj(a),
    residual), or, where proj's kernel adds the residual and prepares the norm in its epilogue (a
    bf16 decode batch on CUDA: `hisa.ops.linear.linear_add_norm`), (NormedRows, None): no add+norm
    kernel, and the projection after the norm applies it. norm None (the last layer, whose
    final norm is left alone) or Gemma's form: the plain pair."""
    if residual is not None and norm is not None and not norm.unit_offset and prepares_norm(a, proj.weight, proj.bias):
        return linear_add_norm(a, proj.weight, proj.bias, residual, norm.weight, norm.eps), None
    return proj(a), residual
