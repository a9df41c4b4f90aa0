"""lowbit: the key quantization, the Triton update and scoring kernels against their torch references,
rankings on keys it represents exactly, and the attention scale it scores with."""

from __future__ import annotations

import pytest
import torch

from hisa.sparse.base import DecodeRows, create_algorithm
from hisa.sparse.lowbit_keys import dequantize_keys, lowbit_update, quantize_keys
from hisa.sparse.lowbit_scores import lowbit_page_scores, lowbit_page_scores_ref
from hisa.sparse.page_scores import select_pages

L, H, KVH, D = 2, 6, 2, 64
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _algo(name="lowbit", page_size=4, max_pages=16, slots=3, h=H, kvh=KVH, d=D, scale=None):
    return create_algorithm(name, num_layers=L, num_heads=h, num_kv_heads=kvh, head_dim=d, page_size=page_size,
                            max_requests=slots, max_pages=max_pages, scale=d ** -0.5 if scale is None else scale,
                            device=torch.device("cpu"), dtype=torch.float32)


def _rows(slot, t, lo, hi, num_select):
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return DecodeRows(sparse_slots=i32(slot), t=i32(t), lo=i32(lo), hi=i32(hi), num_select=num_select)


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 32), (4, 16), (2, 64)])
def test_quantized_keys_are_within_half_a_step(bits, group):
    """Every channel comes back within half its group's step (plus fp16 rounding of the minimum);
    NaN tokens (a partial page's unwritten tail) become zero codes and scales."""
    torch.manual_seed(bits + group)
    keys = torch.randn(50, KVH, D) * 3 + torch.linspace(-4, 4, D)  # offsets per channel, as RoPE'd keys have
    keys[-3:] = float("nan")
    codes, scales = quantize_keys(keys, bits=bits, group_size=group)
    assert codes.shape == (50, KVH, D * bits // 8) and codes.dtype == torch.uint8
    assert scales.shape == (50, KVH, D // group, 2) and scales.dtype == torch.float16
    back = dequantize_keys(codes, scales, bits=bits, group_size=group)
    step = scales[..., 0].float().repeat_interleave(group, -1)
    err = (back[:-3] - keys[:-3]).abs()
    assert (err <= step[:-3] / 2 + 2e-3 * keys[:-3].abs().amax()).all()
    assert (codes[-3:] == 0).all() and (scales[-3:] == 0).all() and (back[-3:] == 0).all()
    # a group that is constant is exact
    flat = torch.full((1, KVH, D), 0.75)
    assert torch.equal(dequantize_keys(*quantize_keys(flat, bits=bits, group_size=group), bits=bits,
                                       group_size=group), flat)


@pytest.mark.parametrize("bits", [4, 2])
def test_update_kernel_matches_reference(bits):
    """The Triton update (interpreter on the CPU, the GPU where there is one) writes the same codes and
    scales as the torch reference; the padding row (sentinel slot) and t == 0 rows write nothing."""
    torch.manual_seed(bits)
    SS, MAXT = 4, 24
    codes = torch.randint(0, 255, (SS, MAXT, KVH, D * bits // 8), dtype=torch.uint8)
    scales = torch.randn(SS, MAXT, KVH, D // 32, 2).to(torch.float16)
    keys = torch.randn(4, KVH, D) * 2
    ss = torch.tensor([1, 3, 0, 2], dtype=torch.int32)  # slot 3 is the sentinel
    t = torch.tensor([5, 9, 0, 24], dtype=torch.int32)
    want = (codes.clone(), scales.clone())
    lowbit_update(*want, keys, ss, t, bits=bits, group_size=32, sentinel=3, use_triton=False)
    got = (codes.clone().to(DEV), scales.clone().to(DEV))
    lowbit_update(*got, keys.to(DEV), ss.to(DEV), t.to(DEV), bits=bits, group_size=32, sentinel=3, use_triton=True)
    if DEV.type == "cpu":
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    else:  # GPU division may round differently at a code boundary: dequantized keys within one step
        a = dequantize_keys(got[0].cpu(), got[1].cpu(), bits=bits, group_size=32)
        b = dequantize_keys(*want, bits=bits, group_size=32)
        torch.testing.assert_close(a, b, atol=float(want[1][..., 0].float().max()) * 1.01, rtol=0)
    changed = (want[0] != codes).any(-1).any(-1)  # [SS, MAXT] tokens written
    assert changed.nonzero().tolist() == [[1, 4], [2, 23]]


@pytest.mark.parametrize("name", ["lowbit", "lowbit-2bit"])
def test_prefill_then_decode_updates_equal_direct_quantization(name):
    """A prompt ending mid-page, then decode tokens: every token's entry equals quantizing its key
    directly (construct + per-step updates through the algorithm's hooks)."""
    torch.manual_seed(0)
    s, n_prompt, n_decode, slot = 4, 10, 7, 1
    algo = _algo(name, s)
    keys = torch.randn(n_prompt + n_decode, KVH, D)
    padded = torch.full((-(-n_prompt // s) * s, KVH, D), float("nan"))
    padded[:n_prompt] = keys[:n_prompt]
    algo.construct_representations(1, slot, 0, padded)
    for t in range(n_prompt, n_prompt + n_decode):
        rows = _rows([slot, algo.max_requests], [t + 1, 0], [0, 0], [0, 0], 1)
        algo.update_representations(1, rows, torch.stack([keys[t], torch.full((KVH, D), 1e9)]))
    codes, scales = quantize_keys(keys, bits=algo.bits, group_size=32)
    n = n_prompt + n_decode
    assert torch.equal(algo.codes[1, slot, :n], codes) and torch.equal(algo.scales[1, slot, :n], scales)


def _index(ss, maxt, kvh, d, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(ss * maxt, kvh, d, generator=g) + torch.linspace(-2, 2, d)
    codes, scales = quantize_keys(keys, bits=bits, group_size=group)
    return codes.view(ss, maxt, kvh, -1), scales.view(ss, maxt, kvh, d // group, 2)


@pytest.mark.parametrize("h,kvh,d,s,maxp,bits,group,pool,page", [
    (6, 2, 64, 4, 40, 4, 32, "mean", "max"), (4, 4, 32, 16, 9, 4, 32, "max", "max"),
    (9, 3, 64, 1, 80, 2, 32, "mean", "max"), (4, 1, 128, 8, 12, 4, 64, "mean", "max"),
    (8, 2, 16, 32, 5, 2, 16, "max", "max"), (6, 2, 64, 4, 40, 4, 32, "max", "max"),
    (6, 2, 64, 4, 40, 4, 32, "mean", "mass"), (8, 2, 16, 32, 5, 2, 16, "max", "mass"),
    (9, 3, 64, 1, 80, 2, 32, "mean", "mass")])
def test_page_scores_triton_matches_reference(h, kvh, d, s, maxp, bits, group, pool, page):
    """The two scoring kernels (per-block page values + softmax partials, then the merge) against the
    torch reference: several blocks per row, ranges cut inside blocks, a row that selects nothing,
    page sizes 1 to 32, 2 and 4 bits, GQA groups of 1 to 4 heads, a page's best token or its mass."""
    torch.manual_seed(h * 100 + maxp)
    R, SS = 4, 5
    q = torch.randn(R, h, d)
    codes, scales = _index(SS, maxp * s, kvh, d, bits, group, seed=maxp)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    ss, lo, hi = i32([3, 0, 1, 4]), i32([1, 0, min(1, maxp), 0]), i32([maxp - 1, 0, min(33, maxp), maxp])
    kw = dict(scale=0.3, page_size=s, bits=bits, group_size=group, pool=pool, page=page)
    want = lowbit_page_scores_ref(q, codes, scales, ss, lo, hi, **kw)
    got = lowbit_page_scores(*(x.to(DEV) for x in (q, codes, scales, ss, lo, hi)), use_triton=True, **kw).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got.nan_to_num(0, neginf=0), want.nan_to_num(0, neginf=0), rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[1]).all()  # the row with an empty range scores nothing


# fp16 q: the kernel rounds the dequantized keys to fp16 (2^-11 relative) before its fp32-accumulated
# dot; the reference keeps them in fp32. Logits move by ~1e-4 (log2 units), scores by ~1e-4 relative.
FP16_RTOL = 2e-3


@pytest.mark.parametrize("h,kvh,d,s,bits,group,sub_tokens", [
    (8, 1, 32, 8, 2, 32, 16),     # G = 8; D * bits / 8 = 8 bytes: the dot still runs over all 32 channels
    (4, 4, 16, 16, 2, 16, 64),    # G = 1 (padded to 16 rows), D = 16: the smallest dot
    (6, 2, 96, 32, 4, 32, 16),    # three groups padded to four (a 128-channel dot); sub_tokens < page
    (4, 2, 64, 32, 4, 16, 128),   # four pages per dot
    (6, 3, 64, 8, 2, 64, 32)])
def test_page_scores_fp16_dot_matches_reference(h, kvh, d, s, bits, group, sub_tokens):
    """fp16 q: the dot over keys dequantized to fp16, against the fp32 reference, over the
    shapes that pad (heads, groups), the smallest head dim, pages per dot from 1/2 to 16."""
    torch.manual_seed(d + s)
    R, SS, maxp = 3, 4, 12
    q = torch.randn(R, h, d).half()
    codes, scales = _index(SS, maxp * s, kvh, d, bits, group, seed=d)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    ss, lo, hi = i32([2, 0, 3]), i32([1, 5, 0]), i32([maxp - 1, 5, maxp])
    kw = dict(scale=d ** -0.5, page_size=s, bits=bits, group_size=group)
    want = lowbit_page_scores_ref(q, codes, scales, ss, lo, hi, **kw)
    got = lowbit_page_scores(*(x.to(DEV) for x in (q, codes, scales, ss, lo, hi)), use_triton=True,
                             sub_tokens=sub_tokens, **kw).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got.nan_to_num(0, neginf=0), want.nan_to_num(0, neginf=0), rtol=FP16_RTOL,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_page_scores_pick_the_same_pages_as_the_reference(dtype):
    """Random keys plus one needle token per chosen page that matches its row's query (a clear
    winner per page, of varied strength): the kernel's top-k page sets equal the reference's."""
    torch.manual_seed(7)
    R, h, kvh, d, s, maxp, k = 3, 8, 2, 64, 16, 40, 6
    q = torch.randn(R, h, d)
    keys = torch.randn(R, maxp * s, kvh, d)
    for r in range(R):
        pages = torch.randperm(maxp)[:k]
        for n, p in enumerate(pages.tolist()):  # needle strength 2..4.5 x a typical key's match
            keys[r, p * s + n % s] = q[r].view(kvh, h // kvh, d).mean(1) * (2 + 0.5 * n)
    codes, scales = quantize_keys(keys.view(-1, kvh, d), bits=4, group_size=32)
    codes, scales = codes.view(R, maxp * s, kvh, -1), scales.view(R, maxp * s, kvh, d // 32, 2)
    ss = torch.arange(R, dtype=torch.int32)
    lo, hi = torch.zeros(R, dtype=torch.int32), torch.full((R,), maxp, dtype=torch.int32)
    kw = dict(scale=d ** -0.5, page_size=s, bits=4, group_size=32)
    q = q.to(dtype)
    want = select_pages(lowbit_page_scores_ref(q, codes, scales, ss, lo, hi, **kw), lo, hi, k)
    got = lowbit_page_scores(*(x.to(DEV) for x in (q, codes, scales, ss, lo, hi)), use_triton=True, **kw).cpu()
    assert torch.equal(select_pages(got, lo, hi, k), want)


def test_sub_tokens_is_a_pure_tuning_knob():
    """Tokens per dot (16 to 256 at page 4) change nothing beyond fp32 rounding; a value tl.dot
    cannot run is refused with a message."""
    torch.manual_seed(3)
    R, h, kvh, d, s, maxp = 2, 4, 2, 32, 4, 70
    q = torch.randn(R, h, d)
    codes, scales = _index(R, maxp * s, kvh, d, 4, 32, seed=3)
    ss, lo = torch.arange(R, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    hi = torch.tensor([maxp, 66], dtype=torch.int32)
    q, codes, scales, ss, lo, hi = (x.to(DEV) for x in (q, codes, scales, ss, lo, hi))  # the GPU, or the interpreter
    kw = dict(scale=0.2, page_size=s, bits=4, group_size=32, use_triton=True)
    base = lowbit_page_scores(q, codes, scales, ss, lo, hi, **kw)
    for sub in (16, 128, 256):
        torch.testing.assert_close(lowbit_page_scores(q, codes, scales, ss, lo, hi, sub_tokens=sub, num_warps=2, **kw),
                                   base, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="sub_tokens"):
        lowbit_page_scores(q, codes, scales, ss, lo, hi, sub_tokens=8, **kw)


def _exact_keys(n, kvh, d, seed):
    """Keys 4 bits represent exactly: integers 0..15 in every group, with a 0 and a 15 in each."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 16, (n, kvh, d), generator=g).float()
    keys[..., ::32] = 0.0
    keys[..., 1::32] = 15.0
    return keys


def test_one_token_pages_rank_by_exact_attention_mass():
    """Page size 1, keys the 4-bit code holds exactly, mean pooling: the page score is the exact
    attention summed over heads, so lowbit's pages are the oracle's."""
    torch.manual_seed(1)
    n = 24
    keys = _exact_keys(n, KVH, D, seed=2)
    assert torch.equal(dequantize_keys(*quantize_keys(keys, bits=4, group_size=32), bits=4, group_size=32), keys)
    q = torch.randn(2, H, D) * 0.05
    algo, oracle = _algo("lowbit", 1, max_pages=n), _algo("oracle", 1, max_pages=n)
    for slot in (0, 2):
        algo.construct_representations(0, slot, 0, keys)
    rows = _rows([0, 2], [n, n], [1, 0], [n - 2, n], 7)
    rows.page_keys = lambda layer: keys.view(1, n, 1, KVH, D).expand(2, n, 1, KVH, D)
    picks = algo.retrieve_topk(0, q, rows).long()  # in page order
    assert torch.equal(picks, oracle.retrieve_topk(0, q, rows).sort(dim=1).values)


def test_mass_ranks_a_page_of_many_matches_above_a_page_of_one():
    """Page 1 holds one key matching the query a little better than each of page 2's four keys: the
    best-token rule picks page 1, the mass rule page 2 (four tokens' attention against one), as the
    oracle does with exact keys."""
    s = 4
    keys = torch.zeros(4 * s, KVH, D)
    keys[s, :, 0] = 2.0
    keys[2 * s:3 * s, :, 0] = 1.5
    q = torch.zeros(1, H, D)
    q[..., 0] = 2.0
    rows = _rows([0], [4 * s], [0], [4], 1)
    rows.page_keys = lambda layer: keys.view(1, 4, s, KVH, D)
    picks = {}
    for name in ("lowbit-best", "lowbit", "oracle"):
        algo = _algo(name, s)
        if name != "oracle":
            algo.construct_representations(0, 0, 0, keys)
        picks[name] = algo.retrieve_topk(0, q, rows).item()
    assert picks == {"lowbit-best": 1, "lowbit": 2, "oracle": 2}


def test_a_needle_token_lifts_its_page_where_the_bound_is_fooled():
    """Page 0's keys spread wide in two channels (Quest's bound sums both maxima: 10, while no key
    scores above 0); page 1 holds one key that truly matches (6) among zeros. lowbit picks page 1,
    quest page 0."""
    s = 4
    keys = torch.zeros(3 * s, KVH, D)
    keys[0, :, :2] = torch.tensor([5.0, -5.0])
    keys[1, :, :2] = torch.tensor([-5.0, 5.0])
    keys[s + 2, :, :2] = torch.tensor([3.0, 3.0])
    q = torch.zeros(1, H, D)
    q[..., :2] = 1.0
    picks = {}
    for name in ("quest", "lowbit", "lowbit-2bit", "lowbit-max", "lowbit-best"):
        algo = _algo(name, s)
        algo.construct_representations(0, 0, 0, keys)
        picks[name] = algo.retrieve_topk(0, q, _rows([0], [3 * s], [0], [3], 1)).item()
    assert picks == {"quest": 0, "lowbit": 1, "lowbit-2bit": 1, "lowbit-max": 1, "lowbit-best": 1}


def test_metadata_bytes():
    """Per token, KV head and layer: D/2 code bytes + 4 bytes per group of 32 at 4 bits (40 at D=64,
    15.6% of a 16-bit K+V), D/4 + 4 per group at 2 bits (24)."""
    assert _algo("lowbit").metadata_bytes_per_page() == L * 4 * KVH * 40
    assert _algo("lowbit-2bit").metadata_bytes_per_page() == L * 4 * KVH * 24


def test_selection_scores_with_the_models_attention_scale():
    """A Gemma-3 config whose query_pre_attn_scalar (64) is not its head_dim (16): the engine hands
    lowbit the model's attention scale (1/8, not 1/4), and the pick depends on it. Head a of KV group
    0 matches one key of page 0 (logit 12/scale-unit), head b two keys of pages 1 and 2 (20 each):
    at 1/8 the softmaxes are soft and page 1 wins on its higher logit; at 1/4 head a's softmax
    concentrates on page 0, which then wins."""
    from hisa import LLM
    from hisa.models.config import PRESETS, ModelConfig
    from hisa.models.factory import random_model
    from hisa.sparse.config import SparseConfig

    cfg = ModelConfig(**{**PRESETS["tiny-gemma3"], "query_pre_attn_scalar": 64})
    loaded = random_model(cfg, device=torch.device("cpu"), dtype=torch.float32, seed=1)
    llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=4, max_model_len=256,
              sparse=SparseConfig(algorithm="lowbit", token_budget=64, min_prompt_len=32, host_pool_gb=0.01,
                                  max_sparse_requests=1))
    algo = llm.engine.sparse.algorithm
    d = cfg.head_dim
    assert algo.scale == cfg.attention_scale == 64 ** -0.5 != d ** -0.5

    s, kvh, h = 4, cfg.num_kv_heads, cfg.num_heads
    keys = torch.zeros(4 * s, kvh, d)
    keys[1, 0, 0] = 1.0  # page 0
    keys[s + 1, 0, 1] = keys[2 * s + 1, 0, 1] = 1.0  # pages 1 and 2
    q = torch.zeros(1, h, d)
    q[0, 0, 0], q[0, 1, 1] = 12.0, 20.0  # the two query heads of KV head 0
    algo.construct_representations(3, 0, 0, keys)  # layer 3: tiny-gemma3's global layer
    rows = _rows([0], [4 * s], [0], [3], 1)
    assert algo.retrieve_topk(3, q, rows).item() == 1
    algo.scale = d ** -0.5  # what selection scored with before the fix
    assert algo.retrieve_topk(3, q, rows).item() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real sizes)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 2])
def test_page_scores_real_sizes_on_gpu(dtype, bits):
    """Llama-3.1-8B shape (32 heads over 8 KV heads, head_dim 128) at 32K tokens, page 32, 4 rows;
    the update kernel on the same index."""
    torch.manual_seed(0)
    R, SS, s, maxp = 4, 5, 32, 1024
    q = torch.randn(R, 32, 128, device="cuda", dtype=dtype)
    keys = (torch.randn(SS * maxp * s, 8, 128, device="cuda") + torch.linspace(-2, 2, 128, device="cuda")).to(dtype)
    codes, scales = quantize_keys(keys, bits=bits, group_size=32)
    codes, scales = codes.view(SS, maxp * s, 8, -1), scales.view(SS, maxp * s, 8, 4, 2)
    ss = torch.arange(R, dtype=torch.int32, device="cuda")
    lo = torch.ones(R, dtype=torch.int32, device="cuda")
    hi = torch.tensor([1022, 17, 600, 3], dtype=torch.int32, device="cuda")
    for pool, page in (("mean", "max"), ("max", "max"), ("mean", "mass")):
        kw = dict(scale=128 ** -0.5, page_size=s, bits=bits, group_size=32, pool=pool, page=page)
        got = lowbit_page_scores(q, codes, scales, ss, lo, hi, **kw)
        want = lowbit_page_scores_ref(q, codes, scales, ss, lo, hi, **kw)
        # the dot rounds the dequantized keys to q's dtype: bf16 keeps 8 mantissa bits (2^-9), fp16 11
        rtol = 1e-2 if dtype == torch.bfloat16 else FP16_RTOL
        torch.testing.assert_close(got.nan_to_num(0, neginf=0), want.nan_to_num(0, neginf=0), rtol=rtol, atol=1e-6)
    new = torch.randn(R, 8, 128, device="cuda", dtype=dtype)
    t = torch.tensor([5, 700, 32768, 1], dtype=torch.int32, device="cuda")
    a = (codes.clone(), scales.clone())
    b = (codes.clone(), scales.clone())
    lowbit_update(*a, new, ss, t, bits=bits, group_size=32, sentinel=SS - 1, use_triton=True)
    lowbit_update(*b, new, ss, t, bits=bits, group_size=32, sentinel=SS - 1, use_triton=False)
    torch.testing.assert_close(dequantize_keys(*a, bits=bits, group_size=32),
                               dequantize_keys(*b, bits=bits, group_size=32),
                               atol=float(b[1][..., 0].float().max()) * 1.01, rtol=0)


_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hisa.sparse.triton_lowbit import lowbit_logits_kernel

consts = dict(H=32, G=4, BLOCK_G=16, S=32, SUB_P=2, NSUB=16, DB=64, NG=4, BLOCK_NG=4, GROUP=32, BITS=4,
              DOT_PRECISION="tf32", PAGE_MASS=sys.argv[1] == "mass")
sig = {"q_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*fp16", "sslot_ptr": "*i32", "lo_ptr": "*i32",
       "hi_ptr": "*i32", "logit_ptr": "*fp32", "mpart_ptr": "*fp32", "spart_ptr": "*fp32", "scale_log2": "fp32",
       "MAXP": "i32", "PB": "i32", **{n: "i32" for n in ("stride_qr", "stride_qh", "stride_cs", "stride_ct",
                                                         "stride_ss", "stride_st")}}
sig.update({name: "constexpr" for name in consts})
compiled = triton.compile(ASTSource(fn=lowbit_logits_kernel, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
assert compiled.asm["cubin"]
"""


@pytest.mark.parametrize("page", ["max", "mass"])
def test_logits_kernel_compiles_for_hopper(page):
    """The scoring kernel at the Llama-8B shape through Triton's compiler for sm_90 (no GPU needed)."""
    from tests.conftest import compile_for_hopper

    compile_for_hopper(_COMPILE, page)
