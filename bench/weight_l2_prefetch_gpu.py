"""Does prefetching the output projection's weight into L2 during the sparse attention chain pay? (GPU probe)

A resident sparse decode step at 32K x 8 (Llama-3.1-8B shape, budget 2,048) spends per layer ~8 µs
in the top-k search (select_pages: one program per row, latency-bound) and ~2 µs in the split
merge, during which HBM idles, and the o projection after the attention streams 33.5 MB of weight
at 1.48x its bytes. This times, per layer, inside one CUDA graph over LAYERS layers (each its own
weight, KV and scores, so nothing is in L2 from the layer before):

    select_pages (8 x 1,024 scores) -> paged decode (8 x 2,048 tokens, 64 MiB of K/V) -> o projection
    (linear_add_norm, 4096 x 4096)

with and without a bulk L2 prefetch (`l2_prefetch` below) of the o weight on a side stream at the layer's start, with
the evict-last policy or without it, and with the decode's K/V loads marked evict-first or not.
Also the o projection alone, cold (a new weight each call) and hot (one weight, in L2). Prints a
table, writes JSON (command, device, date, git commit, figures) and a plot beside it.

    python bench/weight_l2_prefetch_gpu.py --out bench/results/weight_l2_prefetch_gpu_h200.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from _common import REPO, bar_pair_plot, header, write_json
from decode_speed_gpu import hbm_bandwidth
from paged_decode_gpu import time_graph_ms

sys.path.insert(0, str(REPO / "src"))

import hisa.attention.paged_decode as pd  # noqa: E402
from hisa.ops.linear import linear_add_norm  # noqa: E402
from hisa.sparse.page_scores import select_pages  # noqa: E402

H, KVH, D, HID = 32, 8, 128, 4096
CHUNK, CHUNKS_PER_PROGRAM = 64 * 1024, 128

# Program i issues the bulk L2 prefetches of chunks [i * BLOCK, (i + 1) * BLOCK), one per lane (the
# TMA unit's cp.async.bulk.prefetch.L2, CHUNK bytes each, the last one shorter), with an evict-last
# L2 cache policy when EVICT_LAST; a lane past the end issues nothing. Nothing is loaded or written.
_HINTED = tl.constexpr("""{
 .reg .pred p;
 .reg .b64 pol;
 setp.ne.s32 p, $2, 0;
 createpolicy.fractional.L2::evict_last.b64 pol, 1.0;
 @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol;
 mov.u32 $0, 0;
}""")
_PLAIN = tl.constexpr("""{
 .reg .pred p;
 setp.ne.s32 p, $2, 0;
 @p cp.async.bulk.prefetch.L2.global [$1], $2;
 mov.u32 $0, 0;
}""")


@triton.jit
def l2_prefetch_kernel(base_ptr, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    off = i.to(tl.int64) * CHUNK
    ok = off < nbytes
    size = tl.where(ok, tl.minimum(nbytes - off, CHUNK), 0).to(tl.int32)  # 0: no prefetch
    addr = base_ptr + tl.where(ok, off, 0)
    if EVICT_LAST:
        tl.inline_asm_elementwise(_HINTED, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(_PLAIN, "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(t: torch.Tensor, *, evict_last: bool = True) -> None:
    """Ask for t's bytes (contiguous, 16-byte aligned, sm_90+) to be brought into L2, on the current stream."""
    nbytes = t.numel() * t.element_size() // 16 * 16
    grid = (-(-(-(-nbytes // CHUNK)) // CHUNKS_PER_PROGRAM),)
    l2_prefetch_kernel[grid](t.view(-1).view(torch.uint8), nbytes, CHUNK=CHUNK, BLOCK=CHUNKS_PER_PROGRAM,
                             EVICT_LAST=evict_last, num_warps=4)


def graph_ms(body, *, layers: int, reps: int) -> float:
    """Median µs per layer of one CUDA graph calling body(i) for every layer i."""
    return time_graph_ms([functools.partial(body, i) for i in range(layers)], reps=reps) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048, help="selected tokens per row")
    p.add_argument("--pages", type=int, default=1024, help="pages scored per row")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/weight_l2_prefetch_gpu.json")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    L, B, S = args.layers, args.batch, 32
    n_pages = args.tokens // S
    bf = dict(dtype=torch.bfloat16, device=dev)
    wo = [torch.randn(HID, H * D, **bf) * 0.02 for _ in range(L)]
    kc = [torch.randn(B * n_pages, S, KVH, D, **bf) for _ in range(L)]
    vc = [torch.randn(B * n_pages, S, KVH, D, **bf) for _ in range(L)]
    scores = [torch.rand(B, args.pages, device=dev) for _ in range(L)]
    q = torch.randn(B, H, D, **bf)
    table = torch.arange(B * n_pages, dtype=torch.int32, device=dev).view(B, n_pages)
    lens = torch.full((B,), args.tokens, dtype=torch.int32, device=dev)
    lo = torch.zeros(B, dtype=torch.int32, device=dev)
    hi = torch.full((B,), args.pages, dtype=torch.int32, device=dev)
    res = torch.randn(B, HID, **bf)
    nw = torch.ones(HID, **bf)
    att = torch.empty(B, H, D, **bf)
    side = torch.cuda.Stream()

    def layer(i, *, prefetch: str):
        main = torch.cuda.current_stream()
        if prefetch:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                l2_prefetch(wo[i], evict_last=prefetch == "evict_last")
        select_pages(scores[i], lo, hi, n_pages - 4)
        pd.paged_decode_attention(q, kc[i], vc[i], table, lens, scale=D ** -0.5, num_splits=8, out=att)
        linear_add_norm(att.view(B, H * D), wo[i], None, res, nw, 1e-5)
        if prefetch:
            main.wait_stream(side)

    rows = []
    for kv_evict in ("", "evict_first"):
        pd.KV_EVICT = kv_evict
        for pre in ("", "evict_last", "normal"):
            us = graph_ms(lambda i: layer(i, prefetch=pre), layers=L, reps=args.reps)
            rows.append(dict(kv_evict=kv_evict or "default", prefetch=pre or "none", us_per_layer=us))
            print(f"kv loads {kv_evict or 'default':12s} prefetch {pre or 'none':11s} {us:8.2f} µs/layer", flush=True)
    pd.KV_EVICT = ""
    # the parts alone
    parts = {
        "select": lambda i: select_pages(scores[i], lo, hi, n_pages - 4),
        "decode": lambda i: pd.paged_decode_attention(q, kc[i], vc[i], table, lens, scale=D ** -0.5, num_splits=8,
                                                      out=att),
        "o_cold": lambda i: linear_add_norm(att.view(B, H * D), wo[i], None, res, nw, 1e-5),
        "o_hot": lambda i: linear_add_norm(att.view(B, H * D), wo[0], None, res, nw, 1e-5),
        "prefetch_only": lambda i: l2_prefetch(wo[i]),
    }
    alone = {k: graph_ms(f, layers=L, reps=args.reps) for k, f in parts.items()}
    for k, v in alone.items():
        print(f"{k:14s} {v:8.2f} µs per call", flush=True)
    bw = hbm_bandwidth(dev)
    payload = dict(**header(dev, args.git_commit), hbm_copy_bytes_per_s=bw,
                   shape=dict(layers=L, batch=B, tokens=args.tokens, pages=args.pages, o_weight_bytes=HID * H * D * 2,
                              kv_bytes_per_layer=2 * B * args.tokens * KVH * D * 2),
                   rows=rows, alone_us=alone)
    write_json(args.out, payload)
    labels = [f"{r['prefetch']}" for r in rows if r["kv_evict"] == "default"]
    bar_pair_plot(args.out.with_suffix(".png"), labels,
                  [r["us_per_layer"] for r in rows if r["kv_evict"] == "default"],
                  [r["us_per_layer"] for r in rows if r["kv_evict"] != "default"],
                  before_label="K/V loads: default policy", after_label="K/V loads: evict-first",
                  ylabel="µs per layer (select + decode + o)", title="o weight prefetched into L2 during the chain")


if __name__ == "__main__":
    main()
