"""Decode-batch projections on a GPU: hisa's kernel against two other ways to stream the weight.

A sparse decode step at 32K x 8 (Llama-3.1-8B shape) spends ~4 µs per small projection over what
its weight bytes take at the HBM rate (q|k|v 15-17 µs for 11.8, o 11.5 for 7.9), and reading the
o weight from L2 barely helped (10.6 µs; docs/architecture.md, "2026-12-02"): the kernel, not HBM,
is the limit there. This measures, at the Llama-3.1-8B shapes and a few rows, side by side in one
process, every call on its own layer's weight inside one CUDA graph (as `linear_gpu.py` does):

  * `hisa`: `hisa.ops.linear.linear` (skinny_linear_kernel, its default tiling);
  * `tma`: the same one-program-per-rows-block kernel, its weight tiles read by the Hopper tensor
    memory accelerator (a host-side TensorDescriptor) instead of per-thread loads;
  * `persistent`: one program per SM, each walking its blocks of rows with the loop over K
    flattened into one software-pipelined loop (the next block's first tiles load while the last
    one's products finish), pointer loads or TMA.

Every variant is first checked against F.linear. Prints a table, writes JSON (command, device,
date, git commit, figures) and a plot beside it. Needs an sm90+ GPU for the TMA variants.

    python bench/linear_variants_gpu.py --out bench/results/linear_variants_gpu_h200.json
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

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}
LAYERS = 32


@triton.jit
def _tile(x_ptr, w_ptr, w_desc, n0, k0, m, m_ok, n, n_ok, k, stride_xm, stride_wn, TMA: tl.constexpr):
    if TMA:
        w = w_desc.load([n0, k0])
    else:
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_wn + (k0 + k)[None, :], mask=n_ok[:, None], other=0.0)
    x = tl.load(x_ptr + m[:, None] * stride_xm + (k0 + k)[None, :], mask=m_ok[:, None], other=0.0)
    return w, x


@triton.jit
def blocks_kernel(x_ptr, w_ptr, w_desc, y_ptr, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                  TMA: tl.constexpr):
    """One program per BLOCK_N weight rows (skinny_linear_kernel's plan), K a multiple of BLOCK_K."""
    n0 = tl.program_id(0) * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w, x = _tile(x_ptr, w_ptr, w_desc, n0, k0, m, m_ok, n, n_ok, k, stride_xm, stride_wn, TMA)
        acc = tl.dot(w, tl.trans(x), acc=acc)
    tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def persistent_kernel(x_ptr, w_ptr, w_desc, y_ptr, M, N, stride_xm, stride_wn, stride_ym, K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                      TMA: tl.constexpr, PROGRAMS: tl.constexpr):
    """PROGRAMS programs; program p owns row blocks p, p + PROGRAMS, ...; one flattened loop over
    (its blocks x K tiles), software-pipelined across block boundaries."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK_N)
    K_TILES: tl.constexpr = K // BLOCK_K
    mine = (blocks - pid + PROGRAMS - 1) // PROGRAMS
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for it in tl.range(0, mine * K_TILES, num_stages=STAGES):
        b = pid + (it // K_TILES) * PROGRAMS
        ki = it % K_TILES
        n0 = b * BLOCK_N
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w, x = _tile(x_ptr, w_ptr, w_desc, n0, ki * BLOCK_K, m, m_ok, n, n_ok, k, stride_xm, stride_wn, TMA)
        acc = tl.dot(w, tl.trans(x), acc=acc)
        if ki == K_TILES - 1:
            tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & m_ok[None, :])
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)


def launch(kind: str, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *, block_n: int, block_k: int,
           stages: int, warps: int, tma: bool, programs: int = 0):
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, k = w.shape
    desc = TensorDescriptor.from_tensor(w, [block_n, block_k]) if tma else None
    args = (x, w, desc, y, x.shape[0], n, x.stride(0), w.stride(0), y.stride(0))
    common = dict(K=k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, TMA=tma, num_warps=warps)

    if kind == "blocks":
        grid = (triton.cdiv(n, block_n),)
        return lambda: blocks_kernel[grid](*args, **common)
    progs = min(programs, triton.cdiv(n, block_n))
    return lambda: persistent_kernel[(progs,)](*args, PROGRAMS=progs, **common)


def variants(sms: int):
    """(label, kind, block_n, block_k, stages, warps, tma, programs)."""
    out = []
    for tma in (False, True):
        t = "tma" if tma else "ptr"
        for bn, bk, st, wp in ((16, 256, 4, 2), (16, 256, 4, 4), (32, 256, 4, 4), (16, 128, 6, 2), (32, 128, 6, 4),
                               (64, 128, 4, 4)):
            out.append((f"blocks/{t} {bn}x{bk} s{st} w{wp}", "blocks", bn, bk, st, wp, tma, 0))
        for bn, bk, st, wp, per in ((16, 256, 4, 2, 2), (16, 256, 4, 4, 1), (16, 256, 6, 4, 2), (32, 256, 4, 4, 1),
                                    (16, 128, 8, 4, 2), (32, 128, 6, 4, 2)):
            out.append((f"persistent/{t} {bn}x{bk} s{st} w{wp} x{per}", "persistent", bn, bk, st, wp, tma, sms * per))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8")
    ap.add_argument("--shapes", default="qkv,o,down,gate_up")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/linear_variants_gpu.json")
    ap.add_argument("--git-commit", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    head = header(dev, args.git_commit)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copy_bw = hbm_bandwidth(dev)
    rows_out = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        for m in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
            ys = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
            want = [F.linear(x.float(), w.float()) for x, w in zip(xs[:1], ws[:1])][0]
            bound_us = n * k * 2 / copy_bw * 1e6
            base = time_graph_ms([lambda x=x, w=w: linear(x, w) for x, w in zip(xs, ws)], reps=args.reps) * 1e3
            rows_out.append(dict(shape=name, rows=m, variant="hisa (default)", us=base, ok=True,
                                 gb_s=n * k * 2 / base / 1e3, x_bound=base / bound_us))
            print(f"{name:8s} m={m:2d} {'hisa (default)':40s} {base:7.2f} us  {n * k * 2 / base / 1e3:7.0f} GB/s  "
                  f"{base / bound_us:5.2f}x bound")
            for label, kind, bn, bk, st, wp, tma, progs in variants(sms):
                try:
                    fns = [launch(kind, x, w, y, block_n=bn, block_k=bk, stages=st, warps=wp, tma=tma, programs=progs)
                           for x, w, y in zip(xs, ws, ys)]
                    fns[0]()
                    torch.cuda.synchronize()
                    err = (ys[0].float() - want).abs().max().item()
                    ok = err <= 0.02 * want.abs().max().item() + 1e-2
                    us = time_graph_ms(fns, reps=args.reps) * 1e3 if ok else float("nan")
                except Exception as e:  # noqa: BLE001 (a setting the compiler or TMA rejects: reported, skipped)
                    print(f"{name:8s} m={m:2d} {label:40s} failed: {type(e).__name__}: {str(e)[:120]}")
                    rows_out.append(dict(shape=name, rows=m, variant=label, us=None, ok=False, error=str(e)[:300]))
                    continue
                rows_out.append(dict(shape=name, rows=m, variant=label, us=us, ok=ok, max_err=err,
                                     gb_s=n * k * 2 / us / 1e3, x_bound=us / bound_us, vs_hisa=base / us))
                print(f"{name:8s} m={m:2d} {label:40s} {us:7.2f} us  {n * k * 2 / us / 1e3:7.0f} GB/s  "
                      f"{us / bound_us:5.2f}x bound  {base / us:5.2f}x hisa{'' if ok else '  WRONG'}")
        del ws
        torch.cuda.empty_cache()
    best = {}
    for r in rows_out:
        if r.get("us") and r["ok"]:
            key = f"{r['shape']} m={r['rows']}"
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = dict(variant=r["variant"], us=r["us"])
    out = dict(**head, hbm_copy_bytes_per_s=copy_bw, rows=rows_out, best=best)
    write_json(args.out, out)
    labels = sorted(best)
    hisa = {f"{r['shape']} m={r['rows']}": r["us"] for r in rows_out if r["variant"] == "hisa (default)"}
    bar_pair_plot(args.out.with_suffix(".png"), labels, [hisa[k] for k in labels], [best[k]["us"] for k in labels],
                  before_label="hisa default", after_label="best variant", ylabel="µs per call",
                  title="decode projections, bf16, one CUDA graph of 32 layers")
    for key, b in best.items():
        print(f"best {key}: {b['variant']} {b['us']:.2f} us (hisa {hisa[key]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
