"""Does a decoder layer's chain of projections get faster as one persistent kernel? (GPU probe)

Each decode projection carries a fixed ~4 µs over its weight bytes, whatever way it reads the
weight (`linear_variants_gpu.py`): the ramp and the tail of a kernel. This times the chain of a
Llama-3.1-8B MLP sublayer at 8 rows, o (4096 x 4096) -> gate|up (28672 x 4096) -> down (4096 x
14336, reading the first 14336 columns of gate|up's output), side by side in one process, every
call on its own layer's weights inside one CUDA graph:

  * `hisa`: three launches of hisa's kernel (`hisa.ops.linear.linear`, its default tiling);
  * `three`: three launches of this file's per-phase loop (one program per 16 weight rows);
  * `chain`: one launch of as many programs as there are SMs (x `--per-sm`), each walking its row
    blocks of o, then gate|up, then down, with a grid-wide barrier (an atomic counter) between the
    phases; `chain+pre` also loads its first weight tile of the next phase *before* the barrier
    (weights do not depend on the activations), so its stream restarts with no ramp.

Plain projections (no norm, activation or residual: what is timed is the weight streams and the
boundaries between them). Every variant is checked against torch first. Prints a table, writes JSON
(command, device, date, git commit, figures) and a plot beside it.

    python bench/linear_chain_gpu.py --out bench/results/linear_chain_gpu_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from _common import REPO, bar_pair_plot, header, write_json
from decode_speed_gpu import hbm_bandwidth
from paged_decode_gpu import time_graph_ms

sys.path.insert(0, str(REPO / "src"))

from hisa.ops.linear import linear  # noqa: E402

LAYERS = 32
O, GU, DOWN_K, H = 4096, 28672, 14336, 4096


@triton.jit
def _block(x_ptr, w_ptr, y_ptr, b, M, N, K: tl.constexpr, stride_x, stride_w, stride_y, w_first, HAS_FIRST: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """y[:, block b] = x @ w[block b]^T; w_first: the block's first weight tile, loaded already (HAS_FIRST)."""
    n = b * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if HAS_FIRST:
        x0 = tl.load(x_ptr + m[:, None] * stride_x + k[None, :], mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
        acc = tl.dot(w_first, tl.trans(x0), acc=acc)
        k_first: tl.constexpr = BLOCK_K
    else:
        k_first: tl.constexpr = 0
    for k0 in tl.range(k_first, K, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_rows + (k0 + k)[None, :], mask=n_ok[:, None], other=0.0)
        x = tl.load(x_ptr + m[:, None] * stride_x + (k0 + k)[None, :], mask=m_ok[:, None], other=0.0,
                    cache_modifier=".cg")
        acc = tl.dot(w, tl.trans(x), acc=acc)
    tl.store(y_ptr + m[None, :] * stride_y + n[:, None], acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def phase_kernel(x_ptr, w_ptr, y_ptr, M, N, K: tl.constexpr, stride_x, stride_w, stride_y, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    _block(x_ptr, w_ptr, y_ptr, tl.program_id(0), M, N, K, stride_x, stride_w, stride_y, None, False,
           BLOCK_M, BLOCK_N, BLOCK_K, STAGES)


@triton.jit
def _first_tile(w_ptr, b, N, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = b * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_w + tl.arange(0, BLOCK_K)[None, :],
                   mask=(n < N)[:, None], other=0.0)


@triton.jit
def _phase(x_ptr, w_ptr, y_ptr, M, N, K: tl.constexpr, stride_x, stride_w, stride_y, w_first, HAS_FIRST: tl.constexpr,
           P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK_N)
    _block(x_ptr, w_ptr, y_ptr, pid, M, N, K, stride_x, stride_w, stride_y, w_first, HAS_FIRST,
           BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    for b in range(pid + P, blocks, P):
        _block(x_ptr, w_ptr, y_ptr, b, M, N, K, stride_x, stride_w, stride_y, None, False,
               BLOCK_M, BLOCK_N, BLOCK_K, STAGES)


@triton.jit
def _barrier(cnt_ptr, target):
    seen = tl.atomic_add(cnt_ptr, 1, sem="release") + 1
    while seen < target:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")


@triton.jit
def chain_kernel(x_ptr, w1_ptr, w2_ptr, w3_ptr, y1_ptr, y2_ptr, y3_ptr, cnt_ptr, M,
                 N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr, K1: tl.constexpr, K3: tl.constexpr,
                 P: tl.constexpr, PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    _phase(x_ptr, w1_ptr, y1_ptr, M, N1, K1, K1, K1, N1, None, False, P, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    if PRE:
        w2_first = _first_tile(w2_ptr, pid, N2, N1, BLOCK_N, BLOCK_K)
    else:
        w2_first = None
    _barrier(cnt_ptr, P)
    _phase(y1_ptr, w2_ptr, y2_ptr, M, N2, N1, N1, N1, N2, w2_first, PRE, P, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    if PRE:
        w3_first = _first_tile(w3_ptr, pid, N3, K3, BLOCK_N, BLOCK_K)
    else:
        w3_first = None
    _barrier(cnt_ptr, 2 * P)
    _phase(y2_ptr, w3_ptr, y3_ptr, M, N3, K3, N2, K3, N3, w3_first, PRE, P, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    # the last program through resets the counter for the next launch (everyone has passed both barriers)
    if tl.atomic_add(cnt_ptr + 1, 1, sem="acq_rel") == P - 1:
        tl.atomic_xchg(cnt_ptr, 0, sem="release")
        tl.atomic_xchg(cnt_ptr + 1, 0, sem="release")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--per-sm", default="1,2")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/linear_chain_gpu.json")
    ap.add_argument("--git-commit", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    head = header(dev, args.git_commit)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = hbm_bandwidth(dev)
    m, bf = args.rows, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w1 = [torch.randn(O, H, device=dev, dtype=bf, generator=g) * 0.02 for _ in range(LAYERS)]
    w2 = [torch.randn(GU, O, device=dev, dtype=bf, generator=g) * 0.02 for _ in range(LAYERS)]
    w3 = [torch.randn(H, DOWN_K, device=dev, dtype=bf, generator=g) * 0.02 for _ in range(LAYERS)]
    xs = [torch.randn(m, H, device=dev, dtype=bf, generator=g) for _ in range(LAYERS)]
    y1 = [torch.empty(m, O, device=dev, dtype=bf) for _ in range(LAYERS)]
    y2 = [torch.empty(m, GU, device=dev, dtype=bf) for _ in range(LAYERS)]
    y3 = [torch.empty(m, H, device=dev, dtype=bf) for _ in range(LAYERS)]
    cnt = [torch.zeros(2, device=dev, dtype=torch.int32) for _ in range(LAYERS)]
    bytes_per_chain = 2 * (O * H + GU * O + H * DOWN_K)
    bound_us = bytes_per_chain / bw * 1e6

    def want(i):
        a = F.linear(xs[i].float(), w1[i].float()).to(bf)
        b = F.linear(a.float(), w2[i].float()).to(bf)
        return F.linear(b[:, :DOWN_K].float(), w3[i].float())

    def hisa(i):
        a = linear(xs[i], w1[i])
        b = linear(a, w2[i])
        return linear(b[:, :DOWN_K].contiguous(), w3[i])

    tiling = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, STAGES=4, num_warps=2)

    def three(i):
        phase_kernel[(triton.cdiv(O, 16),)](xs[i], w1[i], y1[i], m, O, H, H, H, O, **tiling)
        phase_kernel[(triton.cdiv(GU, 16),)](y1[i], w2[i], y2[i], m, GU, O, O, O, GU, **tiling)
        phase_kernel[(triton.cdiv(H, 16),)](y2[i], w3[i], y3[i], m, H, DOWN_K, GU, DOWN_K, H, **tiling)
        return y3[i]

    def chain(i, per_sm, pre):
        p = sms * per_sm
        chain_kernel[(p,)](xs[i], w1[i], w2[i], w3[i], y1[i], y2[i], y3[i], cnt[i], m, N1=O, N2=GU, N3=H, K1=H,
                           K3=DOWN_K, P=p, PRE=pre, **tiling)
        return y3[i]

    variants = [("hisa (3 launches)", hisa), ("three launches", three)]
    for per in (int(x) for x in args.per_sm.split(",") if x):
        variants += [(f"chain, {per}/SM", lambda i, per=per: chain(i, per, False)),
                     (f"chain+pre, {per}/SM", lambda i, per=per: chain(i, per, True))]
    rows = []
    ref = want(0)
    for name, fn in variants:
        out = fn(0).float()
        torch.cuda.synchronize()
        err = (out - ref).abs().max().item()
        ok = err <= 0.02 * ref.abs().max().item() + 1e-2
        us = time_graph_ms([lambda i=i: fn(i) for i in range(LAYERS)], reps=args.reps) * 1e3 if ok else float("nan")
        rows.append(dict(variant=name, us=us, ok=ok, max_err=err, x_bound=us / bound_us))
        print(f"{name:22s} {us:8.2f} us per chain  {us / bound_us:5.2f}x bound ({bound_us:.1f} us)  err {err:.3g}"
              f"{'' if ok else '  WRONG'}", flush=True)
    write_json(args.out, dict(**head, rows_per_call=m, hbm_copy_bytes_per_s=bw, chain_bytes=bytes_per_chain,
                              bound_us=bound_us, rows=rows))
    base = rows[0]["us"]
    bar_pair_plot(args.out.with_suffix(".png"), [r["variant"] for r in rows], [base] * len(rows), [r["us"] for r in rows],
                  before_label="hisa (3 launches)", after_label="variant", ylabel="µs per o -> gate|up -> down",
                  title=f"MLP sublayer projections, {m} rows, bf16, one CUDA graph of 32 layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
