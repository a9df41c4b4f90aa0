"""The sparse cache on a Gemma-3-shaped model (random weights): sliding-window layers bypass selection.

Gemma-3's sliding layers must attend to exactly their window whatever the token budget; only its
global layers select pages. The real Gemma-3-270M runs sparse in tests/models/test_gemma3_vs_hf.py.
"""

from __future__ import annotations

import pytest
import torch

from hisa import LLM
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.factory import random_model
from hisa.sparse.config import SparseConfig

PAGE = 4
WINDOW = 16  # tiny-gemma3's window: 4 pages, up to 5 when it does not start on a page boundary


def _loaded(**overrides):
    cfg = ModelConfig(**{**PRESETS["tiny-gemma3"], **overrides})
    return random_model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=1)


def _score(loaded, ids, sparse=None):
    llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=PAGE, max_model_len=256,
              max_num_batched_tokens=24, sparse=sparse)
    return llm.engine.score(ids, prefill_tokens=60), llm.engine


def _sparse(algorithm="quest", token_budget=1024, residency="host", **kw):
    return SparseConfig(algorithm=algorithm, token_budget=token_budget, min_prompt_len=32, host_pool_gb=0.01,
                        sink_pages=1, recent_pages=1, residency=residency, **kw)


IDS = torch.randint(3, 500, (100,), generator=torch.Generator().manual_seed(0)).tolist()


def test_all_sliding_model_ignores_the_budget():
    """Every layer sliding: a 3-page budget (smaller than the 5-page window, with a buffer of 3 slots
    per layer) must still give dense logits, because no layer selects."""
    loaded = _loaded(layer_types=["sliding_attention"] * 4)
    dense, _ = _score(loaded, IDS)
    sparse, engine = _score(loaded, IDS, _sparse(token_budget=3 * PAGE, buffer_ratio=1.0))
    assert (sparse - dense).abs().max().item() < 1e-5
    st = engine.sparse.summary()
    assert st["decode_steps"] == 40
    # per step each layer read the pages of its window: 4 or 5 of them (5 when misaligned)
    assert all(4 * 40 <= n <= 5 * 40 for n in st["selected_per_layer"])
    assert st["misses"] < st["selected_pages"] // 3  # consecutive windows overlap: mostly hits
    m = engine.sparse.manager
    assert m.ns == 5 and m.host.allocator.num_free == m.host.num_pages  # the buffer grew to fit; no leak


@pytest.mark.parametrize("algorithm, residency", [("quest", "host"), ("quest", "auto"), ("quest-mean", "host"),
                                                  ("lowbit", "host"), ("lowbit", "auto"),
                                                  ("streaming", "host"), ("oracle", "host")])
def test_full_budget_equals_dense_with_mixed_layers(algorithm, residency):
    """3 sliding + 1 global layer, budget covering the context: sparse == dense, host-backed or resident."""
    loaded = _loaded()
    dense, _ = _score(loaded, IDS)
    sparse, engine = _score(loaded, IDS, _sparse(algorithm, residency=residency))
    assert (sparse - dense).abs().max().item() < 1e-5
    selected = engine.sparse.summary()["selected_per_layer"]
    assert selected[3] > 2 * selected[0]  # the global layer read its whole context, sliding ones their window


def test_small_budget_changes_only_what_global_layers_see():
    """A 3-page budget on the mixed model differs from dense (its global layer loses pages), while
    the sliding layers' reads stay the window's pages."""
    loaded = _loaded()
    dense, _ = _score(loaded, IDS)
    sparse, engine = _score(loaded, IDS, _sparse(token_budget=3 * PAGE))
    assert (sparse - dense).abs().max().item() > 1e-3
    selected = engine.sparse.summary()["selected_per_layer"]
    assert selected[3] <= 3 * 40 and all(4 * 40 <= n <= 5 * 40 for n in selected[:3])
