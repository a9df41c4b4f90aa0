"""Runs the model for one scheduled batch: plans the step, runs it (eager or a CUDA-graph replay), returns logits.

Plan once per step, run per layer. The decode rows (every request that adds one token after a
computed context) are described by eight int32 numbers each, written into pinned memory and sent
in one copy (`DecodeBuffers`); the page tables, attended lengths and the sparse layout are derived
on the device from the per-request block table (device pages of dense and resident requests,
kept up to date as pages are added) and the sparse manager's state. A step of decode rows only is
captured once per shape and replayed. Prefill chunks (and steps that mix them with decodes) run
eagerly, decode rows first.
"""

from __future__ import annotations

import torch

from hisa.engine.cpu_decode_kv import CpuDecodeKV, CpuDecodeStep
from hisa.engine.cuda_graph import DecodeGraphs
from hisa.engine.decode_batch import DecodeBuffers, DecodeView, bucket, prepare_step
from hisa.engine.scheduler import ScheduledBatch
from hisa.engine.step_attention import PrefillChunk, StepAttention
from hisa.kvcache.paged_cache import PagedKVCache
from hisa.sparse.adaptor import DENSE, HOST_BACKED, RESIDENT


class ModelRunner:
    """Owns the model, the device page pool and the per-request block table.

    `sparse` (a SparseCoordinator) takes over the sparse requests' side of attention.
    """

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, device: torch.device, sparse=None, *,
                 max_num_seqs: int, cuda_graphs: bool = False, max_model_len: int | None = None,
                 graph_capture=None, scratch_page: int = -1, cpu_decode_kv_bytes: int = 0):
        """model: a `hisa.models` causal LM (LlamaForCausalLM, Gemma3ForCausalLM).

        cuda_graphs: capture decode steps in CUDA graphs (`hisa.engine.cuda_graph`); only on CUDA
        (or with `graph_capture`, a test's stand-in for the capture), else ignored.
        scratch_page: a device page no request owns, where padding rows of a decode step may write.
        cpu_decode_kv_bytes: on the CPU, the budget of `CpuDecodeKV` (dense decode rows attend over a
        contiguous copy of their K/V); 0 = off.
        """
        self.model, self.cache, self.device, self.sparse = model, cache, device, sparse
        self.page_size = cache.page_size
        self.scale = model.config.attention_scale
        self.windows = model.config.layer_windows  # per layer: sliding window or None
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.max_pages = -(-self.max_model_len // self.page_size)
        self.max_num_seqs = max_num_seqs
        self.buffers = DecodeBuffers(max_rows=max_num_seqs, max_seqs=max_num_seqs, max_pages=self.max_pages,
                                     sparse_sentinel=sparse.manager.sentinel if sparse is not None else 0,
                                     scratch_page=scratch_page, device=device)
        self.graphs = None
        if (cuda_graphs and device.type == "cuda") or graph_capture is not None:
            if sparse is None or sparse.algorithm.graph_safe:
                self.graphs = DecodeGraphs(device, capture=graph_capture)
            for rope in (getattr(model, "rope", None), getattr(model, "rope_local", None)):
                if rope is not None:  # the rotary tables must not grow inside a graph
                    rope._ensure(self.max_model_len, device)
        self._views: dict[tuple, DecodeView] = {}
        self.cpu_kv = None
        if device.type == "cpu" and cpu_decode_kv_bytes > 0 and model.config.dsa is None:
            self.cpu_kv = CpuDecodeKV(num_layers=cache.num_layers, num_kv_heads=cache.num_kv_heads,
                                      head_dim=cache.head_dim, budget_bytes=cpu_decode_kv_bytes)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, *, prev_tokens: torch.Tensor | None = None,
            prev_rows: dict | None = None) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns (fp32 logits [Bs, V] of the sampled rows, their indices in batch.seqs).

        Overlap mode: a decode row whose input token is still PENDING_TOKEN takes it on the device from
        `prev_tokens` (int64 [P], the previous step's sampled tokens) at index `prev_rows[seq]`."""
        if batch.demoted:
            self.sparse.apply_demotions(batch.demoted)
        decode_rows, decode_index, sparse_t, sparse_host, prefill, sources = [], [], [], [], [], []
        s = self.page_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            # a decode row computes the last known token of a request that has output (`_is_decode`); a
            # 1-token piece of a prompt (the step's token budget all but spent) is a prefill chunk: inside
            # the prompt its row is not sampled, and a sparse request's last prompt token attends to its
            # whole prompt, as in any chunk, not to a decode step's selected pages
            if n == 1 and seq.num_output and seq.num_computed == seq.num_tokens - 1 and not seq.needs_prefill:
                t = seq.num_computed + 1
                page = seq.pages[(t - 1) // s]
                if not seq.sparse:
                    kind, wpage, hpage = DENSE, page, -1
                elif seq.host_backed:
                    kind, wpage, hpage = HOST_BACKED, seq.buffer_pages[-1], page
                    sparse_t.append(t)
                    sparse_host.append(True)
                else:
                    kind, wpage, hpage = RESIDENT, page, -1
                    sparse_t.append(t)
                    sparse_host.append(False)
                sslot = seq.sparse_slot if seq.sparse else self.buffers.sparse_sentinel
                token, source = seq.token_ids[t - 1], -1
                if seq.pending:  # its input token is the previous step's, not read back yet
                    token, source = 0, prev_rows[seq]
                decode_rows.append((token, t - 1, t, seq.slot, sslot, kind, wpage, hpage))
                sources.append(source)
                decode_index.append(i)
            else:
                prefill.append(i)
        n = len(decode_rows)
        cpu_step = None
        if self.cpu_kv is not None:  # every step, so entries of requests that stopped decoding are freed
            cpu_step = self.cpu_kv.plan([(r, batch.seqs[i].request_id, row[2])
                                         for r, (i, row) in enumerate(zip(decode_index, decode_rows)) if row[5] == DENSE])
        kinds = {row[5] for row in decode_rows}
        has_sparse, has_host = bool(kinds & {RESIDENT, HOST_BACKED}), HOST_BACKED in kinds
        on_device = bool(kinds & {DENSE, RESIDENT})
        graphed = self.graphs is not None and n and not prefill
        n_pad = bucket(n, self.max_num_seqs) if graphed else n
        view = None
        if n:
            self.buffers.fill(decode_rows, n_pad, sources=sources if prev_tokens is not None else None,
                              prev_tokens=prev_tokens)
            key = (n_pad, has_sparse, has_host, on_device)
            view = self._views.get(key)
            if view is None:
                view = self._views[key] = self.buffers.view(n_pad, has_sparse=has_sparse, has_host_backed=has_host,
                                                            has_on_device=on_device)
        if graphed:
            hidden = self.graphs.run(key, lambda: self._forward(view, []))[:n]
            sample_index = decode_index
        elif not prefill:
            hidden = self._forward(view, [], cpu_kv=cpu_step)
            sample_index = decode_index
        else:
            chunks, ids, positions, sample_at, sample_index = self._plan_prefill(batch, prefill, start=n)
            hidden = self._forward(view, chunks, ids, positions, cpu_kv=cpu_step)
            hidden = hidden[torch.tensor(list(range(n)) + sample_at, dtype=torch.int64).to(self.device)]
            sample_index = decode_index + sample_index
        logits = self.model.compute_logits(hidden)
        if has_sparse:
            self.sparse.forward_end(sparse_t, sparse_host)
        elif self.sparse is not None:
            self.sparse.note_memory()
        return logits, sample_index

    def _plan_prefill(self, batch: ScheduledBatch, which: list[int], *, start: int):
        """Prefill chunks of the step, rows from `start` on. Host work per request (eager steps only)."""
        s = self.page_size
        chunks, ids, positions, sample_at, sample_index = [], [], [], [], []
        row = start
        for i in which:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            c = seq.num_computed
            ctx = c + n
            ids.extend(seq.token_ids[c:ctx])
            positions.extend(range(c, ctx))
            chunk = PrefillChunk(start=row, end=row + n, seq=seq, computed=c)
            seq.needs_prefill = False  # this chunk records its pages (and builds its representations)
            if seq.sparse and seq.host_backed:
                # from page 0, not c // s: a prefix loaded from L3 into the host pool is recorded here too
                self.sparse.manager.set_host_pages(seq.sparse_slot, 0, seq.pages[: -(-ctx // s)])
            else:
                pages = seq.pages[: -(-ctx // s)]
                # from page 0, not c // s: a prefix loaded from L3 was never prefilled through this slot
                self.buffers.set_pages(seq.slot, 0, pages)
                chunk.pages = torch.tensor(pages, dtype=torch.int64).to(self.device)
                chunk.write_pages = torch.tensor([pages[p // s] for p in range(c, ctx)], dtype=torch.int64).to(self.device)
                chunk.write_offsets = (torch.arange(c, ctx) % s).to(self.device)
            chunks.append(chunk)
            if ctx == seq.num_tokens:  # this chunk reaches the end of the known tokens: sample the next
                sample_at.append(row + n - 1)
                sample_index.append(i)
            row += n
        ids_t, pos_t = (torch.tensor(x, dtype=torch.int32).to(self.device) for x in (ids, positions))
        return chunks, ids_t, pos_t, sample_at, sample_index

    def _forward(self, view: DecodeView | None, chunks: list[PrefillChunk], prefill_ids=None,
                 prefill_positions=None, cpu_kv: CpuDecodeStep | None = None) -> torch.Tensor:
        """The step on the device: per-step preparation of the decode rows, then the model."""
        if view is not None:
            prepare_step(view, page_size=self.page_size,
                         host_table=self.sparse.manager.host_table if view.has_host_backed else None)
            if view.has_sparse:
                self.sparse.forward_begin(view)
        if self.model.config.dsa is not None:  # DeepSeek-V3.2 (MLA + DSA): its own attention over MLAKVCache
            from hisa.engine.dsa_attention import DSAAttention

            attn = DSAAttention(self.cache, self.model.config, decode=view, prefills=chunks, sparse=self.sparse)
        else:
            attn = StepAttention(cache=self.cache, scale=self.scale, windows=self.windows, decode=view,
                                 prefills=chunks, sparse=self.sparse, cpu_kv=cpu_kv)
        if not chunks:
            ids, positions, max_position = view.input_ids, view.positions, self.max_model_len
        else:
            ids, positions = prefill_ids, prefill_positions
            if view is not None:
                ids, positions = torch.cat([view.input_ids, ids]), torch.cat([view.positions, positions])
            max_position = max((c.computed + c.end - c.start for c in chunks), default=0)
            if view is not None:
                max_position = self.max_model_len
        return self.model(ids, positions, attn, max_position)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
        self._views.clear()
