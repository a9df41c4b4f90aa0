"""The decode rows of a step as static device tensors: filled by one pinned host-to-device copy.

Every decode row (one new token of a running request) is eight int32 numbers the host knows:
token id, position, tokens once written (t), block-table slot, sparse slot, kind (dense, resident
sparse, host-backed sparse, padding), the device page its token goes to and the host page
(host-backed rows). The host writes them into a pinned [8, max_rows] buffer, one copy moves it to
the device, and everything else a step needs (page tables, attended lengths, layout bounds) is
derived there from device-side state, so the host work of a decode step is O(rows), not
O(rows x pages), and a captured step (CUDA graph) reads the same tensors at every replay.

Rows are padded up to a bucket size (`bucket`) so a few captured shapes serve every batch size;
a padding row attends to nothing and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hisa.sparse.adaptor import HOST_BACKED, PAD

FIELDS = ("input_ids", "positions", "t", "slot", "sparse_slot", "kind", "write_page", "write_host_page")
_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def bucket(n: int, limit: int) -> int:
    """The padded row count of a decode step of n rows (a captured shape serves every n up to it)."""
    for b in _BUCKETS:
        if b >= n:
            return min(b, limit)
    return min(-(-n // 128) * 128, limit)


@dataclass
class DecodeView:
    """The first n rows of the decode buffers (int32 device tensors [n] unless said otherwise)."""

    n: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    t: torch.Tensor
    slot: torch.Tensor
    sparse_slot: torch.Tensor
    kind: torch.Tensor
    write_page: torch.Tensor
    write_host_page: torch.Tensor
    table: torch.Tensor  # int32 [n, max_pages] the step's attention page table
    kv_lens: torch.Tensor  # int32 [n]
    block_table: torch.Tensor  # int32 [max_seqs + 1, max_pages] device page of each request's logical page
    has_sparse: bool
    has_host_backed: bool
    has_on_device: bool = True  # any dense or resident row (their KV all on the device)


class DecodeBuffers:
    """Preallocated per-step decode inputs and the per-request block table (see module docs).

    block_table row `pad_slot` (= max_seqs) stays all -1: padding rows point at it.
    """

    def __init__(self, *, max_rows: int, max_seqs: int, max_pages: int, sparse_sentinel: int,
                 device: torch.device, scratch_page: int = -1):
        self.max_rows, self.max_pages, self.device = max_rows, max_pages, device
        self.pad_slot, self.sparse_sentinel = max_seqs, sparse_sentinel
        pin = device.type == "cuda"
        # FIELDS, then one more row: where a row's input token comes from on the device (overlap mode:
        # its index in the previous step's sampled tokens, -1 = the token id field)
        self.host = torch.zeros(len(FIELDS) + 1, max_rows, dtype=torch.int32, pin_memory=pin)
        self._np = self.host.numpy()
        # a padding row: no token (t = 0), kind PAD, its write aimed at the scratch page (never read)
        self._pad = np.array([0, 0, 0, max_seqs, sparse_sentinel, PAD, scratch_page, -1], dtype=np.int32)[:, None]
        i32 = dict(dtype=torch.int32, device=device)
        self.dev = torch.zeros(len(FIELDS) + 1, max_rows, **i32)
        self.block_table = torch.full((max_seqs + 1, max_pages), -1, **i32)
        self.table = torch.full((max_rows, max_pages), -1, **i32)
        self.kv_lens = torch.zeros(max_rows, **i32)
        self._copied = torch.cuda.Event() if pin else None

    def fill(self, rows: list[tuple[int, ...]], n: int, *, sources: list[int] | None = None,
             prev_tokens: torch.Tensor | None = None) -> None:
        """Write `rows` (one tuple of FIELDS per decode row) and n - len(rows) padding rows, then copy
        them to the device in one transfer.

        Overlap mode: a row whose input token was sampled by the previous step, still on the device,
        takes it from there: `prev_tokens` (int64 [P] device, that step's sampled tokens) and
        `sources` (per row, its index in prev_tokens, or -1 to keep the row's token id field).
        The gather runs on the device after the copy, before the step (no host sync).
        """
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        r = len(rows)
        if r:
            self._np[:-1, :r] = np.asarray(rows, dtype=np.int32).T
            self._np[-1, :r] = -1 if sources is None else sources
        self._np[:-1, r:n] = self._pad
        self._np[-1, r:n] = -1
        self.dev.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if prev_tokens is not None and r:
            ids, src = self.dev[0, :r], self.dev[-1, :r]  # [r]
            ids.copy_(torch.where(src >= 0, prev_tokens.index_select(0, src.clamp(min=0)).to(torch.int32), ids))

    def view(self, n: int, *, has_sparse: bool, has_host_backed: bool, has_on_device: bool = True) -> DecodeView:
        fields = {name: self.dev[i, :n] for i, name in enumerate(FIELDS)}
        return DecodeView(n=n, table=self.table[:n], kv_lens=self.kv_lens[:n], block_table=self.block_table,
                          has_sparse=has_sparse, has_host_backed=has_host_backed, has_on_device=has_on_device,
                          **fields)

    def set_pages(self, slot: int, start: int, pages: list[int]) -> None:
        """Prefill: record device pages `pages` as logical pages start.. of the request in `slot`."""
        if pages:
            self.block_table[slot, start:start + len(pages)] = torch.tensor(pages, dtype=torch.int32).to(self.device)


def prepare_step(view: DecodeView, *, page_size: int, host_table: torch.Tensor | None) -> None:
    """On the device, once per decode step (captured with it): record each row's current page in the
    tables (a row may just have started one), the dense rows' page tables and attended lengths."""
    t, kind = view.t, view.kind
    page = (torch.clamp(t - 1, min=0) // page_size).long()
    on_device = (kind >= 0) & (kind != HOST_BACKED) & (t > 0)
    pad = view.block_table.shape[0] - 1
    view.block_table[torch.where(on_device, view.slot, pad).long(), page] = torch.where(on_device, view.write_page, -1)
    if view.has_host_backed:
        host = kind == HOST_BACKED
        sentinel = host_table.shape[0] - 1
        host_table[torch.where(host, view.sparse_slot, sentinel).long(), page] = torch.where(host, view.write_host_page, -1)
    torch.index_select(view.block_table, 0, view.slot.long(), out=view.table)
    view.kv_lens.copy_(t)
