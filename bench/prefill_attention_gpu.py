"""Prefill attention on CUDA: the flash kernel reading grouped K/V in place vs expanding them first.

The CUDA path used to expand K/V to every query head (`repeat_interleave`) before calling SDPA, a
copy of the whole context's K/V per layer: in a 64-token prefill after a 16K cached prefix (the
prefix cache's case) that copy was 11 of the step's 20 ms of kernels (l3_prefix_gpu_h200_profile.json).
This times both paths at Llama-3.1-8B's heads (32 query, 8 KV, 128 dims, bf16) for a few
(chunk, context) shapes and checks that they agree. Writes JSON and prints a table.

    python bench/prefill_attention_gpu.py --out bench/results/prefill_attention_gpu_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, bar_pair_plot, header, write_json  # noqa: E402

import hisa.attention.prefill as prefill  # noqa: E402


def time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64x16384,64x131072,8192x8192,8192x16384,2048x32768",
                    help="chunk x context, comma-separated")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/prefill_attention_gpu.json")
    a = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    print(f"{'chunk':>6s} {'context':>8s} {'expand ms':>10s} {'grouped ms':>11s} {'speedup':>8s} {'max diff':>9s}")
    for shape in a.shapes.split(","):
        n, ctx = (int(x) for x in shape.split("x"))
        q = torch.randn(n, a.heads, a.head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(ctx, a.kv_heads, a.head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(ctx, a.kv_heads, a.head_dim, device=dev, dtype=torch.bfloat16, generator=gen)
        scale = a.head_dim ** -0.5
        out = {}
        for name, native in (("expand", False), ("grouped", True)):
            prefill.NATIVE_GQA = native
            out[name] = prefill.prefill_attention(q, k, v, scale=scale).float()
            out[name + "_ms"] = time_ms(lambda: prefill.prefill_attention(q, k, v, scale=scale), a.reps)
        prefill.NATIVE_GQA = True
        diff = (out["expand"] - out["grouped"]).abs().max().item()
        r = dict(chunk=n, context=ctx, expand_ms=out["expand_ms"], grouped_ms=out["grouped_ms"],
                 speedup=out["expand_ms"] / out["grouped_ms"], max_abs_diff=diff,
                 kv_bytes=2 * ctx * a.kv_heads * a.head_dim * 2)
        r["grouped_kv_tb_s"] = r["kv_bytes"] / (r["grouped_ms"] * 1e-3) / 1e12
        rows.append(r)
        print(f"{n:6d} {ctx:8d} {r['expand_ms']:10.3f} {r['grouped_ms']:11.3f} {r['speedup']:7.2f}x {diff:9.2e}",
              flush=True)
        torch.cuda.empty_cache()
    write_json(a.out, dict(**header(dev, a.git_commit), heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                           dtype="bfloat16", reps=a.reps, rows=rows))
    plot(rows, a.out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    bar_pair_plot(path, [f"{r['chunk']} x {r['context']}" for r in rows], [r["expand_ms"] for r in rows],
                  [r["grouped_ms"] for r in rows], before_label="expand K/V (repeat_interleave)",
                  after_label="grouped K/V read in place", ylabel="ms per call (one layer)",
                  xlabel="chunk x context (tokens)", title="Prefill attention, 32 query / 8 KV heads, bf16", log=True)


if __name__ == "__main__":
    sys.exit(main())
