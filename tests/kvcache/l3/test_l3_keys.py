"""Page keys: shared full pages share keys; one changed token changes its page's key and all later ones."""

from __future__ import annotations

import dataclasses
import random

import pytest

from hisa.kvcache.l3.keys import KVLayout, page_keys

LAYOUT = KVLayout(model_id="smollm2-135m", dtype="float32", page_size=16, num_layers=30, num_kv_heads=3,
                  head_dim=64)


def _prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def test_only_full_pages_get_keys():
    assert len(page_keys(_prompt(15), LAYOUT)) == 0
    assert len(page_keys(_prompt(16), LAYOUT)) == 1
    assert len(page_keys(_prompt(47), LAYOUT)) == 2
    keys = page_keys(_prompt(64), LAYOUT)
    assert len(set(keys)) == 4 and all(len(k) == 32 and int(k, 16) >= 0 for k in keys)


def test_same_prefix_same_keys():
    a = _prompt(100, seed=1)
    b = a[:70] + _prompt(50, seed=2)            # shares 70 tokens: 4 full pages
    ka, kb = page_keys(a, LAYOUT), page_keys(b, LAYOUT)
    assert ka[:4] == kb[:4]
    assert ka[4] != kb[4]
    assert page_keys(a, LAYOUT) == ka           # deterministic


@pytest.mark.parametrize("position", [0, 15, 16, 37, 63])
def test_one_token_changed_changes_its_page_and_every_later_key(position):
    a = _prompt(80, seed=3)
    b = list(a)
    b[position] += 1
    ka, kb = page_keys(a, LAYOUT), page_keys(b, LAYOUT)
    page = position // 16
    assert ka[:page] == kb[:page]
    assert all(x != y for x, y in zip(ka[page:], kb[page:]))


def test_the_same_tokens_at_another_position_do_not_collide():
    page = _prompt(16, seed=4)
    keys = page_keys(page * 3, LAYOUT)
    assert len(set(keys)) == 3


@pytest.mark.parametrize("change", [dict(model_id="smollm2-360m"), dict(dtype="bfloat16"), dict(num_layers=29),
                                    dict(num_kv_heads=4), dict(head_dim=128), dict(extra=(("layout", "mla"),))])
def test_layout_is_part_of_every_key(change):
    tokens = _prompt(32, seed=5)
    other = dataclasses.replace(LAYOUT, **change)
    assert not set(page_keys(tokens, LAYOUT)) & set(page_keys(tokens, other))


def test_page_size_is_part_of_the_key():
    tokens = _prompt(64, seed=6)
    k16 = page_keys(tokens, LAYOUT)
    k32 = page_keys(tokens, dataclasses.replace(LAYOUT, page_size=32))
    assert not set(k16) & set(k32)


def test_a_chain_can_be_continued_from_a_key():
    tokens = _prompt(96, seed=7)
    whole = page_keys(tokens, LAYOUT)
    tail = page_keys(tokens[32:], LAYOUT, parent=bytes.fromhex(whole[1]))
    assert whole[2:] == tail


def test_invalid_layouts_are_refused():
    with pytest.raises(ValueError, match="model_id"):
        dataclasses.replace(LAYOUT, model_id="")
    with pytest.raises(ValueError, match="page_size"):
        dataclasses.replace(LAYOUT, page_size=0)


def test_a_checkpoint_is_known_by_its_bytes_not_its_name(tmp_path, monkeypatch):
    """Two checkpoints of the same name and size (a fine-tune saved over the same path) keyed their L3
    pages alike: one was served the other's KV. The same bytes at two paths (two servers) still share."""
    from hisa.models.loader import ModelSource, fingerprint

    monkeypatch.setenv("HISA_CACHE_DIR", str(tmp_path / "cache"))
    data = bytes(random.Random(0).randrange(256) for _ in range(4096))
    paths = []
    for name, blob in (("a", data), ("b", data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]), ("c", data)):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "model.gguf")
        paths[-1].write_bytes(blob)
    a, b, c = (fingerprint(ModelSource("gguf", p)) for p in paths)
    assert a != b and a == c
    assert fingerprint(ModelSource("gguf", paths[0])) == a   # the second time from the memo


def test_random_weights_are_known_by_their_own_seed_and_shape(tmp_path):
    """An engine given random weights drawn with seed 1 (LLM(loaded=...)) keyed its pages with its own
    seed (0): an engine with seed-0 weights then loaded them."""
    import torch

    from hisa import LLM
    from hisa.models.config import PRESETS, ModelConfig
    from hisa.models.factory import load_model, random_model

    def layout(loaded, tmp):
        llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, l3=f"file:{tmp}")
        try:
            return llm.engine.l3_prefix.layout
        finally:
            llm.close()

    cpu = torch.device("cpu")
    seeds = [layout(load_model("random:tiny-llama", device=cpu, dtype=torch.float32, progress=False, seed=s),
                    tmp_path / f"l3-{i}") for i, s in enumerate((0, 1, 0))]
    wider = random_model(ModelConfig(**{**PRESETS["tiny-llama"], "intermediate_size": 256}), device=cpu,
                         dtype=torch.float32)
    assert seeds[0].root() != seeds[1].root() and seeds[0].root() == seeds[2].root()
    assert layout(wider, tmp_path / "l3-w").root() != seeds[0].root()
