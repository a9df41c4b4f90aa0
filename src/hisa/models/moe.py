"""DeepSeek-V3's mixture of experts: sigmoid router with group-limited top-k, routed and shared experts.

Routing (as transformers' DeepseekV32TopkRouter, in fp32): scores = sigmoid(x W_r^T); for choosing,
a per-expert bias is added (`e_score_correction_bias`); experts are split into `n_group` groups,
each group is scored by the sum of its two best biased scores, the `topk_group` best groups are
kept, and the `num_experts_per_tok` best biased scores among their experts are the token's
experts. Their weights are the unbiased scores, normalized to sum 1 (`norm_topk_prob`), times
`routed_scaling_factor`. The shared experts (one MLP of `n_shared_experts x moe_intermediate_size`)
see every token.

The routed experts are stored fused, as transformers 5 holds them: `gate_up_proj` [E, 2I, hidden]
(gate rows then up rows) and `down_proj` [E, hidden, I]; checkpoints with one tensor per expert
(`experts.{e}.gate_proj.weight`, ...) are converted on load (`fuse_expert_tensors`).

Ways to run the experts, chosen by shapes, dtype and device only (never by the routing), so a
decode step stays graph-capturable:
  * few tokens (T x k <= E and the gathered weights <= 1 GiB; small-batch decode): gather each
    (token, slot)'s expert weights and run batched mat-vecs: reads only the chosen experts (copied
    once), no host sync;
  * otherwise, where PyTorch's grouped GEMM runs without a host sync (CPU; CUDA bf16 on sm90/sm100) and the
    shapes meet its 16-byte stride rule: the (token, slot) rows sorted by expert, the per-expert row
    offsets computed on the device, and two grouped GEMMs (gate/up, down) over all experts at once;
  * else, up to 64 tokens with at most 64 experts: every expert over every token, weighted by the
    (mostly zero) routing weight: no host sync, and with T x k > E most experts are read anyway;
  * else (e.g. fp32 or fp16 on CUDA past 64 tokens): the sorted rows, one expert at a time (one host
    sync for the counts, so such a decode step is not captured in a CUDA graph).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hisa.errors import ModelLoadError
from hisa.models.config import ModelConfig

_DENSE_EXPERTS_MAX_TOKENS = 64  # every-expert path: at most this many tokens ...
_DENSE_EXPERTS_MAX_EXPERTS = 64  # ... and experts
_GATHER_MAX_BYTES = 2**30  # gathered-weights path: at most this many bytes of copied expert weights


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): DeepSeek's dense MLP and its shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopkRouter(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dsa
        self.num_experts, self.top_k = d.n_routed_experts, d.num_experts_per_tok
        self.n_group, self.topk_group = d.n_group, d.topk_group
        self.norm_topk_prob, self.scaling = d.norm_topk_prob, d.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(d.n_routed_experts, cfg.hidden_size))
        # a parameter (not a buffer) so checkpoints load it like any weight; kept in fp32 (see fp32_parameters)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(d.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] → (fp32 weights [T, k], int64 expert ids [T, k])."""
        t = x.shape[0]
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias.float()  # [T, E]
        if self.n_group > 1:
            grouped = choice.view(t, self.n_group, self.num_experts // self.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
            group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0).bool()  # [T, G]
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, self.num_experts)  # [T, E]
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # [T, k]
        weights = scores.gather(1, ids)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


class RoutedExperts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dsa
        self.num_experts, self.inter = d.n_routed_experts, d.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(d.n_routed_experts, 2 * self.inter, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(d.n_routed_experts, cfg.hidden_size, self.inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], fp32 weights [T, k], int64 ids [T, k] → [T, hidden]: sum_k weight * expert(x)."""
        t, k = ids.shape
        expert_bytes = (self.gate_up_proj[0].numel() + self.down_proj[0].numel()) * self.down_proj.element_size()
        if t * k <= self.num_experts and t * k * expert_bytes <= _GATHER_MAX_BYTES:
            return self._gathered(x, weights, ids)
        if self._grouped_mm_runs(x):
            return self._grouped_mm(x, weights, ids)
        if t <= _DENSE_EXPERTS_MAX_TOKENS and self.num_experts <= _DENSE_EXPERTS_MAX_EXPERTS:
            return self._every_expert(x, weights, ids)
        return self._grouped(x, weights, ids)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, self.down_proj[e])  # [n, hidden]

    def _gathered(self, x, weights, ids):
        t, k = ids.shape
        flat = ids.reshape(-1)  # [T*k]
        xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T*k, hidden, 1]
        gate, up = torch.bmm(self.gate_up_proj[flat], xs).squeeze(-1).chunk(2, dim=-1)  # [T*k, I] each
        y = torch.bmm(self.down_proj[flat], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [T*k, hidden]
        y = (y.float() * weights.reshape(-1, 1)).to(x.dtype).view(t, k, -1)  # [T, k, hidden]
        return y.sum(dim=1)

    def _every_expert(self, x, weights, ids):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            w = (weights * (ids == e)).sum(dim=-1, keepdim=True)  # fp32 [T, 1], 0 where e is not chosen
            out += (self._expert(e, x).float() * w).to(x.dtype)
        return out

    def _grouped_mm_runs(self, x: torch.Tensor) -> bool:
        """Whether `F.grouped_mm` takes x without a host sync: on the CPU any float dtype; on CUDA only
        bf16 on Hopper or datacenter Blackwell (sm90, sm100: PyTorch's CUTLASS kernels; checked on an
        H200 under sync-debug mode; elsewhere PyTorch falls back to a loop that copies the offsets to
        the host). Every row stride must be a multiple of 16 bytes."""
        if not hasattr(F, "grouped_mm") or x.dtype != self.down_proj.dtype:
            return False
        if x.device.type == "cuda":
            if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
                return False
        elif x.device.type != "cpu":
            return False
        size = x.element_size()
        return all(n * size % 16 == 0 for n in (x.shape[1], self.inter))

    @staticmethod
    def _sorted_rows(x, weights, ids):
        """The (token, slot) rows sorted by expert: order [T*k], their tokens [T*k], inputs [T*k, hidden]
        and fp32 routing weights [T*k]."""
        order = ids.reshape(-1).argsort(stable=True)
        tokens = order // ids.shape[1]
        return order, tokens, x[tokens], weights.reshape(-1)[order]

    def _grouped_mm(self, x, weights, ids):
        t, k = ids.shape
        flat = ids.reshape(-1)  # [T*k]
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # [E], on the device
        offs = counts.cumsum(0, dtype=torch.int32)  # [E]: end row of each expert's group
        order, _, xs, ws = self._sorted_rows(x, weights, ids)
        gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)  # [T*k, I] each
        ys = F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)  # [T*k, hidden]
        ys = (ys.float() * ws[:, None]).to(x.dtype)
        back = torch.empty_like(order)
        back[order] = torch.arange(t * k, device=x.device)  # sorted row of each (token, slot)
        return ys[back].view(t, k, -1).sum(dim=1)  # no atomics: the same sum in every run

    def _grouped(self, x, weights, ids):
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts).tolist()  # host sync: no CUDA graph
        _, tokens, xs, ws = self._sorted_rows(x, weights, ids)
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys[start:start + n] = (self._expert(e, xs[start:start + n]).float() * ws[start:start + n, None]).to(x.dtype)
            start += n
        return torch.zeros_like(x).index_add_(0, tokens, ys)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dsa
        self.gate = TopkRouter(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = (GatedMLP(cfg.hidden_size, d.moe_intermediate_size * d.n_shared_experts)
                               if d.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] → [T, hidden]."""
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


_EXPERT_TENSOR = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_expert_tensors(tensors: Iterator[tuple[str, torch.Tensor]], num_experts: int
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn one-tensor-per-expert checkpoint names into the fused `experts.gate_up_proj` [E, 2I, hidden]
    and `experts.down_proj` [E, hidden, I] of each layer (yielded once the layer's experts are all
    read); every other tensor passes through. Buffers one layer's experts at a time when the file
    lists them together (safetensors files are sorted by name)."""
    pending: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in tensors:
        m = _EXPERT_TENSOR.match(name)
        if m is None:
            yield name, tensor
            continue
        prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
        if e >= num_experts:
            raise ModelLoadError(f"checkpoint tensor {name}: expert {e} but the config has {num_experts} experts")
        parts = pending.setdefault(prefix, {})
        parts[(e, kind)] = tensor
        if len(parts) == 3 * num_experts:
            yield f"{prefix}.gate_up_proj", torch.stack(
                [torch.cat([parts[(i, "gate_proj")], parts[(i, "up_proj")]], dim=0) for i in range(num_experts)])
            yield f"{prefix}.down_proj", torch.stack([parts[(i, "down_proj")] for i in range(num_experts)])
            del pending[prefix]
    if pending:
        prefix = next(iter(pending))
        raise ModelLoadError(f"checkpoint: {prefix} has {len(pending[prefix])} of the {3 * num_experts} expert "
                             "tensors (gate_proj, up_proj, down_proj per expert)")
