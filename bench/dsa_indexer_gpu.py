"""DSA's decode indexer per layer on a GPU: torch vs the fused Triton score kernel, at DeepSeek-V3.2's shape.

The indexer of one layer for a decode batch (64 heads x 128, bf16 keys and queries, fp32 weights,
page size 1 as the DSA preset, pages shuffled, every row `ctx` tokens, top-2048) at 32K x 64 rows
and 128K x 16 rows (the same 512 MiB of keys). Per shape it times, in µs per layer call:

  * `torch`: `indexer_topk(use_triton=False)`, the path decode ran before the kernel (every key
    gathered, fp32 products [rows, 64, ctx], ReLU, weighted sum, torch.topk; blocks of rows);
  * `scores`: `indexer_scores`, the fused kernel alone, per (block_t, tiles, num_warps) setting;
  * `topk`: torch.topk(2048) of the fp32 scores alone;
  * `kernel+topk`: `indexer_topk` on CUDA as the engine calls it (default setting, then torch.topk).

GB/s = key bytes read (rows x ctx x 128 x 2) / time. Each item is a CUDA graph that calls it once
per layer over `--layers` layers of keys (each layer's 512 MiB far exceeds L2), replayed `--reps`
times (median). Every kernel setting is checked against the torch reference's scores (fp32
summation order: 1e-5 of the row's largest) and its top-k against the reference's ranking (each
picked token at least the k-th best score); a mismatch is printed and recorded. Prints per item
as it goes, writes JSON (command, device, date, git commit, rows; partial until the end) after
every item and a plot beside it at the end. About a minute on an H200, compile included.

    python bench/dsa_indexer_gpu.py --git-commit $(git rev-parse HEAD) --out bench/results/dsa_indexer_gpu_h200.json
    python bench/dsa_indexer_gpu.py --smoke --out /tmp/dsa_indexer_smoke.json   # CPU, the interpreter: runs it
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import REPO, header, write_json
from paged_decode_gpu import time_graph_ms

sys.path.insert(0, str(REPO / "src"))

from hisa.attention.dsa_indexer import (BLOCK_T, FP8_TILING, NUM_WARPS, TILES, indexer_scores,  # noqa: E402
                                        indexer_scores_ref, indexer_topk)
from hisa.kvcache.mla_fp8 import pack_index_keys  # noqa: E402

IH, ID, TOPK = 64, 128, 2048
SHAPES = {"32K x 64": (32768, 64), "128K x 16": (131072, 16)}
SMOKE_SHAPES = {"300 x 3": (300, 3)}  # the interpreter on a CPU: checks the bench runs, times nothing useful
SETTINGS = ((BLOCK_T, TILES, NUM_WARPS), (64, 1, 4), (64, 8, 4), (128, 2, 8), (128, 1, 4), (32, 8, 4))
FP8_SETTINGS = (FP8_TILING, (64, 8, 4), (64, 16, 4), (64, 8, 8), (128, 4, 8), (128, 8, 8), (128, 4, 4), (128, 2, 8),
                (256, 2, 8))


def time_us(fns: list, *, reps: int, device: torch.device) -> float:
    """Median µs per fn: one CUDA graph calling every fn in turn on CUDA, wall clock elsewhere."""
    if device.type == "cuda":
        return time_graph_ms(fns, reps=reps) * 1000
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        samples.append((time.perf_counter() - t0) / len(fns) * 1e6)
    return statistics.median(samples)


def make_layers(ctx: int, rows: int, layers: int, *, page_size: int, dtype: torch.dtype, device: torch.device):
    """Per layer a cache [P, S, ID] of random keys; one shuffled page table [rows, W] for all layers,
    lengths (every row ctx tokens), queries [rows, IH, ID] and fp32 weights [rows, IH]."""
    gen = torch.Generator().manual_seed(0)
    W = -(-ctx // page_size)
    P = rows * W + 1
    caches = [torch.randn(P, page_size, ID, device=device).to(dtype) for _ in range(layers)]
    table = torch.randperm(P, generator=gen)[:rows * W].view(rows, W).to(torch.int32).to(device)
    lens = torch.full((rows,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(rows, IH, ID, device=device).to(dtype)
    w = torch.randn(rows, IH, device=device) * IH ** -0.5
    return caches, table, lens, q, w


def scores_ok(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> bool:
    """-inf where the reference has it (past ctx), elsewhere within rtol of the row's largest score."""
    tol = rtol * ref.nan_to_num(0, neginf=0).abs().amax(-1, keepdim=True)
    close = (torch.where(torch.isfinite(ref), got - ref, 0).abs() <= tol).all()
    return bool(torch.equal(torch.isinf(got), torch.isinf(ref)) and close)


def topk_ok(ids: torch.Tensor, ref: torch.Tensor, k: int, rtol: float = 1e-5) -> bool:
    """Every row picked k distinct tokens (then -1 padding), each scoring (reference) at least the k-th
    best minus rtol of the row's largest score: the top-k up to ties and fp32 summation order."""
    picked = ids[:, :k].long()
    kth = ref.topk(k, dim=-1).values[:, -1:]  # [rows, 1]
    tol = rtol * ref.nan_to_num(0, neginf=0).abs().amax(-1, keepdim=True)
    distinct = picked.sort(-1).values.diff(dim=-1).gt(0).all()
    padded = (ids[:, k:] == -1).all()
    return bool((picked >= 0).all() and distinct and padded and (ref.gather(1, picked) >= kth - tol).all())


def bench_shape(name: str, ctx: int, rows: int, args, device: torch.device, dtype: torch.dtype, emit) -> None:
    caches, table, lens, q, w = make_layers(ctx, rows, args.layers, page_size=args.page_size, dtype=dtype,
                                            device=device)
    settings, rtol = SETTINGS, 1e-5
    if args.fp8:   # FP8 keys (and so FP8 queries): the tensor cores' FP8 sums are not exact fp32 ones
        caches = [pack_index_keys(c) for c in caches]
        settings, rtol = FP8_SETTINGS, 1e-3
    scale = ID ** -0.5
    key_bytes = rows * ctx * caches[0].shape[-1] * caches[0].element_size()
    k = min(TOPK, ctx)
    ref = indexer_scores_ref(q, w, caches[0], table, lens, scale=scale)  # fp32 [rows, W * S]

    def item(kind: str, fns: list, ok: bool, **knobs) -> None:
        us = time_us(fns, reps=args.reps, device=device)
        gb_s = None if kind == "topk" else key_bytes / us / 1e3  # top-k alone reads no keys
        emit(dict(shape=name, ctx=ctx, rows=rows, kind=kind, **knobs, us=us, gb_s=gb_s, ok=ok))

    ids = indexer_topk(q, w, caches[0], table, lens, topk=TOPK, scale=scale, use_triton=False)
    item("torch", [lambda c=c: indexer_topk(q, w, c, table, lens, topk=TOPK, scale=scale, use_triton=False)
                   for c in caches], topk_ok(ids, ref, k))
    for block_t, tiles, warps in settings:
        knobs = dict(block_t=block_t, tiles=tiles, num_warps=warps)
        got = indexer_scores(q, w, caches[0], table, lens, scale=scale, use_triton=True, **knobs)
        item("scores", [lambda c=c: indexer_scores(q, w, c, table, lens, scale=scale, use_triton=True, **knobs)
                        for c in caches], scores_ok(got, ref, rtol), **knobs)
    scores = [indexer_scores(q, w, c, table, lens, scale=scale, use_triton=True) for c in caches]
    item("topk", [lambda s=s: s.topk(k, dim=-1) for s in scores], True)
    ids = indexer_topk(q, w, caches[0], table, lens, topk=TOPK, scale=scale, use_triton=True)
    item("kernel+topk", [lambda c=c: indexer_topk(q, w, c, table, lens, topk=TOPK, scale=scale, use_triton=True)
                         for c in caches], topk_ok(ids, ref, k, rtol))


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, name in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == name]
        ax.barh(range(len(rs)), [r["us"] for r in rs], color=["C3" if not r["ok"] else "C0" for r in rs])
        ax.set_yticks(range(len(rs)), [label(r) for r in rs], fontsize=7)
        for i, r in enumerate(rs):
            ax.text(r["us"], i, f" {r['us']:.0f} µs" + (f", {r['gb_s']:.0f} GB/s" if r["gb_s"] else ""), va="center",
                    fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("µs per layer (GB/s of indexer keys)")
        ax.set_title(f"DSA indexer, {name}, IH {IH} x ID {ID}")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def label(r: dict) -> str:
    if r["kind"] != "scores":
        return r["kind"]
    return f"scores t{r['block_t']} x{r['tiles']} w{r['num_warps']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4, help="layers of keys per graph (each its own cache)")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--fp8", action="store_true", help="FP8 keys (144 bytes) and queries, as --kv-cache-dtype fp8 runs them")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the interpreter): checks it runs")
    ap.add_argument("--out", default=str(REPO / "bench/results/dsa_indexer_gpu.json"))
    ap.add_argument("--git-commit", default=None)
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel's module imports triton
        device, dtype, shapes = torch.device("cpu"), torch.float16, SMOKE_SHAPES  # bf16 is wrong in the interpreter
        args.reps, args.layers = 2, 2
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    else:
        print("needs a CUDA GPU (or --smoke: the interpreter on the CPU)", file=sys.stderr)
        return 2
    head = header(device, args.git_commit)
    print(f"device: {head['device']['name']}, indexer {IH} heads x {ID}, {dtype}, page {args.page_size}, "
          f"top-{TOPK}, {args.layers} layers per graph", flush=True)
    out = Path(args.out)
    rows: list[dict] = []

    def emit(r: dict) -> None:
        rows.append(r)
        gb = f"{r['gb_s']:8.1f} GB/s" if r["gb_s"] else " " * 13
        print(f"  {r['shape']:10s} {label(r):24s} {r['us']:10.1f} µs {gb}{'' if r['ok'] else '  MISMATCH'}", flush=True)
        write_json(out, dict(**head, rows=rows, partial=True))

    for name, (ctx, batch) in shapes.items():
        print(f"== {name}: {batch} rows x {ctx} tokens", flush=True)
        bench_shape(name, ctx, batch, args, device, dtype, emit)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = {}
    for name in shapes:
        good = [r for r in rows if r["shape"] == name and r["kind"] == "scores" and r["ok"]]
        torch_us = next(r["us"] for r in rows if r["shape"] == name and r["kind"] == "torch")
        fused_us = next(r["us"] for r in rows if r["shape"] == name and r["kind"] == "kernel+topk")
        top = min(good, key=lambda r: r["us"]) if good else None
        best[name] = dict(scores=label(top) if top else None, scores_us=top["us"] if top else None,
                          scores_gb_s=top["gb_s"] if top else None, speedup_kernel_topk_vs_torch=torch_us / fused_us)
        print(f"{name}: torch {torch_us:.1f} µs -> kernel+topk {fused_us:.1f} µs ({torch_us / fused_us:.1f}x); "
              f"best scores setting {best[name]['scores']}", flush=True)
    write_json(out, dict(**head, rows=rows, best=best))
    plot(rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
