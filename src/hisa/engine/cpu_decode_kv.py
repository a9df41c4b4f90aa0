"""CPU decode: each decoding request's K/V kept contiguous per KV head, beside the paged cache.

On the CPU, paged decode attention is a gather of the request's pages into one [KVH, n, D] run per
KV head, then SDPA's fused kernel (`hisa.attention.reference.paged_decode_attention_ref`). SDPA on
the CPU is fast only on contiguous [n, D] runs (on the token-major [n, KVH, D] rows a page holds it
is ~3x slower), and the gather re-copies the whole context at every step and layer: at 4K tokens it
was ~20% of a SmolLM2 decode step. transformers avoids neither (its cache is contiguous but grows by
`torch.cat`, a copy of the context per step and layer).

`CpuDecodeKV` keeps, for each dense request that decodes, its K and V of every layer in one
preallocated [layers, 2, KVH, capacity, D] fp32 tensor: built once from the paged cache at the
request's first decode step, then extended by the step's new token (one small copy per layer), so
attention reads it in place. The paged cache stays the source of truth (prefill, preemption, the
host pool and L3 all use it); this copy is a cache of it and may be dropped at any step. It holds
at most `budget_bytes` (rows past the budget use the paged path); an entry lives only while its
request keeps decoding: it is freed when the request ends (`forget`) or is not among a step's
decode rows (preempted, or back to prefill).

Numerics: the same tokens reach the same SDPA call in fp32 as on the paged path (whose gather
also upcasts), so the outputs are the same.

Example::

    kv = CpuDecodeKV(num_layers=30, num_kv_heads=3, head_dim=64, budget_bytes=2**30)
    step = kv.plan([(row, seq.request_id, t) for row, seq, t in dense_rows])
    out = step.attend(layer, q, k, v, cache_k, cache_v, table, kv_lens, scale=scale, window=None,
                      paged=paged_decode_attention)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hisa.attention.reference import gather_head_runs

GROW_TOKENS = 512  # capacity is kept a multiple of this (a request re-allocates once per GROW_TOKENS steps)


@dataclass
class _Entry:
    data: torch.Tensor  # fp32 [layers, 2, KVH, capacity, D]
    valid: int  # tokens written in every layer before this step


@dataclass
class _Row:
    row: int  # index in the step's decode rows
    entry: _Entry
    start: int  # tokens already held (entry.valid at plan time)
    t: int  # tokens after this step's token


class CpuDecodeKV:
    """Per-request contiguous K/V for CPU decode (see the module docstring)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.budget_bytes = budget_bytes
        self._entries: dict[object, _Entry] = {}

    def token_bytes(self) -> int:
        """Bytes one token takes here (all layers, K and V, fp32)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4

    @property
    def nbytes(self) -> int:
        return sum(e.data.numel() * 4 for e in self._entries.values())

    def forget(self, key: object) -> None:
        """Free a finished or aborted request's copy now (not at the next step)."""
        self._entries.pop(key, None)

    def plan(self, rows: list[tuple[int, object, int]]) -> CpuDecodeStep:
        """rows: the step's dense decode rows as (row index, request key, t = tokens after this step's
        token). Frees the entries of requests not in `rows`; returns the step's plan (rows without
        an entry, past the budget, attend through the paged cache)."""
        keys = {key for _, key, _ in rows}
        for key in [k for k in self._entries if k not in keys]:
            del self._entries[key]
        used = self.nbytes
        planned = []
        for row, key, t in rows:
            entry = self._entries.get(key)
            if entry is not None and entry.valid > t - 1:  # the request went back (should not happen): rebuild
                used -= entry.data.numel() * 4
                del self._entries[key]
                entry = None
            need = -(-t // GROW_TOKENS) * GROW_TOKENS
            if entry is None or entry.data.shape[3] < t:
                have = 0 if entry is None else entry.data.numel() * 4
                extra = need * self.token_bytes() - have
                if used + extra > self.budget_bytes:
                    if entry is not None:  # cannot grow: give its room back, the row goes the paged way
                        used -= have
                        del self._entries[key]
                    continue
                data = torch.empty(self.num_layers, 2, self.num_kv_heads, need, self.head_dim, dtype=torch.float32)
                if entry is None:
                    entry = self._entries[key] = _Entry(data, 0)
                else:
                    data[:, :, :, :entry.valid] = entry.data[:, :, :, :entry.valid]
                    entry.data = data
                used += extra
            planned.append(_Row(row, entry, entry.valid, t))
            entry.valid = t  # every layer of this step writes up to t
        return CpuDecodeStep(planned)


@dataclass
class CpuDecodeStep:
    """One step's plan: which decode rows attend over their contiguous copy."""

    rows: list[_Row] = field(default_factory=list)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, table: torch.Tensor, kv_lens: torch.Tensor, *, scale: float,
               window: int | None, paged) -> torch.Tensor:
        """Decode attention of one layer for every row of the step.

        q [B, H, D], k/v [B, KVH, D] (the new tokens, already written to the paged cache),
        k_cache/v_cache [P, S, KVH, D], table int32 [B, max_pages], kv_lens int32 [B].
        `paged(q, k_cache, v_cache, table, kv_lens, scale=, window=)` attends the rows this plan
        does not hold (it skips rows of kv_len 0). Returns [B, H, D] in q's dtype.
        """
        if not self.rows:
            return paged(q, k_cache, v_cache, table, kv_lens, scale=scale, window=window)
        lens = kv_lens.clone()
        lens[[r.row for r in self.rows]] = 0  # these rows are attended below
        out = paged(q, k_cache, v_cache, table, lens, scale=scale, window=window)
        H, D = q.shape[1:]
        KVH = k.shape[1]
        S = k_cache.shape[1]
        for r in self.rows:  # one SDPA per request: their lengths differ (the CPU path loops rows anyway)
            kv = r.entry.data[layer]  # [2, KVH, capacity, D]
            first = 0 if window is None else max(0, r.t - window)  # later steps never reach further back
            if r.t - r.start == 1:  # the usual step: append the new token
                kv[0, :, r.start] = k[r.row]
                kv[1, :, r.start] = v[r.row]
            else:  # first step of this request here: copy its (attended) context from the paged cache once
                lo = max(r.start, first)
                pages = table[r.row, lo // S: -(-r.t // S)].long()
                span = slice(lo % S, lo % S + r.t - lo)
                kv[0, :, lo:r.t] = gather_head_runs(k_cache, pages, span)
                kv[1, :, lo:r.t] = gather_head_runs(v_cache, pages, span)
            qg = q[r.row].float().view(KVH, H // KVH, D)[None]  # [1, KVH, G, D]
            o = F.scaled_dot_product_attention(qg, kv[0, None, :, first:r.t], kv[1, None, :, first:r.t], scale=scale)
            out[r.row] = o[0].reshape(H, D).to(out.dtype)
        return out
