"""Quest and quest-mean: page summaries against direct computation from the keys, rankings, and the
Triton update / scoring kernels against their torch references."""

from __future__ import annotations

import pytest
import torch

from hisa.sparse.base import DecodeRows, create_algorithm
from hisa.sparse.page_scores import page_scores, page_scores_ref, select_pages, select_pages_ref
from hisa.sparse.quest import quest_update

L, H, KVH, D = 2, 6, 2, 8
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _algo(name, page_size, max_pages=16, slots=3):
    return create_algorithm(name, num_layers=L, num_heads=H, num_kv_heads=KVH, head_dim=D, page_size=page_size,
                            max_requests=slots, max_pages=max_pages, scale=D ** -0.5, device=torch.device("cpu"),
                            dtype=torch.float32)


def _rows(slot, t, lo, hi, num_select):
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return DecodeRows(sparse_slots=i32(slot), t=i32(t), lo=i32(lo), hi=i32(hi), num_select=num_select)


@pytest.mark.parametrize("name", ["quest", "quest-mean"])
@pytest.mark.parametrize("use_triton", [False, True])
def test_prefill_then_decode_updates_equal_direct_page_statistics(name, use_triton):
    """A prompt ending mid-page, then decode tokens filling that page and starting the next: the
    min/max (and mean) of every page equal those computed from the page's keys directly, for the
    torch update and the Triton kernel (interpreter on the CPU)."""
    torch.manual_seed(0)
    s, n_prompt, n_decode, slot = 4, 10, 7, 1  # pages 0,1 full, page 2 holds 2 prompt tokens
    algo = _algo(name, s)
    keys = torch.randn(n_prompt + n_decode, KVH, D)
    n_pages = -(-n_prompt // s)
    padded = torch.full((n_pages * s, KVH, D), float("nan"))
    padded[:n_prompt] = keys[:n_prompt]
    algo.construct_representations(1, slot, 0, padded)
    for t in range(n_prompt, n_prompt + n_decode):
        # a batch of two rows: this request and a padding row (the sentinel slot) that must not write
        ss = torch.tensor([slot, algo.max_requests], dtype=torch.int32)
        tt = torch.tensor([t + 1, 0], dtype=torch.int32)
        k = torch.stack([keys[t], torch.full((KVH, D), 1e9)])
        if use_triton and DEV.type == "cuda":  # the kernel on the GPU, the summaries copied back
            sums = [x[1].to(DEV) for x in (algo.kmin, algo.kmax) + ((algo.kmean,) if algo.has_mean else ())]
            quest_update(sums[0], sums[1], sums[2] if algo.has_mean else None, k.to(DEV), ss.to(DEV), tt.to(DEV),
                         page_size=s, sentinel=algo.max_requests, use_triton=True)
            for x, y in zip((algo.kmin, algo.kmax, algo.kmean), sums):
                x[1] = y.cpu()
            continue
        quest_update(algo.kmin[1], algo.kmax[1], algo.kmean[1] if algo.has_mean else None, k, ss, tt,
                     page_size=s, sentinel=algo.max_requests, use_triton=use_triton)
    total = n_prompt + n_decode
    for p in range(-(-total // s)):
        page = keys[p * s: min(total, (p + 1) * s)]
        torch.testing.assert_close(algo.kmin[1, slot, p], page.amin(0))
        torch.testing.assert_close(algo.kmax[1, slot, p], page.amax(0))
        if name == "quest-mean":
            torch.testing.assert_close(algo.kmean[1, slot, p], page.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["quest", "quest-mean"])
def test_one_token_pages_rank_by_exact_attention_mass(name):
    """With one token per page the bound and the mean are the exact logit, so the ranking is the
    oracle's: pages by softmax attention summed over heads."""
    torch.manual_seed(1)
    n = 12
    keys = torch.randn(n, KVH, D)
    q = torch.randn(2, H, D)
    algo, oracle = _algo(name, 1), _algo("oracle", 1)
    for slot in (0, 2):
        algo.construct_representations(0, slot, 0, keys)
    rows = _rows([0, 2], [n, n], [0, 0], [n, n], 5)
    rows.page_keys = lambda layer: keys.view(1, n, 1, KVH, D).expand(2, n, 1, KVH, D)
    picks = algo.retrieve_topk(0, q, rows).long()  # in page order
    assert torch.equal(picks, oracle.retrieve_topk(0, q, rows).sort(dim=1).values)  # oracle: best first


def test_quest_mean_finds_the_page_a_wide_page_hides_from_the_bound():
    """A page whose keys spread wide in one channel has a high upper bound but a low mean score;
    the page the query really matches has both. Quest alone picks the wide page; quest-mean picks
    the match. (The failure the mean fixes on small models: docs/eval.md.)"""
    s = 4
    keys = torch.zeros(3 * s, KVH, D)
    keys[0:s:2, :, 0], keys[1:s:2, :, 0] = 5.0, -5.0  # page 0: channel 0 alternates ±5 (mean 0)
    keys[s:2 * s, :, 0] = 4.0  # page 1: every key matches the query well (more true attention mass)
    q = torch.zeros(1, H, D)
    q[..., 0] = 1.0
    picks = {}
    for name in ("quest", "quest-mean"):
        algo = _algo(name, s)
        algo.construct_representations(0, 0, 0, keys)
        picks[name] = algo.retrieve_topk(0, q, _rows([0], [3 * s], [0], [3], 1)).item()
    assert picks == {"quest": 0, "quest-mean": 1}


def test_quest_mean_metadata_is_one_and_a_half_quest():
    assert _algo("quest-mean", 16).metadata_bytes_per_page() * 2 == _algo("quest", 16).metadata_bytes_per_page() * 3


def _summaries(ss, maxp, kvh, d, dtype, device):
    a, b = torch.randn(ss, maxp, kvh, d, device=device), torch.randn(ss, maxp, kvh, d, device=device)
    return (torch.minimum(a, b).to(dtype), torch.maximum(a, b).to(dtype), ((a + b) / 2).to(dtype))


@pytest.mark.parametrize("with_mean", [False, True])
@pytest.mark.parametrize("h,kvh,d,maxp,block_p,blocks", [(6, 2, 16, 70, None, None), (4, 4, 32, 33, 16, 1),
                                                          (9, 3, 64, 40, 64, 1), (6, 2, 8, 20, 16, 1),
                                                          (4, 4, 32, 100, 16, 3), (6, 2, 16, 70, 16, 8)])
def test_page_scores_triton_matches_reference(with_mean, h, kvh, d, maxp, block_p, blocks):
    """Two Triton kernels (per-block logits + softmax partials, then the merge) against the torch
    reference: rows with a middle range, a row that selects nothing, ranges cut at block edges, at
    the default and other pages-per-block tunings, several blocks per program (a loop whose last
    program has fewer blocks; more blocks than the row has), a head dim under tl.dot's 16."""
    torch.manual_seed(h * 100 + maxp)
    R, SS = 4, 5
    q = torch.randn(R, h, d)
    kmin, kmax, kmean = _summaries(SS, maxp, kvh, d, torch.float32, "cpu")
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    ss, lo, hi = i32([3, 0, 1, 4]), i32([1, 0, 1, 0]), i32([maxp - 2, 0, min(maxp, 33), maxp])
    args = (q, kmin, kmax, ss, lo, hi)
    want = page_scores_ref(*args, scale=0.3, kmean=kmean if with_mean else None)
    args, kmean = tuple(x.to(DEV) for x in args), kmean.to(DEV)  # Triton on the GPU, or the interpreter
    got = page_scores(*args, scale=0.3, kmean=kmean if with_mean else None, use_triton=True, block_p=block_p,
                      blocks=blocks).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got.nan_to_num(0, neginf=0), want.nan_to_num(0, neginf=0), rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[1]).all()  # the row with an empty range scores nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real sizes)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_page_scores_real_sizes_on_gpu(dtype):
    """Llama-3.1-8B shape at 128K tokens, page 32: 4,096 pages, 32 heads over 8 kv heads."""
    torch.manual_seed(0)
    R, SS, maxp = 8, 9, 4096
    q = torch.randn(R, 32, 128, device="cuda", dtype=dtype)
    kmin, kmax, kmean = _summaries(SS, maxp, 8, 128, dtype, "cuda")
    ss = torch.arange(R, dtype=torch.int32, device="cuda")
    lo = torch.ones(R, dtype=torch.int32, device="cuda")
    hi = torch.tensor([4094, 1000, 17, 4000, 2048, 3, 4094, 600], dtype=torch.int32, device="cuda")
    for km in (None, kmean):
        want = page_scores_ref(q, kmin, kmax, ss, lo, hi, scale=128 ** -0.5, kmean=km)
        for blocks, stages in ((None, None), (1, 1), (4, 3), (7, 2)):
            got = page_scores(q, kmin, kmax, ss, lo, hi, scale=128 ** -0.5, kmean=km, blocks=blocks, num_stages=stages)
            torch.testing.assert_close(got.nan_to_num(0, neginf=0), want.nan_to_num(0, neginf=0), rtol=2e-3,
                                       atol=1e-5)


@pytest.mark.parametrize("maxp,k", [(70, 5), (33, 40), (300, 61), (16, 16), (40000, 62)])
def test_select_pages_triton_matches_reference(maxp, k):
    """The top-k search (Triton) against a stable sort: the same pages, in page order, ties to the lower
    page; rows with fewer valid pages than k, an empty row, many exact ties."""
    torch.manual_seed(maxp + k)
    R = 5
    scores = torch.rand(R, maxp)
    scores[2] = torch.randint(0, 3, (maxp,)).float() / 4  # heavy ties
    scores[3, ::2] = 0.0  # underflowed softmax weights are valid pages too
    lo = torch.tensor([1, 0, 0, 3, 0], dtype=torch.int32)
    hi = torch.tensor([maxp - 2, 0, maxp, min(maxp, 12), maxp], dtype=torch.int32)
    scores = torch.where((torch.arange(maxp)[None, :] >= lo[:, None].long())
                         & (torch.arange(maxp)[None, :] < hi[:, None].long()), scores, float("-inf"))
    want = select_pages_ref(scores, lo, hi, k)
    got = select_pages(scores.to(DEV), lo.to(DEV), hi.to(DEV), k, use_triton=True).cpu()
    assert torch.equal(got, want)
    if maxp < 1000:  # the full 20-round search (no early exit) picks the same pages
        assert torch.equal(select_pages(scores.to(DEV), lo.to(DEV), hi.to(DEV), k, use_triton=True,
                                        early_exit=False).cpu(), want)
    assert (want[1] == -1).all()
    for r in range(R):  # each row holds min(k, valid) distinct pages of its range, ascending
        row = [x for x in want[r].tolist() if x >= 0]
        assert row == sorted(set(row)) and len(row) == min(k, int(hi[r] - lo[r]))
        if row:
            worst = scores[r, row].min()
            rest = [x for x in range(int(lo[r]), int(hi[r])) if x not in row]
            assert all(scores[r, x] <= worst for x in rest)  # nothing left out scores higher


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real sizes)")
@pytest.mark.parametrize("num_warps,early_exit", [(None, None), (1, None), (8, None), (None, False)])
def test_select_pages_real_sizes_on_gpu(num_warps, early_exit):
    """128K tokens at page 32 (4,096 pages) and 32K (1,024), 62 of them kept: the radix select picks
    the stable sort's pages, at the default warps and two others."""
    torch.manual_seed(num_warps or 0)
    for maxp in (1024, 4096):
        scores = torch.rand(6, maxp, device="cuda").pow(8)  # many near-zero scores, as softmax sums give
        scores[1] = torch.randint(0, 5, (maxp,), device="cuda").float()  # heavy ties
        lo = torch.tensor([1, 1, 0, 7, 1, 0], dtype=torch.int32, device="cuda")
        hi = torch.tensor([maxp - 1, maxp - 1, 40, maxp, 1, maxp], dtype=torch.int32, device="cuda")
        p = torch.arange(maxp, device="cuda")
        scores = torch.where((p[None, :] >= lo[:, None]) & (p[None, :] < hi[:, None]), scores, float("-inf"))
        got = select_pages(scores, lo, hi, 62, num_warps=num_warps, early_exit=early_exit)
        assert torch.equal(got, select_pages_ref(scores, lo, hi, 62))
