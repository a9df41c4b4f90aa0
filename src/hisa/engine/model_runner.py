"""Runs the model for one scheduled batch: builds the step's attention plan, runs, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hisa.attention.paged_decode import paged_decode_attention
from hisa.attention.prefill import gather_pages, prefill_attention
from hisa.engine.cuda_graph import DecodeGraphs, width_bucket
from hisa.engine.scheduler import ScheduledBatch
from hisa.kvcache.paged_cache import PagedKVCache


@dataclass
class StepPlan:
    """Host-built metadata of one step, shared by every layer (built once, read per layer).

    Rows are the step's tokens, requests concatenated in batch order. The dense fields cover only
    dense requests; sparse requests are planned by the SparseCoordinator.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    row_starts: list[int]  # first row of each request of the batch
    write_rows: torch.Tensor  # int64 [Td] rows of dense requests' new tokens
    write_pages: torch.Tensor  # int64 [Td] physical page of each of them
    write_offsets: torch.Tensor  # int64 [Td] slot within that page
    decode_rows: torch.Tensor  # int64 [Bd] rows of single-token (decode) dense requests
    decode_page_table: torch.Tensor  # int32 [Bd, max_pages], -1 padded
    decode_kv_lens: torch.Tensor  # int32 [Bd]
    prefills: list[tuple[int, int, torch.Tensor, int]]  # (row_start, row_end, pages int64 [n], ctx_len)
    sample_rows: torch.Tensor  # int64 [Bs] rows whose logits are sampled
    sample_index: list[int]  # index into batch.seqs of each sampled row
    max_position: int
    num_dense_tokens: int


class DenseAttention:
    """Dense paged attention: write new K/V into pages, attend over each request's pages.

    windows: per layer, the sliding window in tokens (Gemma-3's local layers) or None (all tokens).
    """

    def __init__(self, cache: PagedKVCache, plan: StepPlan, scale: float, windows: list[int | None] | None = None):
        self.cache, self.plan, self.scale = cache, plan, scale
        self.windows = windows or [None] * cache.num_layers

    def forward_rows(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Fill `out` [T, H, D] at the dense requests' rows."""
        plan, cache = self.plan, self.cache
        if not plan.num_dense_tokens:
            return
        cache.write(layer, plan.write_pages, plan.write_offsets, k[plan.write_rows], v[plan.write_rows])
        keys, values = cache.keys(layer), cache.values(layer)
        window = self.windows[layer]
        if plan.decode_rows.numel():
            out[plan.decode_rows] = paged_decode_attention(
                q[plan.decode_rows], keys, values, plan.decode_page_table, plan.decode_kv_lens, scale=self.scale,
                window=window)
        s = cache.page_size
        for start, end, pages, ctx in plan.prefills:
            first = 0
            if window is not None:  # the chunk's first query reaches back window - 1 tokens: skip older pages
                first = max(0, ctx - (end - start) - window + 1) // s
            out[start:end] = prefill_attention(q[start:end], gather_pages(keys, pages[first:], ctx - first * s),
                                               gather_pages(values, pages[first:], ctx - first * s),
                                               scale=self.scale, window=window)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, H, D]
        self.forward_rows(layer, q, k, v, out)
        return out


class ModelRunner:
    """Owns the model and the dense KV cache on the device.

    `sparse` (a SparseCoordinator) takes over attention for the step's sparse requests.
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device, sparse=None, *,
                 cuda_graphs: bool = False, max_model_len: int | None = None):
        """model: a `hisa.models` causal LM (LlamaForCausalLM, Gemma3ForCausalLM).

        cuda_graphs: capture pure decode steps (all dense or all sparse) in CUDA graphs
        (`hisa.engine.cuda_graph`); only on CUDA, else ignored.
        """
        self.model, self.cache, self.device, self.sparse = model, cache, device, sparse
        self.page_size = cache.page_size
        self.scale = model.config.attention_scale
        self.windows = model.config.layer_windows  # per layer: sliding window or None
        max_model_len = max_model_len or model.config.max_position_embeddings
        self.max_pages = -(-max_model_len // self.page_size)
        self.graphs = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(model, sparse, max_model_len=max_model_len)

    def plan(self, batch: ScheduledBatch) -> StepPlan:
        s = self.page_size
        ids, pos, wrows, wpages, woffs, starts = [], [], [], [], [], []
        dec_rows, dec_tables, dec_lens, prefills, sample_rows, sample_index = [], [], [], [], [], []
        row = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            c = seq.num_computed
            starts.append(row)
            ids.extend(seq.token_ids[c:c + n])
            positions = range(c, c + n)
            pos.extend(positions)
            ctx = c + n
            if ctx == seq.num_tokens:  # this step reaches the end of the known tokens: sample the next
                sample_rows.append(row + n - 1)
                sample_index.append(i)
            if not seq.sparse:
                wrows.extend(range(row, row + n))
                wpages.extend(seq.pages[p // s] for p in positions)
                woffs.extend(p % s for p in positions)
                if n == 1:
                    dec_rows.append(row)
                    dec_tables.append(seq.pages[: -(-ctx // s)])
                    dec_lens.append(ctx)
                else:
                    pages = torch.tensor(seq.pages[: -(-ctx // s)], dtype=torch.int64)
                    prefills.append((row, row + n, pages.to(self.device), ctx))
            row += n
        width = max((len(t) for t in dec_tables), default=1)
        if self.graphs is not None and dec_tables:  # captured steps: a width that serves many steps
            width = width_bucket(width, self.max_pages)
        table = torch.full((len(dec_tables), width), -1, dtype=torch.int32)
        for b, pages in enumerate(dec_tables):
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)

        def dev(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        return StepPlan(
            input_ids=dev(ids), positions=dev(pos), row_starts=starts, write_rows=dev(wrows),
            write_pages=dev(wpages), write_offsets=dev(woffs), decode_rows=dev(dec_rows),
            decode_page_table=table.to(self.device), decode_kv_lens=dev(dec_lens, torch.int32),
            prefills=prefills, sample_rows=dev(sample_rows), sample_index=sample_index,
            max_position=max(pos), num_dense_tokens=len(wrows),
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (fp32 logits [Bs, V] of the sampled rows, their indices in batch.seqs)."""
        plan = self.plan(batch)
        if self.model.config.dsa is not None:  # DeepSeek-V3.2 (MLA + DSA): its own attention over MLAKVCache
            from hisa.engine.dsa_attention import DSAAttention

            dense = DSAAttention(self.cache, plan, self.model.config)
        else:
            dense = DenseAttention(self.cache, plan, self.scale, self.windows)
        if self.sparse is not None and any(seq.sparse for seq in batch.seqs):
            attn = self.sparse.forward_begin(batch, plan, dense)
        else:
            attn = dense
        if self.graphs is not None and self.graphs.eligible(batch, attn):
            hidden = self.graphs.forward(plan, attn)
        else:
            hidden = self.model(plan.input_ids, plan.positions, attn, plan.max_position)
        logits = self.model.compute_logits(hidden[plan.sample_rows])
        if attn is not dense:
            self.sparse.forward_end()
        return logits, plan.sample_index
