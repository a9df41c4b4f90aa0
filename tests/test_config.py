"""EngineConfig: bad values are refused at construction; the sparse cache is capped at the context (never a
giant allocation)."""

from __future__ import annotations

import logging

import pytest

from hisa.config import EngineConfig, fit_sparse_to_context
from hisa.errors import ConfigError
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


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_cache_gb=float("nan")), "kv_cache_gb must be a finite number > 0, got nan"),
    (dict(kv_cache_gb=0), "kv_cache_gb must be a finite number > 0"),
    (dict(seed=10**20), r"seed must be an integer in \[0, 18446744073709551615\]"),
    (dict(seed=-1), "seed must be an integer in"),
    (dict(l3="file:/tmp/x", l3_gb=float("inf")), "l3_gb must be a finite number > 0, got inf"),
    (dict(l3_gb=4.0), "l3_gb needs l3"),
    (dict(max_model_len=4096.0), "max_model_len must be an integer >= 2"),
    (dict(num_kv_pages=0), "num_kv_pages must be an integer >= 1"),
    (dict(cpu_decode_kv_gb=float("nan")), "cpu_decode_kv_gb must be a finite number >= 0"),
    (dict(page_size=16.0), "page_size must be an integer >= 1"),
    (dict(gpu_memory_utilization="0.9"), "gpu_memory_utilization must be a finite number > 0"),
    (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization must be a finite number > 0"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
])
def test_invalid_engine_settings_fail_at_construction_with_what_to_change(kwargs, message):
    """NaN, infinities, floats where an integer is meant: refused with one line, before a model loads (they
    failed later with a traceback: NaN passes `x <= 0`)."""
    with pytest.raises(ConfigError, match=message):
        EngineConfig(device="cpu", **kwargs)


def test_device_names_are_read_as_typed_and_others_refused():
    import torch

    for given in ("CPU", " cpu ", torch.device("cpu"), "auto"):
        assert EngineConfig(device=given).device in ("cpu", "cuda")
    for bad in ("gpu", "cuda:x", 3):
        with pytest.raises(ConfigError, match="device must be cpu, cuda, cuda:N or auto"):
            EngineConfig(device=bad)


def test_a_context_shorter_than_the_fixed_pages_says_so_not_to_raise_the_budget():
    with pytest.raises(ConfigError, match="the context of 32 tokens is shorter than the sparse cache's fixed pages"):
        fit_sparse_to_context(SparseConfig(token_budget=2048), max_model_len=32, page_size=16)
    # streaming selects nothing: its sinks and window alone fit a budget of 3 pages
    assert SparseConfig(algorithm="streaming", token_budget=48).budget_pages(16) == 3
    with pytest.raises(ConfigError, match="one selected page at page_size=16; raise --token-budget to at least 64"):
        SparseConfig(algorithm="quest", token_budget=48).budget_pages(16)


def test_a_min_prompt_len_no_prompt_can_reach_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="hisa"):
        fit_sparse_to_context(SparseConfig(token_budget=256, min_prompt_len=4096), max_model_len=2048, page_size=16)
    assert any("every request runs dense" in r.getMessage() for r in caplog.records)
