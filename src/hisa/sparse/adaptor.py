"""BackendAdaptor: logical page selections → the page table our attention kernel reads."""

from __future__ import annotations

import torch


class BackendAdaptor:
    """Builds, per step, how each request's attended page list is laid out, and per layer, turns the
    algorithm's logical middle selection into that list.

    Layout of a row: [sink pages | selected middle pages | recent pages ... current page], then -1.
    The partially written page is last, so the paged-decode kernel's `kv_lens` (tokens of the
    virtual concatenation) masks exactly its unwritten tail. Everything but the middle selection is
    known on the host, so the per-layer work is one gather on the device.
    """

    def __init__(self, *, page_size: int, sink_pages: int, recent_pages: int, budget_pages: int):
        self.page_size, self.sink_pages, self.recent_pages = page_size, sink_pages, recent_pages
        self.budget_pages = budget_pages
        self.num_select = budget_pages - sink_pages - recent_pages

    def layout(self, num_tokens: int) -> tuple[list[int], int, int, int]:
        """For a context of `num_tokens` tokens (the new one included):

        returns (template, middle_end, kv_len, current_index): template [budget_pages] holds a logical
        page id, -2 - j for the j-th middle pick, or -1 (padding); kv_len is the tokens attended
        when every middle pick exists.
        """
        s = self.page_size
        n = -(-num_tokens // s)  # pages in the context
        sinks = list(range(min(self.sink_pages, n)))
        recent_start = max(len(sinks), n - self.recent_pages)
        recent = list(range(recent_start, n))
        n_mid = max(0, min(self.num_select, recent_start - len(sinks)))
        template = sinks + [-2 - j for j in range(n_mid)] + recent
        kv_len = (len(template) - 1) * s + (num_tokens - (n - 1) * s)
        current_index = len(template) - 1
        template += [-1] * (self.budget_pages - len(template))
        return template, recent_start, kv_len, current_index

    @staticmethod
    def compose(template: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
        """template int64 [R, K] (from `layout`), middle int64 [R, M] (logical, -1 padded) → int32 [R, K]."""
        pick = (-2 - template).clamp(min=0, max=max(middle.shape[1] - 1, 0))
        from_middle = middle.gather(1, pick) if middle.shape[1] else torch.full_like(template, -1)
        return torch.where(template <= -2, from_middle, template).to(torch.int32)
