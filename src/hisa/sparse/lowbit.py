"""lowbit: a token-level index of low-bit keys (the DSA analogue for models without a trained indexer).

Every context token's key of every KV head is kept on the device at 4 bits (2 as an option) with
per-group fp16 step and minimum (`hisa.sparse.lowbit_keys`). Each decode step and layer, every
token of a row's middle range is scored with it: softmax per query head over the middle tokens,
each page's attention mass per head (the sum of its tokens' softmax, what `oracle` ranks by with
exact keys), pooled over the GQA group (mean by default), summed over KV heads
(`hisa.sparse.lowbit_scores`); the top-k pages are attended. A needle token lifts its page even
when its neighbours are noise, which is where Quest's per-page bound fails on small models
(docs/eval.md). `lowbit-best` ranks a page by its best token instead (the first rule shipped: it
cut copied needles short and lost the aggregate task on SmolLM2, docs/eval.md).

Cost: (D * bits / 8 + 4 * D / group_size) bytes per token, KV head and layer on the device: 40 of
the 256 bytes of a bf16 K+V at head_dim 64 (15.6%), 24 at 2 bits (9.4%); the scoring kernel reads
all of it once per step and layer, against Quest's 2 * D * 2 / page_size bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hisa.sparse.base import BaseSparseAlgorithm, DecodeRows, register
from hisa.sparse.lowbit_keys import check_layout, lowbit_update, quantize_keys
from hisa.sparse.lowbit_scores import lowbit_page_scores
from hisa.sparse.page_scores import select_pages


@dataclass(frozen=True, slots=True)
class LowBitConfig:
    """bits: 4 or 2 per channel; group_size: channels sharing one (step, min), capped at head_dim;
    pool: how the query heads of a KV group share a page value ("mean" or "max"); page: a page's
    value for one head, its best token's softmax ("max") or the sum over its tokens ("mass", the
    attention mass the page would get: what `oracle` ranks by)."""

    bits: int = 4
    group_size: int = 32
    pool: str = "mean"
    page: str = "mass"

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"lowbit bits must be 2 or 4, got {self.bits}")
        if self.pool not in ("mean", "max"):
            raise ValueError(f"lowbit pool must be 'mean' or 'max', got {self.pool!r}")
        if self.page not in ("max", "mass"):
            raise ValueError(f"lowbit page must be 'max' or 'mass', got {self.page!r}")


@register("lowbit")
class LowBitAlgorithm(BaseSparseAlgorithm):
    """Token scores from 4-bit keys, page score = the page's attention mass (see the module docstring).

    Representations: codes uint8 [layers, slots + 1, max_pages * S, KVH, D * bits / 8] and scales
    fp16 [layers, slots + 1, max_pages * S, KVH, D / group, 2] on the device, indexed by (sparse
    slot, token). Scoring + top-k for the whole batch: three Triton kernels per layer (logits with
    softmax partials, merge into page scores, top-k select); the update after attention: one kernel.
    """

    writes_layout = True  # select_pages lays resident rows out (rows.layout)
    graph_safe = True  # device tensors only, no host sync
    lowbit = LowBitConfig()

    def __init__(self, **kw):
        super().__init__(**kw)
        cfg = self.lowbit
        self.bits, self.pool, self.page = cfg.bits, cfg.pool, cfg.page
        self.group_size = min(cfg.group_size, self.head_dim)
        check_layout(self.head_dim, self.bits, self.group_size)
        tokens = self.max_pages * self.page_size
        lead = (self.num_layers, self.max_requests + 1, tokens, self.num_kv_heads)
        # written by construct (prefill) or by the update of each new token before any read
        self.codes = torch.empty(*lead, self.head_dim * self.bits // 8, dtype=torch.uint8, device=self.device)
        self.scales = torch.empty(*lead, self.head_dim // self.group_size, 2, dtype=torch.float16,
                                  device=self.device)

    def metadata_bytes_per_page(self) -> int:
        per_token = self.codes[0, 0, 0].numel() + self.scales[0, 0, 0].numel() * self.scales.element_size()
        return self.num_layers * self.page_size * per_token

    def construct_representations(self, layer, slot, first_page, keys):
        codes, scales = quantize_keys(keys, bits=self.bits, group_size=self.group_size)  # NaN tail -> zeros
        start = first_page * self.page_size
        self.codes[layer, slot, start:start + keys.shape[0]] = codes
        self.scales[layer, slot, start:start + keys.shape[0]] = scales

    def update_representations(self, layer, rows: DecodeRows, keys):
        lowbit_update(self.codes[layer], self.scales[layer], keys, rows.sparse_slots, rows.t, bits=self.bits,
                      group_size=self.group_size, sentinel=self.max_requests)

    def retrieve_topk(self, layer, q, rows: DecodeRows):
        scores = lowbit_page_scores(q, self.codes[layer], self.scales[layer], rows.sparse_slots, rows.lo, rows.hi,
                                    scale=self.scale, page_size=self.page_size, bits=self.bits,
                                    group_size=self.group_size, pool=self.pool, page=self.page)
        return select_pages(scores, rows.lo, rows.hi, rows.num_select, layout=rows.layout)  # in page order


@register("lowbit-2bit")
class LowBit2Algorithm(LowBitAlgorithm):
    """lowbit with 2-bit codes: 60% of lowbit's metadata, lower recall (docs/eval.md)."""

    lowbit = LowBitConfig(bits=2)


@register("lowbit-max")
class LowBitMaxAlgorithm(LowBitAlgorithm):
    """lowbit with the group's query heads pooled by max instead of mean (for measurement)."""

    lowbit = LowBitConfig(pool="max")


@register("lowbit-best")
class LowBitBestAlgorithm(LowBitAlgorithm):
    """lowbit ranking pages by their best token's softmax instead of their attention mass (the rule
    lowbit shipped with until 2026-12-02; kept for measurement: docs/eval.md)."""

    lowbit = LowBitConfig(page="max")
