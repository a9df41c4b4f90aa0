"""Paged decode attention: the torch reference against dense attention, the Triton kernels against the
reference (under TRITON_INTERPRET=1 on a CPU), and the launcher's argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hisa.attention import paged_decode  # on a CPU machine tests/conftest.py runs Triton in the interpreter
from hisa.attention.reference import paged_decode_attention_ref

paged_decode_attention = paged_decode.paged_decode_attention
default_num_splits = paged_decode.default_num_splits

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3)}
# The Triton tests run compiled on a GPU, else on CPU tensors in the interpreter (use_triton=True).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(kv_lens: list[int], *, page_size: int, num_kv_heads: int, group: int, head_dim: int,
              dtype: torch.dtype, seed: int = 0, extra_pages: int = 3, device: str = DEVICE):
    """Random q and a paged cache with every request's pages scattered over a random permutation.

    Returns q [B, H, D], kv [P, 2, S, KVH, D] (k = kv[:, 0], v = kv[:, 1] are strided views),
    page_table int32 [B, max_pages] (-1 padded, at least one -1 column), kv_lens int32 [B].
    Slots no request may read (unused pages, tails of last pages) hold NaN, so a kernel that
    fails to mask them returns NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    S, B = page_size, len(kv_lens)
    n_pages = [-(-n // S) for n in kv_lens]
    P = sum(n_pages) + extra_pages
    kv = torch.full((P, 2, S, num_kv_heads, head_dim), float("nan"))  # [P, 2, S, KVH, D]
    perm = torch.randperm(P, generator=gen)
    page_table = torch.full((B, max(n_pages) + 1), -1, dtype=torch.int32)
    used = 0
    for b, (n, npg) in enumerate(zip(kv_lens, n_pages)):
        pages = perm[used:used + npg]
        used += npg
        page_table[b, :npg] = pages.to(torch.int32)
        tokens = torch.randn(npg * S, 2, num_kv_heads, head_dim, generator=gen)  # [npg*S, 2, KVH, D]
        tokens[n:] = float("nan")
        kv[pages] = tokens.view(npg, S, 2, num_kv_heads, head_dim).transpose(1, 2)
    q = torch.randn(B, num_kv_heads * group, head_dim, generator=gen)  # [B, H, D]
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    return q.to(device, dtype), kv.to(device, dtype), page_table.to(device), lens.to(device)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, D], k/v [n, KVH, D] contiguous → [H, D] via torch SDPA in float64 (n may be 0)."""
    if k.shape[0] == 0:
        return torch.zeros_like(q, dtype=torch.float64)
    out = F.scaled_dot_product_attention(q.double()[:, None], k.double().transpose(0, 1), v.double().transpose(0, 1),
                                         scale=scale, enable_gqa=True)  # [H, 1, D]
    return out[:, 0]


@pytest.mark.parametrize("group,page_size", [(1, 4), (4, 16), (3, 5)])
def test_reference_matches_dense_attention(group, page_size):
    S, KVH, D, lens = page_size, 2, 32, [0, 1, 2 * page_size, 3 * page_size + 1, 23]
    gen = torch.Generator().manual_seed(1)
    B, H = len(lens), KVH * group
    q = torch.randn(B, H, D, generator=gen)
    dense = [torch.randn(n, 2, KVH, D, generator=gen) for n in lens]  # per request [n, 2, KVH, D]
    n_pages = [-(-n // S) for n in lens]
    P = sum(n_pages) + 4
    kv = torch.randn(P, 2, S, KVH, D, generator=gen)  # garbage everywhere no request reads
    perm = torch.randperm(P, generator=gen)
    table = torch.full((B, max(n_pages) + 2), -1, dtype=torch.int32)
    used = 0
    for b, (n, npg) in enumerate(zip(lens, n_pages)):
        pages = perm[used:used + npg]
        used += npg
        table[b, :npg] = pages.to(torch.int32)
        for i in range(n):  # token i -> page table[b, i // S], offset i % S
            kv[pages[i // S], :, i % S] = dense[b][i]

    out = paged_decode_attention_ref(q, kv[:, 0], kv[:, 1], table, torch.tensor(lens, dtype=torch.int32),
                                     scale=D ** -0.5)
    assert out.shape == (B, H, D) and out.dtype == q.dtype
    for b in range(B):
        want = dense_attention(q[b], dense[b][:, 0], dense[b][:, 1], D ** -0.5)
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0], torch.zeros(H, D))  # kv_len 0


# Pairwise cover of dtype x group x head_dim x page_size (a full product is too slow in the
# interpreter); each case runs with one split and with several. kv_lens hold 0, 1, exact page
# multiples and odd lengths, spanning several kernel blocks (block_n=16).
CASES = [
    # dtype,         group, D,  S,  KVH, kv_lens
    (torch.float32, 1, 64, 4, 2, [0, 1, 16, 37]),
    (torch.float32, 3, 32, 16, 2, [48, 0, 5, 1]),
    (torch.float32, 4, 64, 16, 1, [33, 64]),
    (torch.float16, 1, 32, 16, 2, [1, 32, 0, 50]),
    (torch.float16, 3, 64, 4, 1, [12, 0, 45]),
    (torch.float16, 4, 32, 4, 2, [8, 1, 39, 0]),
    (torch.float32, 7, 80, 8, 1, [1, 29]),   # odd group, non-power-of-two head dim
    (torch.float16, 8, 128, 16, 1, [40]),    # group 8, D 128
]


@pytest.mark.parametrize("dtype,group,head_dim,page_size,num_kv_heads,kv_lens", CASES)
def test_triton_matches_reference(dtype, group, head_dim, page_size, num_kv_heads, kv_lens):
    q, kv, table, lens = make_case(kv_lens, page_size=page_size, num_kv_heads=num_kv_heads, group=group,
                                   head_dim=head_dim, dtype=dtype, seed=len(kv_lens) + group)
    k_cache, v_cache = kv[:, 0], kv[:, 1]  # strided views: stride(0) = 2 * S * KVH * D
    assert not k_cache.is_contiguous()
    scale = head_dim ** -0.5
    ref = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, scale=scale)
    assert not ref.isnan().any()
    for num_splits in (1, 3):
        out = paged_decode_attention(q, k_cache, v_cache, table, lens, scale=scale, num_splits=num_splits,
                                     block_n=16, use_triton=True)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m: f"num_splits={num_splits}: {m}")
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))  # padded row: zeros, no NaN


def test_triton_more_splits_than_blocks_and_auto_splits():
    """Splits that see no token (short requests, many splits) contribute nothing and make no NaN."""
    q, kv, table, lens = make_case([3, 0, 20], page_size=4, num_kv_heads=2, group=2, head_dim=32,
                                   dtype=torch.float32, seed=7)
    ref = paged_decode_attention_ref(q, kv[:, 0], kv[:, 1], table, lens, scale=0.3)
    for num_splits, block_n in ((8, 16), (None, 16), (None, None)):
        out = paged_decode_attention(q, kv[:, 0], kv[:, 1], table, lens, scale=0.3, num_splits=num_splits,
                                     block_n=block_n, use_triton=True)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_triton_sparse_selection_matches_dense_over_selected_tokens():
    """Sparse use: a subset of full pages of a dense sequence, the partial newest page last."""
    S, KVH, group, D, n_tokens = 4, 2, 2, 32, 30  # pages 0..7, page 7 holds 2 tokens
    q, kv, table, lens = make_case([n_tokens], page_size=S, num_kv_heads=KVH, group=group, head_dim=D,
                                   dtype=torch.float32, seed=3)
    pages = table[0, :8]
    chosen = [1, 4, 6, 7]  # logical pages: three full ones, then the partial newest page
    sparse_table = torch.tensor([[int(pages[c]) for c in chosen] + [-1, -1]], dtype=torch.int32, device=DEVICE)
    sparse_lens = torch.tensor([3 * S + 2], dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, kv[:, 0], kv[:, 1], sparse_table, sparse_lens, scale=D ** -0.5,
                                 num_splits=2, block_n=16, use_triton=True)
    tok = torch.cat([torch.arange(c * S, min((c + 1) * S, n_tokens)) for c in chosen]).to(DEVICE)
    k_all = kv[pages.long(), 0].reshape(-1, KVH, D)  # [8*S, KVH, D] in logical order
    v_all = kv[pages.long(), 1].reshape(-1, KVH, D)
    want = dense_attention(q[0], k_all[tok], v_all[tok], D ** -0.5)
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 16, 23, 1000])
def test_triton_sliding_window_matches_reference_and_dense(window):
    """Gemma-3's sliding layers: only the last `window` tokens count; older ones are never read.

    Tokens older than the window hold NaN, so a kernel that reads (rather than skips) them fails;
    windows cover 1 token, less than a page, whole pages, mid-page and more than the context.
    """
    S, KVH, group, D, kv_lens = 4, 2, 2, 32, [0, 1, 5, 16, 23, 37]
    q, kv, table, lens = make_case(kv_lens, page_size=S, num_kv_heads=KVH, group=group, head_dim=D,
                                   dtype=torch.float32, seed=13)
    want = []
    for b, n in enumerate(kv_lens):
        pages = table[b, : -(-n // S)].long()
        k = kv[pages, 0].reshape(-1, KVH, D)[:n]  # [n, KVH, D] in logical order
        v = kv[pages, 1].reshape(-1, KVH, D)[:n]
        want.append(dense_attention(q[b], k[max(0, n - window):], v[max(0, n - window):], D ** -0.5))
        old = torch.arange(max(0, n - window))  # poison what the window excludes
        kv[pages[old // S], :, old % S] = float("nan")
    ref = paged_decode_attention_ref(q, kv[:, 0], kv[:, 1], table, lens, scale=D ** -0.5, window=window)
    for b in range(len(kv_lens)):
        torch.testing.assert_close(ref[b].double(), want[b], atol=1e-5, rtol=1e-5)
    for num_splits in (1, 3, None):
        out = paged_decode_attention(q, kv[:, 0], kv[:, 1], table, lens, scale=D ** -0.5, num_splits=num_splits,
                                     block_n=16, use_triton=True, window=window)
        torch.testing.assert_close(out, ref, **TOL[torch.float32], msg=lambda m: f"num_splits={num_splits}: {m}")


def test_triton_strided_q_out_argument_and_mixed_dtype():
    """q with a padded head stride, a preallocated `out`, q fp32 over an fp16 cache."""
    q, kv, table, lens = make_case([9, 17], page_size=4, num_kv_heads=2, group=2, head_dim=32,
                                   dtype=torch.float16, seed=5)
    q_wide = torch.zeros(2, 4, 48, dtype=torch.float32, device=DEVICE)
    q_wide[..., :32] = q.float()
    q_view = q_wide[..., :32]  # [B, H, D], stride(1) = 48
    out = torch.full((2, 4, 32), 7.0, device=DEVICE)
    got = paged_decode_attention(q_view, kv[:, 0], kv[:, 1], table, lens, scale=0.2, num_splits=2, out=out,
                                 use_triton=True)
    assert got is out
    ref = paged_decode_attention_ref(q_view, kv[:, 0], kv[:, 1], table, lens, scale=0.2)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])  # q is rounded to fp16 in the kernel


def test_cpu_default_is_reference_and_fills_out():
    q, kv, table, lens = make_case([5, 0], page_size=4, num_kv_heads=1, group=2, head_dim=16,
                                   dtype=torch.float32, device="cpu")
    ref = paged_decode_attention_ref(q, kv[:, 0], kv[:, 1], table, lens, scale=0.25)
    assert torch.equal(paged_decode_attention(q, kv[:, 0], kv[:, 1], table, lens, scale=0.25), ref)
    out = torch.empty_like(q)
    assert paged_decode_attention(q, kv[:, 0], kv[:, 1], table, lens, scale=0.25, out=out) is out
    assert torch.equal(out, ref)


def test_default_num_splits_fills_device_within_blocks():
    cpu = torch.device("cpu")
    assert default_num_splits(batch=1, num_kv_heads=1, max_tokens=10_000, block_n=64, device=cpu) >= 2
    assert default_num_splits(batch=1, num_kv_heads=1, max_tokens=64, block_n=64, device=cpu) == 1
    assert default_num_splits(batch=64, num_kv_heads=8, max_tokens=10_000, block_n=64, device=cpu) == 1
    assert default_num_splits(batch=1, num_kv_heads=1, max_tokens=0, block_n=64, device=cpu) == 1


def test_use_triton_on_cpu_without_interpreter_raises(monkeypatch):
    q, kv, table, lens = make_case([5], page_size=4, num_kv_heads=1, group=1, head_dim=16, dtype=torch.float32,
                                   device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        paged_decode_attention(q, kv[:, 0], kv[:, 1], table, lens, scale=0.25, use_triton=True)


def _valid_args():
    q, kv, table, lens = make_case([5, 9], page_size=4, num_kv_heads=2, group=2, head_dim=16, dtype=torch.float32,
                                   device="cpu")
    return dict(q=q, k_cache=kv[:, 0], v_cache=kv[:, 1], page_table=table, kv_lens=lens)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(q=a["q"][0]), r"q must be 3-D \[B, H, D\]"),
    (lambda a: a.update(k_cache=a["k_cache"][0]), r"k_cache must be 4-D"),
    (lambda a: a.update(page_table=a["page_table"][0]), r"page_table must be 2-D"),
    (lambda a: a.update(q=a["q"][..., :8].contiguous()), r"head dim mismatch: q has D=8"),
    (lambda a: a.update(v_cache=a["v_cache"][..., :8]), r"k_cache and v_cache shapes differ"),
    (lambda a: a.update(q=a["q"][:, :3].contiguous()), r"H=3 must be a multiple of num kv heads KVH=2"),
    (lambda a: a.update(page_table=a["page_table"].long()), r"page_table must be int32, got torch.int64"),
    (lambda a: a.update(kv_lens=a["kv_lens"].long()), r"kv_lens must be int32"),
    (lambda a: a.update(kv_lens=a["kv_lens"][:1]), r"batch mismatch: q has B=2"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), r"q dtype must be one of"),
    (lambda a: a.update(v_cache=a["v_cache"].half()), r"must share one dtype"),
    (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), r"q must be contiguous in its last dim"),
])
def test_launcher_rejects_bad_arguments(change, match):
    args = _valid_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**args, scale=0.25)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_splits=0), r"num_splits must be None or an int in \[1, "),
    (dict(block_n=24), r"block_n must be None or a power of two >= 16"),
    (dict(scale=float("nan")), r"scale must be a finite float"),
    (dict(out=torch.empty(2, 4, 16, dtype=torch.float16)), r"out must be \[B, H, D\]"),
    (dict(window=0), r"window must be None or an int >= 1"),
])
def test_launcher_rejects_bad_options(kwargs, match):
    kwargs.setdefault("scale", 0.25)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**_valid_args(), **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_splits", [1, None])
@pytest.mark.parametrize("window", [None, 512])
def test_cuda_triton_matches_reference(dtype, num_splits, window):
    S, KVH, group, D = 16, 8, 4, 128
    q, kv, table, lens = make_case([0, 1, 16, 300, 1000, 777], page_size=S, num_kv_heads=KVH, group=group,
                                   head_dim=D, dtype=torch.float32, seed=11, device="cuda")
    q, kv = q.to(dtype), kv.to(dtype)
    ref = paged_decode_attention_ref(q.float(), kv[:, 0].float(), kv[:, 1].float(), table, lens, scale=D ** -0.5,
                                     window=window)
    out = paged_decode_attention(q, kv[:, 0], kv[:, 1], table, lens, scale=D ** -0.5, num_splits=num_splits,
                                 window=window)
    assert out.dtype == dtype and not out.isnan().any()
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
