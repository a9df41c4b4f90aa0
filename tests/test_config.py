"""EngineConfig helpers: the sparse cache is capped at the context (never a giant allocation)."""

from __future__ import annotations

import logging

from hisa.config import fit_sparse_to_context
from hisa.sparse.config import SparseConfig


def test_token_budget_beyond_the_context_is_capped_with_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="hisa"):
        fitted = fit_sparse_to_context(SparseConfig(token_budget=100_000), max_model_len=8192, page_size=16)
    assert fitted.token_budget == 8192 and fitted.buffer_ratio == 1.0
    assert fitted.buffer_slots(16) == 512  # one context's pages, not 12,500 slots (147 GB on an 8K model)
    [record] = caplog.records
    assert "capped at the context of 8192 tokens (token_budget 100000 -> 8192, buffer_ratio 2 -> 1)" \
        in record.getMessage()


def test_a_buffer_larger_than_the_context_is_capped_and_fitting_configs_are_kept(caplog):
    fitted = fit_sparse_to_context(SparseConfig(token_budget=512, buffer_ratio=4.0), max_model_len=1024,
                                   page_size=16)
    assert fitted.token_budget == 512 and fitted.buffer_slots(16) == 64  # 64 pages: the whole context
    kept = SparseConfig(token_budget=2048, buffer_ratio=2.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hisa"):
        assert fit_sparse_to_context(kept, max_model_len=32768, page_size=16) is kept
    assert not caplog.records
