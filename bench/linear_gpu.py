"""Decode-batch projections on a GPU: cuBLAS (F.linear) vs hisa's Triton kernel (`hisa.ops.linear`).

The Llama-3.1-8B shapes (q|k|v 6144 x 4096, o 4096 x 4096, gate|up 28672 x 4096, down 4096 x 14336,
lm_head 128256 x 4096; bf16) at 1, 4, 8 and 16 rows. Each case captures one CUDA graph that runs
the projection once per layer on its own layer's weight (32 weights, ~1.6 GB for q|k|v: nothing is
served from L2, as in a real step; 4 for the lm_head) and reports the GPU time per call (median of
--reps replays), the weight bytes per second it reaches, and the ratio to cuBLAS. Every Triton
setting is first checked against F.linear (fp32 accumulation both: within bf16 rounding). Prints a
table, writes JSON (command, device, date, git commit, figures; the fastest setting per shape) and
a plot beside it.

    python bench/linear_gpu.py --out bench/results/linear_gpu_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import REPO, bar_pair_plot, header, write_json
from paged_decode_gpu import time_graph_ms

sys.path.insert(0, str(REPO / "src"))

from hisa.ops.act_mul import act_mul  # noqa: E402
from hisa.ops.linear import gate_up_act, linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096), "gate_up_act": (28672, 4096)}
# gate_up_act: hisa.ops.linear.gate_up_act (the projection and act(gate) * up in one kernel) against
# the unfused pair (hisa.ops.linear's default tiling, then act_mul) as the baseline column
LAYERS = 32
SETTINGS = ((None, None, None, None), (16, 256, 4, 4), (16, 512, 3, 4), (16, 128, 6, 4), (32, 256, 4, 4),
            (32, 128, 5, 4), (64, 128, 4, 4),
            (32, 512, 3, 8), (64, 256, 3, 8), (16, 256, 4, 2), (16, 512, 4, 8))
# (block_n, block_k, num_stages, num_warps); the first (None) is hisa.ops.linear's choice for the shape
GATE_UP_SETTINGS = ((None, None, None, None), (16, 256, 4, 2), (16, 128, 4, 4), (32, 64, 6, 4), (32, 256, 3, 4),
                    (64, 64, 4, 4), (64, 128, 3, 8), (64, 64, 5, 8), (16, 256, 4, 4), (32, 128, 4, 8),
                    (128, 64, 3, 8))  # block_n: weight rows per program per half


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/linear_gpu.json")
    ap.add_argument("--git-commit", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    head = header(torch.device("cuda"), args.git_commit)
    rows_out, best = [], {}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = 4 if name == "lm_head" else LAYERS
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        nbytes = n * k * 2
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            fused = name == "gate_up_act"
            if fused:  # baseline: the unfused pair; the kernel under test: gate_up_act
                def ref(w): return act_mul(linear(x, w), act="silu")
                def op(w, **kw): return gate_up_act(x, w, act="silu", **kw)
            else:
                def ref(w): return F.linear(x, w)
                def op(w, **kw): return linear(x, w, **kw)
            want = ref(ws[0])
            base = time_graph_ms([lambda w=w: ref(w) for w in ws], reps=args.reps) * 1000
            case = dict(shape=name, n=n, k=k, rows=m, cublas_us=base, cublas_gb_s=nbytes / base / 1e3, settings=[])
            for bn, bk, st, wp in GATE_UP_SETTINGS if fused else SETTINGS:
                kw = dict(use_triton=True, block_n=bn, block_k=bk, num_stages=st, num_warps=wp)
                got = op(ws[0], **kw)
                ok = torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
                us = time_graph_ms([lambda w=w: op(w, **kw) for w in ws], reps=args.reps) * 1000
                case["settings"].append(dict(block_n=bn or "default", block_k=bk or "default",
                                             num_stages=st or "default", num_warps=wp or "default", us=us, ok=ok,
                                             gb_s=nbytes / us / 1e3, vs_cublas=base / us))
            good = [s for s in case["settings"] if s["ok"]]
            top = min(good, key=lambda s: s["us"]) if good else None
            dflt = case["settings"][0]
            print(f"{name:8s} M={m:2d}  cuBLAS {base:7.1f} µs {case['cublas_gb_s']:6.0f} GB/s | default "
                  f"{dflt['us']:7.1f} µs {dflt['gb_s']:6.0f} GB/s {dflt['vs_cublas']:.2f}x"
                  f"{'' if dflt['ok'] else ' MISMATCH'} | best {top['block_n']}/{top['block_k']}/"
                  f"{top['num_stages']}/{top['num_warps']} {top['us']:7.1f} µs {top['vs_cublas']:.2f}x", flush=True)
            if top:
                best[f"{name} M={m}"] = dict(top, cublas_us=base)
            rows_out.append(case)
            write_json(args.out, dict(**head, rows=rows_out, partial=True))
        del ws
        torch.cuda.empty_cache()
    write_json(args.out, dict(**head, rows=rows_out, best=best))
    try:
        bar_pair_plot(args.out.with_suffix(".png"), [f"{r['shape']} M={r['rows']}" for r in rows_out],
                      [r["cublas_gb_s"] for r in rows_out], [r["settings"][0]["gb_s"] for r in rows_out],
                      before_label="cuBLAS (F.linear)", after_label="hisa Triton (default tiling)",
                      ylabel="weight GB/s", title="decode-batch projections, Llama-3.1-8B shapes")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
