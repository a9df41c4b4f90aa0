"""DSA's lightning indexer: scores against the formula, decode top-k over paged keys and prefill top-k
(causal) against brute force, and the two agreeing with each other; the fused Triton decode score
kernel against the torch reference (interpreter on the CPU at small sizes, real sizes on CUDA)."""

from __future__ import annotations

import pytest
import torch

from hisa.attention.dsa_indexer import (index_scores, indexer_scores, indexer_scores_ref, indexer_topk,
                                        indexer_topk_prefill)

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


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the kernel: on the GPU, or the interpreter


def _paged(B: int, W: int, S: int, ID: int, lens: list[int], *, seed: int, dtype=torch.float32, width: int = 0,
           device=DEV):
    """A shuffled paged cache [P, S, ID] holding B requests (NaN wherever no request's token lives,
    so a key read past a length or through a -1 page shows), its int32 page table [B, W] (-1 past
    each request's pages) and lengths, on `device`. width > ID: the cache is the first ID values of
    wider rows (a strided view)."""
    gen = torch.Generator().manual_seed(seed)
    P = B * W + 3
    store = torch.full((P, S, max(width, ID)), float("nan"))
    perm = torch.randperm(P, generator=gen)
    table = torch.full((B, W), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        npg = -(-n // S)
        table[b, :npg] = perm[used:used + npg].to(torch.int32)
        used += npg
        tok = torch.arange(n)
        store[table[b, tok // S].long(), tok % S, :ID] = torch.randn(n, ID, generator=gen) + torch.linspace(-1, 1, ID)
    return (store.to(device=device, dtype=dtype)[..., :ID], table.to(device),
            torch.tensor(lens, dtype=torch.int32, device=device))


def _assert_scores_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """-inf exactly where the reference has it, finite scores within rtol of the row's largest."""
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
    scale = want.nan_to_num(0, neginf=0).abs().amax(-1, keepdim=True).clamp(min=1e-6)
    torch.testing.assert_close(got.nan_to_num(0, neginf=0) / scale, want.nan_to_num(0, neginf=0) / scale,
                               rtol=0, atol=rtol)


def _assert_topk_is_a_best_set(ids: torch.Tensor, ref: torch.Tensor, k: int, rtol: float) -> None:
    """ids [B, k] (-1 padded) are k distinct tokens the reference scores [B, N] rank among the best:
    as many as the row has finite scores (up to k), each scoring at least the reference's k-th best
    minus rtol of the row's scale (ties and near-ties may pick either token)."""
    assert ids.shape == (ref.shape[0], k) and ids.dtype == torch.int32
    for row, scores in zip(ids, ref.double()):
        picked = row[row >= 0].long()
        n_finite = int(torch.isfinite(scores).sum())
        assert picked.numel() == min(k, n_finite) and picked.unique().numel() == picked.numel()
        assert (row[picked.numel():] == -1).all()  # best first, then the padding
        if picked.numel():
            kth = scores.topk(picked.numel()).values[-1]
            scale = scores[torch.isfinite(scores)].abs().max().clamp(min=1e-6)
            assert (scores[picked] >= kth - rtol * scale).all()


# (S, IH, ID, block_t, tiles): page sizes 1 to 16, IH 6 and 9 (not powers of two, padded to 16 heads),
# 8 (the tiny preset) and 20 (padded to 32), ID 16 to 32 (24: channels padded), tiles of 16 or 32 tokens
KERNEL_SHAPES = [(1, 8, 32, 16, 2), (4, 6, 16, 16, 1), (16, 9, 24, 32, 2), (2, 20, 32, 16, 3), (8, 8, 32, 64, 1)]


@pytest.mark.parametrize("S,ih,d,block_t,tiles", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_score_kernel_matches_reference(S, ih, d, block_t, tiles, dtype):
    """The fused kernel's scores equal the torch reference's: ragged lengths (0, 1, not a multiple of
    the tile, the whole table), shuffled pages, -1 padded tables, NaN everywhere unowned (never read)."""
    W = -(-70 // S) + 1
    lens = [70, 1, 0, W * S, 33]
    cache, table, lengths = _paged(len(lens), W, S, d, lens, seed=S * 10 + ih, dtype=dtype)
    gen = torch.Generator().manual_seed(ih)
    q = torch.randn(len(lens), ih, d, generator=gen).to(device=DEV, dtype=dtype)
    w = torch.randn(len(lens), ih, generator=gen).to(DEV)
    kw = dict(scale=d ** -0.5)
    want = indexer_scores_ref(q, w, cache, table, lengths, **kw)
    got = indexer_scores(q, w, cache, table, lengths, use_triton=True, block_t=block_t, tiles=tiles, **kw)
    assert got.shape == (len(lens), W * S) and got.dtype == torch.float32
    _assert_scores_close(got, want, rtol=1e-5)  # fp16 x fp16 products are exact in fp32, as the reference's
    assert torch.isinf(got[2]).all() and torch.isfinite(got[3]).all()


def test_score_kernel_over_strided_cache_and_mixed_dtypes():
    """A cache that is a strided view (the first 32 of 48 values per token), fp16 keys with fp32
    queries (the dot runs in fp32), and a table whose -1 pages sit inside a row's length (a
    host-backed row of a mixed step: its tokens there score -inf, the NaN pages are not read)."""
    S, ih, d, lens = 4, 8, 32, [37, 50, 12]
    cache, table, lengths = _paged(3, 13, S, d, lens, seed=7, dtype=torch.float16, width=48)
    assert not cache.is_contiguous()
    table[1, 3:6] = -1  # tokens 12..23 of row 1 have no page
    gen = torch.Generator().manual_seed(8)
    q, w = torch.randn(3, ih, d, generator=gen).to(DEV), torch.randn(3, ih, generator=gen).to(DEV)
    want = indexer_scores_ref(q, w, cache, table, lengths, scale=d ** -0.5)
    got = indexer_scores(q, w, cache, table, lengths, scale=d ** -0.5, use_triton=True, block_t=16)
    _assert_scores_close(got, want, rtol=1e-5)
    assert torch.isinf(got[1, 12:24]).all() and torch.isfinite(got[1, 24:50]).all()


@pytest.mark.parametrize("S", [1, 4])
def test_kernel_topk_picks_the_reference_best(S):
    """indexer_topk through the kernel: the same contract (int32 [B, min(topk, W * S)], best first, -1
    padded), and the tokens it picks are a best set under the reference scores."""
    ih, d, topk, lens = 6, 16, 24, [90, 5, 24, 0, 61]
    W = -(-90 // S)
    cache, table, lengths = _paged(len(lens), W, S, d, lens, seed=S)
    gen = torch.Generator().manual_seed(9)
    q, w = torch.randn(len(lens), ih, d, generator=gen).to(DEV), torch.randn(len(lens), ih, generator=gen).to(DEV)
    ids = indexer_topk(q, w, cache, table, lengths, topk=topk, scale=d ** -0.5, use_triton=True)
    ref = indexer_scores_ref(q, w, cache, table, lengths, scale=d ** -0.5)
    _assert_topk_is_a_best_set(ids, ref, topk, rtol=1e-5)
    assert _as_sets(ids[1:3]) == [set(range(5)), set(range(24))]  # rows within topk take every token
    torch_path = indexer_topk(q, w, cache, table, lengths, topk=topk, scale=d ** -0.5, use_triton=False)
    assert _as_sets(ids) == _as_sets(torch_path)


def test_kernel_arguments_are_checked():
    cache, table, lengths = _paged(2, 4, 4, 16, [9, 3], seed=0)
    q, w = torch.randn(2, 4, 16, device=DEV), torch.randn(2, 4, device=DEV)
    with pytest.raises(ValueError, match="int32"):
        indexer_scores(q, w, cache, table.long(), lengths, scale=0.25)
    with pytest.raises(ValueError, match="block_t"):
        indexer_scores(q, w, cache, table, lengths, scale=0.25, use_triton=True, block_t=24)
    with pytest.raises(ValueError, match="values"):
        indexer_scores(q, w, cache[..., :8], table, lengths, scale=0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real sizes)")
@pytest.mark.parametrize("S", [1, 64])
def test_score_kernel_real_sizes_on_gpu(S):
    """DeepSeek-V3.2's indexer (64 heads x 128, bf16 keys and queries) at 32K tokens, ragged rows
    (one of them a padding row), shuffled pages: scores within fp32 summation order of the reference
    (bf16 products are exact in fp32) and a best top-2048 set."""
    torch.manual_seed(0)
    ih, d, topk, ctx = 64, 128, 2048, 32768
    lens = torch.tensor([ctx, 20001, 0, 2049], dtype=torch.int32, device="cuda")
    B, W = len(lens), ctx // S
    P = B * W + 5
    cache = torch.randn(P, S, d, device="cuda").to(torch.bfloat16)
    table = torch.randperm(P, device="cuda")[:B * W].view(B, W).to(torch.int32)
    q = torch.randn(B, ih, d, device="cuda").to(torch.bfloat16)
    w = torch.randn(B, ih, device="cuda") * ih ** -0.5
    want = indexer_scores_ref(q, w, cache, table, lens, scale=d ** -0.5)
    _assert_scores_close(indexer_scores(q, w, cache, table, lens, scale=d ** -0.5), want, rtol=1e-5)
    ids = indexer_topk(q, w, cache, table, lens, topk=topk, scale=d ** -0.5)
    _assert_topk_is_a_best_set(ids.cpu(), want.cpu(), topk, rtol=1e-5)


def _fp8_paged(B, W, S, d, lens, *, seed):
    """_paged's cache with its keys packed as FP8 (uint8 [P, S, index_key_width(d)]; NaN slots packed as zero keys)
    and the reference's view of them (unpacked, fp32)."""
    from hisa.kvcache.mla_fp8 import pack_index_keys, unpack_index_keys

    cache, table, lengths = _paged(B, W, S, d, lens, seed=seed)
    packed = pack_index_keys(torch.nan_to_num(cache))
    return packed, unpack_index_keys(packed, index_head_dim=d, dtype=torch.float32), table, lengths


@pytest.mark.parametrize("S,ih,d", [(1, 8, 32), (4, 6, 16), (16, 9, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_keys_score_as_their_unpacked_values(S, ih, d, dtype):
    """FP8 keys (e4m3 values + a scale per key) are scored with FP8 queries (e4m3 + a scale per head):
    the kernel (values into the dot unscaled, each head's scale in its weight, each score times its
    key's scale) and the torch path score as the reference over the unpacked keys and queries."""
    from hisa.kvcache.mla_fp8 import fp8_index_queries

    W = -(-70 // S) + 1
    lens = [70, 1, 0, W * S, 33]
    packed, keys, table, lengths = _fp8_paged(len(lens), W, S, d, lens, seed=S + ih)
    from hisa.kvcache.mla_fp8 import index_key_width

    width = index_key_width(d)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == width and width % 16 == 0
    gen = torch.Generator().manual_seed(ih)
    q = torch.randn(len(lens), ih, d, generator=gen).to(device=DEV, dtype=dtype)
    w = torch.randn(len(lens), ih, generator=gen).to(DEV)
    want = indexer_scores_ref(fp8_index_queries(q), w, keys, table, lengths, scale=d ** -0.5)
    _assert_scores_close(indexer_scores(q, w, packed, table, lengths, scale=d ** -0.5, use_triton=False), want,
                         rtol=1e-6)
    got = indexer_scores(q, w, packed, table, lengths, scale=d ** -0.5, use_triton=True)
    rtol = 1e-3 if got.is_cuda else 1e-5  # (the FP8 tensor cores' sums are not exact fp32 ones)
    _assert_scores_close(got, want, rtol=rtol)
    ids = indexer_topk(q, w, packed, table, lengths, topk=24, scale=d ** -0.5, use_triton=True)
    _assert_topk_is_a_best_set(ids.cpu(), want.cpu(), 24, rtol=rtol)
    with pytest.raises(ValueError, match=f"FP8 keys: {width} bytes"):
        indexer_scores(q, w, packed[..., :-1], table, lengths, scale=0.2)


def test_fp8_index_keys_keep_the_selection():
    """DeepSeek-V3.2's indexer shape (64 heads x 128) over 4,096 random keys, top-512: FP8 keys (e4m3,
    3 mantissa bits) keep at least 95% of each row's top-k of the full-precision keys."""
    from hisa.kvcache.mla_fp8 import pack_index_keys

    gen = torch.Generator().manual_seed(0)
    n, ih, d, k, B = 4096, 64, 128, 512, 8
    keys = torch.randn(n, 1, d, generator=gen)
    q, w = torch.randn(B, ih, d, generator=gen), torch.rand(B, ih, generator=gen) * ih ** -0.5
    table = torch.arange(n, dtype=torch.int32)[None].repeat(B, 1)
    lens = torch.full((B,), n, dtype=torch.int32)
    full = indexer_topk(q, w, keys, table, lens, topk=k, scale=d ** -0.5, use_triton=False)
    fp8 = indexer_topk(q, w, pack_index_keys(keys), table, lens, topk=k, scale=d ** -0.5, use_triton=False)
    kept = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(full, fp8)]
    assert min(kept) >= 0.95, kept


_COMPILE_FP8 = """
import re
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hisa.attention import triton_dsa_indexer

hw = sys.argv[1] == "1"
# as the launcher's JIT specializes a V3.2 call: unit strides are constants, 144-byte keys (and the
# pointers and other strides) are multiples of 16
consts = dict(IH=64, ID=128, S=1, BLOCK_H=64, BLOCK_D=128, BLOCK_T=64, TILES=8, DOT_PRECISION="tf32", FP8=True,
              HW_CVT=hw, SCALE_AT=128, stride_qd=1, stride_cd=1)
sig = {"q_ptr": "*u8", "w_ptr": "*fp32", "cache_ptr": "*u8", "table_ptr": "*i32", "len_ptr": "*i32",
       "out_ptr": "*fp32", "scale": "fp32", "N": "i32", "stride_qb": "i32", "stride_qh": "i32", "stride_qd": "i32",
       "stride_wb": "i32", "stride_wh": "i32", "stride_cp": "i32", "stride_cs": "i32", "stride_cd": "i32",
       "stride_tb": "i32", "stride_tw": "i32", "stride_l": "i32", "stride_ob": "i32"}
names = list(sig)
sig.update({name: "constexpr" for name in consts})
aligned = ["q_ptr", "w_ptr", "cache_ptr", "table_ptr", "len_ptr", "out_ptr", "N", "stride_qb", "stride_qh",
           "stride_cp", "stride_cs", "stride_ob"]
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
compiled = triton.compile(ASTSource(fn=triton_dsa_indexer.dsa_indexer_scores_kernel, signature=sig, constexprs=consts,
                                    attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
ptx = compiled.asm["ptx"]
assert "ld.global.v4" in ptx, "the keys are not loaded 16 bytes at a time"
assert ("e4m3.e4m3" in ptx) == hw, "FP8 products on the tensor cores iff HW_CVT"
"""


@pytest.mark.parametrize("hw", [True, False])
def test_fp8_kernel_compiles_for_hopper(hw):
    """The FP8 variant at V3.2's indexer shape through Triton's compiler for sm_90 (no GPU needed): 144-byte
    keys load 16 bytes at a time, and with HW_CVT the products are FP8 x FP8 tensor-core ops."""
    from tests.conftest import compile_for_hopper

    compile_for_hopper(_COMPILE_FP8, str(int(hw)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real sizes)")
@pytest.mark.parametrize("cvt", ["hw", "int"])
def test_fp8_score_kernel_real_sizes_on_gpu(cvt, monkeypatch):
    """V3.2's indexer over 32K FP8 keys (144 bytes each), page 1, bf16 queries made FP8: scores as the
    reference over the unpacked keys and queries, a best top-2048 set; FP8 products on the tensor cores
    (hw: their sums are not exact fp32 ones, so within 1e-3 of the row's scale) and fp16 products of
    the exact values (int)."""
    from hisa.kvcache.mla_fp8 import fp8_index_queries, pack_index_keys, unpack_index_keys

    monkeypatch.setenv("HISA_FP8_CVT", cvt)
    torch.manual_seed(0)
    ih, d, topk, ctx = 64, 128, 2048, 32768
    lens = torch.tensor([ctx, 20001, 0, 2049], dtype=torch.int32, device="cuda")
    B = len(lens)
    packed = pack_index_keys(torch.randn(B * ctx + 5, 1, d, device="cuda"))
    table = torch.randperm(B * ctx + 5, device="cuda")[:B * ctx].view(B, ctx).to(torch.int32)
    q = torch.randn(B, ih, d, device="cuda").to(torch.bfloat16)
    w = torch.randn(B, ih, device="cuda") * ih ** -0.5
    want = indexer_scores_ref(fp8_index_queries(q), w, unpack_index_keys(packed, index_head_dim=d, dtype=torch.float32),
                              table, lens, scale=d ** -0.5)
    rtol = 1e-3 if cvt == "hw" else 1e-5
    _assert_scores_close(indexer_scores(q, w, packed, table, lens, scale=d ** -0.5), want, rtol=rtol)
    ids = indexer_topk(q, w, packed, table, lens, topk=topk, scale=d ** -0.5)
    _assert_topk_is_a_best_set(ids.cpu(), want.cpu(), topk, rtol=rtol)
