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
