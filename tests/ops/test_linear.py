"""hisa.ops.linear: the decode-batch projection kernel against F.linear, and where it is used."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from hisa.ops import linear as linear_mod
from hisa.ops.linear import Linear, linear
from tests.conftest import compile_for_hopper

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,block_n,block_k", [(1, 40, 64, 16, 32), (5, 33, 100, 16, 32), (16, 64, 48, 32, 16),
                                                   (3, 17, 256, 16, 128)])
def test_kernel_matches_f_linear(dtype, m, n, k, block_n, block_k):
    """Rows 1..16, N and K not multiples of the blocks (masked tails), several blocks over K."""
    torch.manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = torch.randn(n, k, dtype=dtype, device=DEV) * k ** -0.5
    got = linear(x, w, use_triton=True, block_n=block_n, block_k=block_k, num_stages=2)
    want = F.linear(x.float(), w.float())
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@needs_triton
def test_fp16_bias_is_added_before_the_one_rounding():
    """The bias joins the fp32 accumulator (as cuBLAS adds it), not the rounded fp16 output: outputs
    near 1000 (fp16 steps of 0.5-1) plus biases under 0.5 differ from a round-then-add in about half
    the entries; the kernel matches one rounding of the fp32 sum but for accumulation-order ties."""
    torch.manual_seed(5)
    x = torch.randn(4, 64, dtype=torch.float16, device=DEV)
    w = (torch.randn(64, 64, device=DEV) * 120).half()
    b = (torch.rand(64, device=DEV) * 0.5).half()
    got = linear(x, w, b, use_triton=True, block_n=16, block_k=32, num_stages=1)
    exact = F.linear(x.float(), w.float()) + b.float()
    assert (got == exact.half()).float().mean() > 0.97
    assert (F.linear(x, w) + b != exact.half()).float().mean() > 0.2   # (what two roundings would give)


@needs_triton
def test_leading_dims_bias_and_strided_rows():
    x = torch.randn(2, 3, 40, device=DEV)
    big = torch.randn(6, 80, device=DEV)
    w = torch.randn(24, 40, device=DEV)
    b = torch.randn(24, device=DEV)
    got = linear(x, w, b, use_triton=True, block_n=16, block_k=16, num_stages=1)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3, 24)
    rows = big[:, :40]  # a row stride of 80
    torch.testing.assert_close(linear(rows, w, use_triton=True, block_n=16, block_k=16, num_stages=1),
                               F.linear(rows, w), rtol=1e-5, atol=1e-5)


@needs_triton
def test_bad_input_is_refused():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="does not match"):
        linear(x, torch.randn(4, 9, device=DEV), use_triton=True)
    with pytest.raises(ValueError, match="weight is"):
        linear(x, torch.randn(4, 8, device=DEV, dtype=torch.float16), use_triton=True)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, torch.randn(4, 8, device=DEV), torch.randn(5, device=DEV), use_triton=True)
    with pytest.raises(ValueError, match="at most 16 rows"):
        linear(torch.randn(17, 8, device=DEV), torch.randn(4, 8, device=DEV), use_triton=True)


def test_the_dispatch_uses_the_kernel_only_where_it_pays(monkeypatch):
    """CPU tensors, fp32, more than MAX_M rows and a weight too short to fill the GPU take F.linear;
    the model layer computes the same as nn.Linear either way."""
    calls = []
    real = F.linear
    monkeypatch.setattr(linear_mod.F, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = Linear(32, 48, bias=False)
    x = torch.randn(4, 32)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)
    assert calls == [(4, 32)]  # a CPU tensor: F.linear


@needs_triton
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,inter,k,block_n,block_k", [(1, 40, 64, 16, 32), (5, 33, 100, 16, 32), (16, 64, 48, 32, 16)])
def test_gate_up_kernel_matches_the_projection_then_act_mul(act, dtype, m, inter, k, block_n, block_k):
    """gate_up_act's kernel (both halves streamed by one program, the activation in its epilogue)
    against the fp32 projection then act(gate) * up; masked tails in I and K, several K blocks."""
    from hisa.ops.act_mul import act_mul_ref
    from hisa.ops.linear import gate_up_act

    torch.manual_seed(m * 100 + inter + k)
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = (torch.randn(2 * inter, k, device=DEV) * 2 * k ** -0.5).to(dtype)
    got = gate_up_act(x, w, act=act, use_triton=True, block_n=block_n, block_k=block_k, num_stages=2)
    want = act_mul_ref(F.linear(x.float(), w.float()), act=act)
    assert got.dtype == dtype and got.shape == (m, inter)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_gate_up_act_off_the_kernel_is_the_projection_then_act_mul():
    """Where the kernel does not run (here: the CPU), gate_up_act is linear + act_mul, leading dims kept;
    a weight that is not two halves, or an unknown activation, is refused."""
    from hisa.ops.act_mul import act_mul
    from hisa.ops.linear import gate_up_act

    x = torch.randn(2, 3, 24)
    w = torch.randn(40, 24)
    got = gate_up_act(x, w, act="silu")
    assert got.shape == (2, 3, 20)
    torch.testing.assert_close(got, act_mul(F.linear(x, w).reshape(6, 40), act="silu").view(2, 3, 20))
    with pytest.raises(ValueError, match=r"\[2 \* I, K\]"):
        gate_up_act(x, torch.randn(41, 24), act="silu")
    with pytest.raises(ValueError, match="act must be"):
        gate_up_act(x, w, act="relu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("act,rows", [("silu", 8), ("gelu_tanh", 3), ("silu", 16)])
def test_gate_up_kernel_at_llama_8b_shapes_matches_the_unfused_ops(act, rows):
    """bf16, Llama-3.1-8B's gate|up (2 x 14336 x 4096): the dispatch picks the fused kernel, and it
    agrees with cuBLAS's projection then act_mul to bf16 rounding (each half rounded once in both)."""
    from hisa.ops.act_mul import act_mul
    from hisa.ops.linear import gate_up_act

    torch.manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2 * 14336, 4096, device="cuda") * 4096 ** -0.5).to(torch.bfloat16)
    got = gate_up_act(x, w, act=act)
    want = act_mul(F.linear(x, w), act=act)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert (got == want).float().mean() > 0.9


def _norm_f32(x, weight, eps):
    """RMSNorm in fp32 (the definition, no rounding in between)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _prepared(m, k, n, dtype, seed, *, block_n=16, block_k=32):
    """A sublayer's end through the kernel: NormedRows prepared by linear_add_norm (a residual stream
    scaled far from 1, as a real one is), with its inputs."""
    from hisa.ops.linear import linear_add_norm

    torch.manual_seed(seed)
    a = torch.randn(m, n, device=DEV).to(dtype)
    w = (torch.randn(k, n, device=DEV) * n ** -0.5).to(dtype)
    res = (torch.randn(m, k, device=DEV) * 7).to(dtype)
    nw = (1 + 0.5 * torch.randn(k, device=DEV)).to(dtype)
    return linear_add_norm(a, w, None, res, nw, 1e-5, use_triton=True), (a, w, res, nw)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,block_n,block_k", [(1, 40, 64, 16, 32), (5, 33, 100, 16, 32), (16, 64, 48, 32, 16)])
def test_kernel_adds_the_residual_prepares_the_norm_and_the_next_projection_applies_it(dtype, m, n, k, block_n,
                                                                                       block_k):
    """linear_add_norm: r = the product rounded + the residual, rounded (the unfused ops, exactly),
    scaled = r * the norm weight rounded, partial sums of r^2; then linear on the NormedRows (with a
    bias) against the fp32 norm of r and projection. Masked tails in N and K, several K blocks."""
    normed, (a, w1, res, nw) = _prepared(m, k, 24, dtype, m * 1000 + n + k)
    r = normed.x
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # fp16: one rounding of the product, one of the sum
    torch.testing.assert_close(r.float(), F.linear(a.float(), w1.float()).to(dtype).float() + res.float(),
                               rtol=tol, atol=tol)
    assert torch.equal(normed.scaled, (r.float() * nw.float()).to(dtype))
    assert normed.sumsq.shape == (-(-k // 16), 16) and torch.all(normed.sumsq[:, m:] == 0)
    torch.testing.assert_close(normed.sumsq.sum(0)[:m], r.float().pow(2).sum(1), rtol=1e-5, atol=1e-5)
    w = (torch.randn(n, k, device=DEV) * k ** -0.5).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype)
    got = linear(normed, w, b, use_triton=True, block_n=block_n, block_k=block_k, num_stages=2)
    want = F.linear(_norm_f32(r, nw, normed.eps), w.float()) + b.float()
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)  # fp16: r * weight rounded before the dot


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_up_kernel_applies_a_prepared_norm(dtype):
    from hisa.ops.act_mul import act_mul_ref
    from hisa.ops.linear import gate_up_act

    normed, (_, _, _, nw) = _prepared(5, 100, 24, dtype, 3)
    w = (torch.randn(2 * 33, 100, device=DEV) * 2 * 100 ** -0.5).to(dtype)
    got = gate_up_act(normed, w, act="silu", use_triton=True, block_n=16, block_k=32, num_stages=2)
    want = act_mul_ref(F.linear(_norm_f32(normed.x, nw, normed.eps), w.float()), act="silu")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_off_the_kernel_the_add_is_torch_s_and_the_norm_the_norm_kernel_s():
    """Where the kernel does not run (the CPU), linear_add_norm is F.linear + the add, bit for bit, and
    leaves the norm unprepared: a projection materializes it with rms_norm. A residual of the wrong
    shape is refused."""
    from hisa.ops.linear import gate_up_act, linear_add_norm
    from hisa.ops.rms_norm import rms_norm

    a, w1 = torch.randn(4, 24, dtype=torch.bfloat16), torch.randn(32, 24, dtype=torch.bfloat16)
    res, nw = torch.randn(4, 32, dtype=torch.bfloat16), torch.rand(32, dtype=torch.bfloat16) + 0.5
    normed = linear_add_norm(a, w1, None, res, nw, 1e-5)
    assert normed.scaled is None and torch.equal(normed.x, F.linear(a, w1) + res)
    want = rms_norm(normed.x, nw, eps=1e-5)[0]
    assert torch.equal(normed.materialize(), want)
    w = torch.randn(40, 32, dtype=torch.bfloat16)
    assert torch.equal(linear(normed, w), F.linear(want, w))
    assert torch.equal(gate_up_act(normed, w, act="silu"), gate_up_act(want, w, act="silu"))
    with pytest.raises(ValueError, match="residual must have shape"):
        linear_add_norm(a, w1, None, res[:, :31], nw, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_llama_8b_layer_with_fused_norms_matches_the_unfused_layer(monkeypatch):
    """One decoder layer at Llama-3.1-8B's shapes, bf16, 8 rows, two steps (the second takes what the
    first returned): with the residual adds in the o and down kernels and the norms prepared there and
    applied by the qkv and gate|up kernels, no norm kernel runs, and the stream agrees with the
    unfused layer (norm kernels and F.linear) to bf16 rounding."""
    from hisa.models.config import ModelConfig
    from hisa.models.llama import DecoderLayer
    from hisa.models.rope import RotaryEmbedding, rope_inv_freq
    from hisa.ops.rms_norm import NormedRows

    cfg = ModelConfig(arch="llama", vocab_size=128, hidden_size=4096, intermediate_size=14336,
                      num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5) if p.ndim == 2 else 1 + 0.1 * torch.randn_like(p))
    rope = RotaryEmbedding(rope_inv_freq(128, 500000.0, None, None)).cuda()
    cos_sin = rope.lookup(torch.arange(8, device="cuda"), 8)

    class OwnToken:  # each token attends to itself alone: the output is its v, per query head
        def forward(self, layer_idx, q, k, v):
            return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)

    def two_steps():
        g = torch.Generator("cuda").manual_seed(1)
        x, res = torch.randn(8, 4096, device="cuda", generator=g).to(torch.bfloat16), None
        for _ in range(2):
            x, res = layer(x, res, cos_sin, OwnToken(), layer.input_layernorm)
        return x.x if isinstance(x, NormedRows) else x + res  # the stream

    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fused = two_steps()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("rms_norm" in n for n in names) == 1  # the first layer's input (embeddings): nothing prepared it
    monkeypatch.setattr(linear_mod, "NORM_ENABLED", False)
    monkeypatch.setattr(linear_mod, "ENABLED", False)  # F.linear, separate adds and norm kernels
    with torch.no_grad():
        unfused = two_steps()
    err = (fused.float() - unfused.float()).norm() / unfused.float().norm()
    assert err < 1e-2, err  # bf16 rounding at different places (1 ulp = 2^-8 relative), over two layers


def _cos_sin(m, d, seed):
    """The models' cos/sin table (`RotaryEmbedding.lookup`) at m random positions: fp32 [m, 2, d // 2]."""
    from hisa.models.rope import RotaryEmbedding, rope_inv_freq

    g = torch.Generator().manual_seed(seed)
    return RotaryEmbedding(rope_inv_freq(d, 10000.0, None)).lookup(torch.randint(0, 4096, (m,), generator=g)).to(DEV)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,h,kvh,d,k,bias,prepared", [(3, 4, 2, 32, 48, False, False), (1, 2, 1, 16, 40, True, False),
                                                       (16, 2, 2, 32, 64, False, False), (5, 4, 2, 32, 0, False, True)])
def test_qkv_rope_kernel_equals_the_projection_then_qkv_rope(dtype, m, h, kvh, d, k, bias, prepared):
    """The fused q|k|v projection + RoPE gives the unfused kernels' q, k, v (the same products, rounded
    once, rotated from the rounded values; within one rounding: the interpreter's tile products are
    numpy matmuls, whose sums depend on a row's place in the tile): heads of q, k and v, 1 to 16 rows,
    a bias, and rows normed by a prepared norm (NORM_IN)."""
    from hisa.ops.linear import linear_qkv_rope
    from hisa.ops.qkv_rope import qkv_rope

    torch.manual_seed(m + h + d)
    n = (h + 2 * kvh) * d
    if prepared:
        x, _ = _prepared(m, 48, 40, dtype, seed=m)
        k = 48
    else:
        x = torch.randn(m, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) * k ** -0.5).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype) if bias else None
    cs = _cos_sin(m, d, seed=m + d)
    shape = dict(num_heads=h, num_kv_heads=kvh, head_dim=d)
    want = qkv_rope(linear(x, w, b, use_triton=True), cs, use_triton=True, **shape)
    got = linear_qkv_rope(x, w, b, cs, use_triton=True, **shape)
    # one rounding of a projection value, through the rotation's cancellation: an absolute error of
    # about one unit of the inputs' last place (a mixed-up pair or head would be off by O(1))
    tol = dict(rtol=1e-3, atol=2e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    for g, wt, name in zip(got, want, "qkv"):
        assert g.shape == wt.shape and g.is_contiguous(), name
        torch.testing.assert_close(g, wt, **tol, msg=lambda e, name=name: f"{name}: {e}")


def test_qkv_rope_off_the_kernel_is_the_projection_then_qkv_rope():
    """Where the kernel does not run (here: the CPU without use_triton), the unfused ops, and shapes
    the kernel cannot tile are refused when it is forced."""
    from hisa.ops.linear import linear_qkv_rope
    from hisa.ops.qkv_rope import qkv_rope

    x = torch.randn(3, 24)
    w = torch.randn(4 * 16, 24)
    cs = _cos_sin(3, 16, seed=1).cpu()
    shape = dict(num_heads=2, num_kv_heads=1, head_dim=16)
    for g, wt in zip(linear_qkv_rope(x, w, None, cs, **shape), qkv_rope(F.linear(x, w), cs, **shape)):
        assert torch.equal(g, wt)
    with pytest.raises(ValueError, match="D / 2 a multiple of 8"):
        linear_qkv_rope(x, torch.randn(4 * 12, 24), None, _cos_sin(3, 12, seed=1).cpu(), num_heads=2,
                        num_kv_heads=1, head_dim=12, use_triton=True)


_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hisa.ops import triton_linear

kernel, norm_in, add_norm = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
rope = kernel == "linear_rope"
consts = dict(K=4096, BLOCK_M=16, STAGES=4, DOT_PRECISION="tf32", PDL=False, NORM_IN=norm_in,
              BLOCK_P=256 if norm_in else 1)
sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "stride_xm": "i32", "stride_wn": "i32",
       "stride_ym": "i32", "ss_ptr": "*fp32", "P": "i32", "eps": "fp32"}
if kernel in ("linear", "linear_rope"):
    fn = triton_linear.skinny_linear_kernel
    consts.update(HAS_BIAS=False, BLOCK_N=16, BLOCK_K=256, ADD_NORM=add_norm)
    sig.update({"b_ptr": "*bf16", "N": "i32", "res_ptr": "*bf16", "nw_ptr": "*bf16", "xs_ptr": "*bf16",
                "ss_out_ptr": "*fp32", "stride_rm": "i32", "stride_xsm": "i32"})
    if rope:
        consts.update(NH=32, NKV=8, HALF=64, ROPE=True)
        sig.update({"cs_ptr": "*fp32", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "stride_cs": "i32"})
else:
    fn = triton_linear.skinny_gate_up_kernel
    consts.update(ACT=0, BLOCK_N=64, BLOCK_K=64)
    sig["I"] = "i32"
sig.update({name: "constexpr" for name in consts})
compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4 if kernel == "gate_up" else 2})
assert compiled.asm["cubin"]
"""


@pytest.mark.parametrize("kernel,norm_in,add_norm", [("linear", False, False), ("linear", True, False),
                                                     ("linear", False, True), ("linear_rope", True, False),
                                                     ("gate_up", False, False), ("gate_up", True, False)])
def test_kernels_compile_for_hopper(kernel, norm_in, add_norm):
    """Each variant through Triton's compiler for sm_90 (to PTX and a cubin; no GPU needed, in a
    process without TRITON_INTERPRET): the interpreter the other tests use on a CPU accepts code the
    compiler refuses (two returns under a constexpr `if` once reached a GPU that way)."""
    compile_for_hopper(_COMPILE, kernel, str(int(norm_in)), str(int(add_norm)))
