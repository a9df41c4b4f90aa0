"""DSA's lightning indexer: scores against the formula, decode top-k over paged keys and prefill top-k
(causal) against brute force, and the two agreeing with each other."""

from __future__ import annotations

import torch

from hisa.attention.dsa_indexer import index_scores, indexer_topk, indexer_topk_prefill

IH, ID, SCALE = 6, 16, 16 ** -0.5


def _inputs(n: int, ctx: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, IH, ID, generator=gen)
    w = torch.randn(n, IH, generator=gen)
    keys = torch.randn(ctx, ID, generator=gen)
    return q, w, keys


def _brute_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """sum_h w_h relu(scale q_h . k_t), in float64, [n, ctx]."""
    s = torch.einsum("nhd,td->nht", q.double(), keys.double()) * SCALE
    return torch.einsum("nh,nht->nt", w.double(), s.clamp(min=0))


def _as_sets(ids: torch.Tensor) -> list[set[int]]:
    return [{int(i) for i in row if i >= 0} for row in ids]


def test_scores_follow_the_formula():
    q, w, keys = _inputs(5, 40, seed=0)
    torch.testing.assert_close(index_scores(q, w, keys[None], scale=SCALE).double(), _brute_scores(q, w, keys),
                               rtol=1e-5, atol=1e-5)


def test_decode_topk_over_paged_keys_matches_brute_force():
    S, topk, lens = 4, 10, [37, 6, 10]
    B = len(lens)
    q, w, _ = _inputs(B, 1, seed=1)
    gen = torch.Generator().manual_seed(2)
    P = 30
    cache = torch.full((P, S, ID), float("nan"))  # pages nobody owns hold NaN: they must never be scored
    perm = torch.randperm(P, generator=gen)
    table = torch.full((B, 10), -1, dtype=torch.int32)
    dense_keys, used = [], 0
    for b, n in enumerate(lens):
        npg = -(-n // S)
        pages = perm[used:used + npg]
        used += npg
        table[b, :npg] = pages.to(torch.int32)
        keys = torch.randn(n, ID, generator=gen)
        rows = torch.full((npg * S, ID), float("nan"))
        rows[:n] = keys
        cache[pages] = rows.view(npg, S, ID)
        dense_keys.append(keys)
    ids = indexer_topk(q, w, cache, table, torch.tensor(lens, dtype=torch.int32), topk=topk, scale=SCALE)
    assert ids.shape == (B, topk) and ids.dtype == torch.int32
    for b, n in enumerate(lens):
        expected = set(_brute_scores(q[b:b + 1], w[b:b + 1], dense_keys[b])[0].topk(min(topk, n)).indices.tolist())
        assert _as_sets(ids[b:b + 1])[0] == expected
        assert int((ids[b] < 0).sum()) == topk - min(topk, n)  # -1 padded when fewer tokens than topk


def test_prefill_topk_is_causal_and_matches_brute_force():
    n, ctx, topk = 24, 40, 7  # a chunk of the last 24 positions of a 40-token context
    q, w, keys = _inputs(n, ctx, seed=3)
    ids = indexer_topk_prefill(q, w, keys, topk=topk, scale=SCALE)
    scores = _brute_scores(q, w, keys)
    for i, row in enumerate(_as_sets(ids)):
        p = ctx - n + i
        assert row == set(scores[i, : p + 1].topk(min(topk, p + 1)).indices.tolist())


def test_prefill_and_decode_select_the_same_tokens():
    """The last query of a prefill chunk and the same query as a decode step pick the same tokens."""
    ctx, topk, S = 33, 8, 4
    q, w, keys = _inputs(3, ctx, seed=4)
    prefill = indexer_topk_prefill(q, w, keys, topk=topk, scale=SCALE)
    cache = torch.zeros(9, S, ID)
    cache.view(-1, ID)[:ctx] = keys  # pages 0..8 in order
    table = torch.arange(9, dtype=torch.int32)[None]
    decode = indexer_topk(q[-1:], w[-1:], cache, table, torch.tensor([ctx], dtype=torch.int32), topk=topk, scale=SCALE)
    assert _as_sets(decode) == _as_sets(prefill[-1:])


def test_short_contexts_select_everything():
    q, w, keys = _inputs(5, 5, seed=5)
    ids = indexer_topk_prefill(q, w, keys, topk=64, scale=SCALE)
    assert ids.shape == (5, 5)  # min(topk, ctx) columns
    assert _as_sets(ids) == [set(range(i + 1)) for i in range(5)]


def test_decode_topk_in_row_blocks_equals_all_rows_at_once(monkeypatch):
    """Large batches at long contexts are scored a block of rows at a time (the fp32 scores of 160 rows
    at 128K would take 25 GiB at once): the picks are the same as scoring every row together."""
    import hisa.attention.dsa_indexer as ix

    S, topk, B, W = 2, 8, 7, 12
    q, w, _ = _inputs(B, 1, seed=5)
    gen = torch.Generator().manual_seed(6)
    cache = torch.randn(B * W, S, ID, generator=gen)
    table = torch.randperm(B * W, generator=gen).view(B, W).to(torch.int32)
    lens = torch.tensor([24, 3, 17, 9, 24, 1, 12], dtype=torch.int32)
    whole = indexer_topk(q, w, cache, table, lens, topk=topk, scale=SCALE)
    per_row = W * S * (ID * (cache.element_size() + 4) + 2 * 4 * IH + 8)
    monkeypatch.setattr(ix, "_DECODE_BLOCK_BYTES", 2 * per_row + 1)  # blocks of 2 rows, the last of 1
    blocked = indexer_topk(q, w, cache, table, lens, topk=topk, scale=SCALE)
    assert torch.equal(blocked, whole)
