"""MLA decode attention over the paged latent cache: the torch reference against plain (non-absorbed)
MLA, the Triton kernel against the reference (interpreter on a CPU, compiled on a GPU, at DeepSeek-V3.2's
real sizes there), and the launcher's argument checks."""

from __future__ import annotations

import pytest
import torch

from hisa.attention import mla_decode  # on a CPU machine tests/conftest.py runs Triton in the interpreter
from hisa.attention.mla_reference import mla_decode_attention_ref

mla_decode_attention = mla_decode.mla_decode_attention
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(kv_lens: list[int], *, page_size: int, heads: int, dl: int, dr: int, topk: int | None,
              dtype: torch.dtype, seed: int = 0, device: str = DEVICE):
    """Random absorbed queries, a latent cache with each request's pages scattered, and (topk given)
    a per-request selection of distinct positions, -1 padded where a request has fewer tokens.

    Slots no request may read hold NaN, so a kernel that fails to mask them returns NaN.
    Returns q [B, H, dl + dr], cache [P, S, dl + dr], table int32 [B, W], lens int32 [B], indices int32 [B, K] or None.
    """
    gen = torch.Generator().manual_seed(seed)
    S, B = page_size, len(kv_lens)
    n_pages = [-(-n // S) for n in kv_lens]
    P = sum(n_pages) + 3
    cache = torch.full((P, S, dl + dr), float("nan"))
    perm = torch.randperm(P, generator=gen)
    table = torch.full((B, max(n_pages) + 1), -1, dtype=torch.int32)
    used = 0
    for b, (n, npg) in enumerate(zip(kv_lens, n_pages)):
        pages = perm[used:used + npg]
        used += npg
        table[b, :npg] = pages.to(torch.int32)
        rows = torch.randn(npg * S, dl + dr, generator=gen)
        rows[n:] = float("nan")
        cache[pages] = rows.view(npg, S, dl + dr)
    q = torch.randn(B, heads, dl + dr, generator=gen)
    indices = None
    if topk is not None:
        indices = torch.full((B, topk), -1, dtype=torch.int32)
        for b, n in enumerate(kv_lens):
            pick = torch.randperm(n, generator=gen)[:topk]
            indices[b, : len(pick)] = pick.to(torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return q.to(device, dtype), cache.to(device, dtype), to(table), to(lens), to(indices)


def test_reference_equals_plain_mla_over_the_selection():
    """Absorbed decode == MLA with keys and values expanded through kv_b_proj (float64)."""
    gen = torch.Generator().manual_seed(3)
    H, nope, v, dl, dr, n = 4, 12, 10, 16, 8, 30
    w = torch.randn(H, nope + v, dl, generator=gen, dtype=torch.float64)  # kv_b_proj.weight viewed per head
    latent = torch.randn(n, dl, generator=gen, dtype=torch.float64)
    k_pe = torch.randn(n, dr, generator=gen, dtype=torch.float64)
    q_nope = torch.randn(H, nope, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(H, dr, generator=gen, dtype=torch.float64)
    selected = torch.tensor([3, 29, 0, 17, 8])
    scale = 0.3
    # plain MLA: per head key [k_nope | k_pe], value W_UV latent, over the selected tokens
    k_nope = torch.einsum("hnl,tl->htn", w[:, :nope], latent)  # [H, n, nope]
    values = torch.einsum("hvl,tl->htv", w[:, nope:], latent)  # [H, n, v]
    scores = (torch.einsum("hn,htn->ht", q_nope, k_nope) + q_pe @ k_pe.T) * scale  # [H, n]
    probs = scores[:, selected].softmax(-1)
    expected = torch.einsum("ht,htv->hv", probs, values[:, selected])  # [H, v]

    q_abs = torch.cat([torch.einsum("hn,hnl->hl", q_nope, w[:, :nope]), q_pe], dim=-1)[None]  # [1, H, dl + dr]
    cache = torch.cat([latent, k_pe], dim=-1).view(n // 5, 5, dl + dr)  # pages of 5 tokens, in order
    table = torch.arange(n // 5, dtype=torch.int32)[None]
    idx = torch.cat([selected, torch.tensor([-1, -1])]).to(torch.int32)[None]
    o_lat = mla_decode_attention_ref(q_abs, cache, table, torch.tensor([n], dtype=torch.int32), scale=scale,
                                     kv_lora_rank=dl, indices=idx)[0]  # [H, dl]
    out = torch.einsum("hl,hvl->hv", o_lat, w[:, nope:])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # the reference computes in fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("heads,dl,dr,page_size,kv_lens", [
    (4, 32, 16, 4, [37, 0, 13]),          # H < block_h, an empty request
    (20, 40, 8, 16, [70, 1, 33]),         # H not a multiple of block_h, Dl and Dr not powers of two
    (16, 64, 16, 1, [25, 9]),             # token-granular pages
])
def test_triton_matches_reference(dtype, sparse, heads, dl, dr, page_size, kv_lens):
    q, cache, table, lens, idx = make_case(kv_lens, page_size=page_size, heads=heads, dl=dl, dr=dr,
                                           topk=12 if sparse else None, dtype=dtype, seed=heads + dl)
    ref = mla_decode_attention_ref(q, cache, table, lens, scale=0.2, kv_lora_rank=dl, indices=idx)
    for splits in (1, 3):
        out = mla_decode_attention(q, cache, table, lens, scale=0.2, kv_lora_rank=dl, indices=idx,
                                   num_splits=splits, use_triton=True)
        torch.testing.assert_close(out, ref, **TOL[dtype])
    assert not ref.isnan().any()


def test_triton_wide_tiling_matches_reference():
    """The large-batch tiling (64 heads x 64 rows, 8 warps) on a head count it does not divide."""
    q, cache, table, lens, idx = make_case([50, 7, 33], page_size=1, heads=70, dl=32, dr=16, topk=40,
                                           dtype=torch.float32, seed=3)
    ref = mla_decode_attention_ref(q, cache, table, lens, scale=0.2, kv_lora_rank=32, indices=idx)
    out = mla_decode_attention(q, cache, table, lens, scale=0.2, kv_lora_rank=32, indices=idx, use_triton=True,
                               block_h=64, block_n=64, num_warps=8)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert mla_decode.default_mla_tiling(batch=512, heads=128, device=torch.device("cpu")) == (16, 32, 4)


def test_triton_skips_out_of_range_and_padded_positions_and_fills_out():
    q, cache, table, lens, idx = make_case([20, 9], page_size=4, heads=4, dl=16, dr=16, topk=None,
                                           dtype=torch.float32, seed=7)
    idx = torch.tensor([[19, -1, 0, 25, 7], [8, 9, 100, -1, 2]], dtype=torch.int32, device=q.device)  # 25, 9, 100 >= len
    out = torch.empty(2, 4, 16, device=q.device)
    mla_decode_attention(q, cache, table, lens, scale=0.25, kv_lora_rank=16, indices=idx, out=out, use_triton=True,
                         num_splits=None)
    # the same as attending to exactly the valid positions
    valid = torch.tensor([[19, 0, 7, -1, -1], [8, 2, -1, -1, -1]], dtype=torch.int32, device=q.device)
    ref = mla_decode_attention_ref(q, cache, table, lens, scale=0.25, kv_lora_rank=16, indices=valid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cpu_default_is_the_reference():
    q, cache, table, lens, idx = make_case([10], page_size=4, heads=2, dl=8, dr=8, topk=4, dtype=torch.float32,
                                           device="cpu")
    out = mla_decode_attention(q, cache, table, lens, scale=0.5, kv_lora_rank=8, indices=idx)
    torch.testing.assert_close(out, mla_decode_attention_ref(q, cache, table, lens, scale=0.5, kv_lora_rank=8,
                                                             indices=idx))


def _good_args():
    q, cache, table, lens, idx = make_case([10, 6], page_size=4, heads=2, dl=16, dr=16, topk=4, dtype=torch.float32,
                                           device="cpu")
    return dict(q=q, latent_cache=cache, page_table=table, kv_lens=lens, indices=idx, scale=0.5, kv_lora_rank=16)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(page_table=a["page_table"].long()), "page_table must be int32"),
    (lambda a: a.update(indices=a["indices"].long()), "indices must be int32"),
    (lambda a: a.update(latent_cache=a["latent_cache"][..., :24]), "row width mismatch"),
    (lambda a: a.update(kv_lora_rank=32), "kv_lora_rank must be an int"),
    (lambda a: a.update(kv_lens=a["kv_lens"][:1]), "batch mismatch"),
    (lambda a: a.update(indices=a["indices"][:, None]), "indices must be 2-D"),
    (lambda a: a.update(q=a["q"].transpose(0, 2).contiguous().transpose(0, 2)), "contiguous in its last dim"),
    (lambda a: a.update(scale=float("nan")), "scale must be a finite float"),
])
def test_launcher_rejects_bad_arguments(change, match):
    args = _good_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        mla_decode_attention(**args)


@pytest.mark.parametrize("kwargs,match", [(dict(num_splits=64), "num_splits"), (dict(block_h=8), "block_h"),
                                          (dict(block_n=48), "block_n")])
def test_launcher_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mla_decode_attention(**_good_args(), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels at real sizes)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("tiling", [dict(block_h=16, block_n=32, num_warps=4), dict(block_h=64, block_n=64, num_warps=8)])
def test_cuda_real_sizes_match_reference(dtype, sparse, tiling):
    """DeepSeek-V3.2's shapes: 128 heads, latent 512 + rope 64, 2048 selected of up to 9K tokens, page 64."""
    q, cache, table, lens, idx = make_case([9000, 3000, 2048, 1], page_size=64, heads=128, dl=512, dr=64,
                                           topk=2048 if sparse else None, dtype=dtype, seed=5, device="cuda")
    ref = mla_decode_attention_ref(q.float(), cache.float(), table, lens, scale=0.135, kv_lora_rank=512, indices=idx)
    for splits in (None, 1, 8):
        out = mla_decode_attention(q, cache, table, lens, scale=0.135, kv_lora_rank=512, indices=idx,
                                   num_splits=splits, **tiling)
        torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def _fp8_case(kv_lens, *, page_size, heads, dl, dr, topk, dtype, seed, device=DEVICE):
    """make_case's rows packed as FP8 (NaN slots become 0: the packing of unread slots is arbitrary) and
    the same rows unpacked into dtype, which the reference reads."""
    from hisa.kvcache.mla_fp8 import pack_latent, unpack_latent

    q, cache, table, lens, idx = make_case(kv_lens, page_size=page_size, heads=heads, dl=dl, dr=dr, topk=topk,
                                           dtype=torch.float32, seed=seed, device=device)
    packed = pack_latent(torch.nan_to_num(cache), kv_lora_rank=dl)
    return q.to(dtype), packed, unpack_latent(packed, kv_lora_rank=dl, dtype=dtype), table, lens, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("heads,dl,dr,page_size,kv_lens", [(4, 128, 16, 4, [37, 0, 13]), (20, 256, 8, 1, [25, 9])])
def test_fp8_cache_matches_reference_over_the_unpacked_rows(dtype, sparse, heads, dl, dr, page_size, kv_lens):
    """FP8 rows (uint8 [P, S, Dl + 4 Dl/128 + 2 Dr]) through the Triton kernel and through the torch path
    give attention over the unpacked rows in q's dtype: the kernel dequantizes as unpack_latent does."""
    q, packed, rows, table, lens, idx = _fp8_case(kv_lens, page_size=page_size, heads=heads, dl=dl, dr=dr,
                                                  topk=12 if sparse else None, dtype=dtype, seed=heads + dl)
    ref = mla_decode_attention_ref(q, rows, table, lens, scale=0.2, kv_lora_rank=dl, indices=idx)
    torch_path = mla_decode_attention(q, packed, table, lens, scale=0.2, kv_lora_rank=dl, indices=idx,
                                      use_triton=False)
    torch.testing.assert_close(torch_path, ref, rtol=0, atol=0)
    for splits in (1, 3):
        out = mla_decode_attention(q, packed, table, lens, scale=0.2, kv_lora_rank=dl, indices=idx,
                                   num_splits=splits, use_triton=True)
        torch.testing.assert_close(out, ref, **TOL[dtype])


def test_fp8_cache_rejects_rows_of_another_layout():
    q, packed, _, table, lens, idx = _fp8_case([9], page_size=4, heads=4, dl=128, dr=16, topk=None,
                                               dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="rows of 164 bytes"):
        mla_decode_attention(q, packed[..., :-2], table, lens, scale=0.2, kv_lora_rank=128)
    with pytest.raises(ValueError, match="multiple of 128"):
        mla_decode_attention(q[..., 64:], packed, table, lens, scale=0.2, kv_lora_rank=64)


_COMPILE_FP8 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hisa.attention import triton_mla_decode

block_h, block_n, sparse, hw = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
consts = dict(DL=512, DR=64, S=1, BLOCK_H=block_h, BLOCK_DL=512, BLOCK_DR=64, BLOCK_N=block_n, SPARSE=sparse,
              DIRECT_OUT=False, INTERPRETER=False, FP8=True, HW_CVT=hw)
sig = {"q_ptr": "*bf16", "kv_ptr": "*u8", "pt_ptr": "*i32", "lens_ptr": "*i32", "idx_ptr": "*i32", "out_ptr": "*bf16",
       "m_ws_ptr": "*fp32", "l_ws_ptr": "*fp32", "acc_ws_ptr": "*fp32", "scale_log2": "fp32", "H": "i32",
       "MAX_TOKENS": "i32", "NUM_ITEMS_SPARSE": "i32", "NUM_SPLITS": "i32", "stride_qb": "i32", "stride_qh": "i32",
       "stride_kp": "i32", "stride_ks": "i32", "stride_ptb": "i32", "stride_lens": "i32", "stride_ib": "i32",
       "stride_ob": "i32", "stride_oh": "i32"}
sig.update({name: "constexpr" for name in consts})
compiled = triton.compile(ASTSource(fn=triton_mla_decode.mla_decode_split_kernel, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 8 if block_h == 64 else 4})
assert compiled.asm["cubin"]
"""


@pytest.mark.parametrize("block_h,block_n,sparse,hw", [(16, 32, True, True), (64, 64, True, True), (16, 32, False, True),
                                                      (64, 64, True, False)])
def test_fp8_kernel_compiles_for_hopper(block_h, block_n, sparse, hw):
    """The FP8 variant at DeepSeek-V3.2's row (512 + 64) through Triton's compiler for sm_90 (PTX and a
    cubin, no GPU needed): the interpreter accepts code the compiler refuses."""
    from tests.conftest import compile_for_hopper

    compile_for_hopper(_COMPILE_FP8, str(block_h), str(block_n), str(int(sparse)), str(int(hw)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels at real sizes)")
@pytest.mark.parametrize("tiling", [dict(block_h=16, block_n=32, num_warps=4), dict(block_h=64, block_n=64, num_warps=8)])
@pytest.mark.parametrize("cvt", ["hw", "int"])
def test_cuda_fp8_real_sizes_match_reference(tiling, cvt, monkeypatch):
    """DeepSeek-V3.2's shapes with 656-byte FP8 rows, bf16 queries, top-2048 of up to 9K tokens, page 1 and 64;
    the GPU's fp8 conversion and the integer one (HISA_FP8_CVT)."""
    monkeypatch.setenv("HISA_FP8_CVT", cvt)
    for page_size in (1, 64):
        q, packed, rows, table, lens, idx = _fp8_case([9000, 3000, 2048, 1], page_size=page_size, heads=128, dl=512,
                                                      dr=64, topk=2048, dtype=torch.bfloat16, seed=5, device="cuda")
        assert packed.shape[-1] == 656
        ref = mla_decode_attention_ref(q.float(), rows.float(), table, lens, scale=0.135, kv_lora_rank=512, indices=idx)
        for splits in (None, 1, 8):
            out = mla_decode_attention(q, packed, table, lens, scale=0.135, kv_lora_rank=512, indices=idx,
                                       num_splits=splits, **tiling)
            torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])
