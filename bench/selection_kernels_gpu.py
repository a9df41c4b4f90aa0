"""Tuning sweep of the sparse decode step's own kernels on a GPU, at the decode benchmark's shapes.

The Llama-3.1-8B shape (32 query heads, 8 KV heads, head dim 128, bf16, page 32, budget 2,048
tokens = 64 pages) at 32K x 8 rows, 128K x 4 and 128K x 11. For each kernel and each setting of its
knobs it captures one CUDA graph that calls the kernel once per layer (32 calls, each on its own
layer's tensors, so nothing is served from L2 as in a real step) and reports the GPU time per call
(median of --reps replays) and the bytes per second it reaches:

  * Quest's selection: `page_scores` (two kernels) per (pages per block, warps, blocks per program,
    pipeline stages) of its logits kernel, bytes = the page summaries read (kmin + kmax of every page of every row); then
    `select_pages` (top-k pages per row) per warps, with and without the search's early exit;
  * `paged_decode_attention` over the selected pages (64 full pages + the newest, at random
    physical places in a buffer twice the budget): KV splits x tokens per iteration (block_n) x
    pipeline stages;
    bytes = the K and V read;
  * `lowbit_page_scores` (4-bit keys, groups of 32; two kernels), alone (lowbit_scores) and followed
    by `select_pages` (lowbit_select): tokens per dot (sub_tokens) x warps of the logits kernel, and
    the page rule (lowbit's attention mass, lowbit-best's best token) at the default setting;
    bytes = the codes + scales of every middle token + q.

Every setting is first checked against the default setting's output (the same pages; attention
within bf16 rounding; lowbit scores within fp32 rounding, and the default's within bf16 rounding of
the torch reference). Prints progress per setting and a table per kernel, writes JSON (command,
device, date, git commit, figures; the fastest setting per kernel and shape) after every section and
shape (partial: true until the end) and a plot beside it at the end.

    python bench/selection_kernels_gpu.py --out bench/results/selection_kernels_gpu_h200.json
    python bench/selection_kernels_gpu.py --only lowbit --out bench/results/lowbit_kernels_gpu_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import REPO, header, write_json
from paged_decode_gpu import time_graph_ms

sys.path.insert(0, str(REPO / "src"))

from hisa.attention.paged_decode import paged_decode_attention  # noqa: E402
from hisa.sparse.lowbit_scores import lowbit_page_scores, lowbit_page_scores_ref  # noqa: E402
from hisa.sparse.page_scores import page_scores, select_pages  # noqa: E402

H, KVH, D, S, BUDGET_PAGES, LAYERS = 32, 8, 128, 32, 64, 32
SHAPES = {"32K x 8": (32768, 8), "128K x 4": (131072, 4), "128K x 11": (131072, 11)}
SLACK_PAGES = 4  # an engine's rows have a few page slots past the prompt (the tokens it generates)
LOWBIT_BITS, LOWBIT_GROUP = 4, 32
LOWBIT_SETTINGS = ((64, 4, "mass"), (64, 4, "max"), (128, 4, "mass"), (32, 4, "mass"))
# (sub_tokens, num_warps, page rule: "mass" is lowbit's, "max" lowbit-best's); the first is the default
BLOCK_P_WARPS = ((None, None, None, None), (64, 4, 1, 1), (64, 4, 2, 2), (64, 4, 4, 3), (32, 4, 4, 3), (32, 4, 8, 3),
                 (64, 8, 4, 3), (128, 8, 2, 2), (16, 4, 16, 4), (32, 2, 8, 4), (64, 4, 16, 3))
# the logits kernel's (block_p, num_warps, blocks per program, pipeline stages); the first is the default
DECODE_SETTINGS = ((None, 64, None), (None, 64, 2), (4, 128, 2), (None, 32, 3), (12, 32, 2), (6, 64, 2))
# (num_splits, block_n, num_stages) of paged decode over the selected pages; the first is the default
# (a kv-heads-fastest grid order for both kernels was tried too, within 0.5 µs: not kept,
# bench/results/selection_kernels_gpu_h200_v3.json and _decode.json)
KERNELS = {"page_scores": ("page_scores", "select_pages"), "decode": ("paged_decode",),
           "lowbit": ("lowbit_scores", "lowbit_select")}


def graph_us(calls: list, reps: int) -> float:
    """GPU time per call (µs): one graph holding every call, replayed `reps` times (median)."""
    return time_graph_ms(calls, reps=reps) * 1000


def sweep_scores(ctx: int, rows: int, reps: int) -> list[dict]:
    maxp = ctx // S + SLACK_PAGES
    dev = "cuda"
    q = torch.randn(rows, H, D, device=dev, dtype=torch.bfloat16)
    meta = []
    for _ in range(LAYERS):
        a, b = torch.randn(2, rows, maxp, KVH, D, device=dev, dtype=torch.bfloat16)
        meta.append((torch.minimum(a, b), torch.maximum(a, b)))
    ss = torch.arange(rows, dtype=torch.int32, device=dev)
    lo = torch.ones(rows, dtype=torch.int32, device=dev)  # one sink page, the newest page recent
    hi = torch.full((rows,), maxp - 1, dtype=torch.int32, device=dev)
    k = BUDGET_PAGES - 2
    scale = D ** -0.5
    base_scores = page_scores(q, *meta[0], ss, lo, hi, scale=scale)
    base_pages = select_pages(base_scores, lo, hi, k)
    nbytes = rows * maxp * KVH * D * 2 * 2  # kmin + kmax, bf16
    out = []
    for block_p, warps, blocks, stages in BLOCK_P_WARPS:
        kw = dict(block_p=block_p, num_warps=warps, blocks=blocks, num_stages=stages)
        got = page_scores(q, *meta[0], ss, lo, hi, scale=scale, **kw)
        ok = torch.allclose(got.nan_to_num(0, neginf=0), base_scores.nan_to_num(0, neginf=0), rtol=1e-4, atol=1e-6)
        us = graph_us([lambda m=m: page_scores(q, *m, ss, lo, hi, scale=scale, **kw) for m in meta], reps)
        out.append(dict(kernel="page_scores", **{k_: "default" if v is None else v for k_, v in kw.items()},
                        us=us, ok=ok, gb_s=nbytes / us / 1e3))
        progress(out[-1])
    scores = [page_scores(q, *m, ss, lo, hi, scale=scale) for m in meta]
    for warps, early in ((None, None), (None, True), (None, False), (1, True), (2, True), (4, True), (16, True)):
        ok = torch.equal(select_pages(base_scores, lo, hi, k, num_warps=warps, early_exit=early), base_pages)
        ok = ok and all(torch.equal(select_pages(s_, lo, hi, k, num_warps=warps, early_exit=early),
                                    select_pages(s_, lo, hi, k, early_exit=False)) for s_ in scores[:4])
        us = graph_us([lambda s_=s_: select_pages(s_, lo, hi, k, num_warps=warps, early_exit=early) for s_ in scores],
                      reps)
        out.append(dict(kernel="select_pages", num_warps=warps or "auto",
                        early_exit="default" if early is None else early, us=us, ok=ok))
        progress(out[-1])
    return out


def sweep_decode(rows: int, reps: int) -> list[dict]:
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    pool = 2 * BUDGET_PAGES * rows + 1
    kv_len = (BUDGET_PAGES - 1) * S + S // 2  # 63 full pages and the newest, half full
    caches, tables = [], []
    for _ in range(LAYERS):
        caches.append(torch.randn(pool, 2, S, KVH, D, device=dev, dtype=torch.bfloat16))
        perm = torch.randperm(pool, generator=gen)[: rows * BUDGET_PAGES].view(rows, BUDGET_PAGES)
        tables.append(perm.to(torch.int32).to(dev))
    q = torch.randn(rows, H, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((rows,), kv_len, dtype=torch.int32, device=dev)
    outs = [torch.empty_like(q) for _ in range(LAYERS)]
    scale = D ** -0.5
    want = paged_decode_attention(q, caches[0][:, 0], caches[0][:, 1], tables[0], lens, scale=scale)
    nbytes = rows * kv_len * KVH * D * 2 * 2
    out = []
    for splits, block_n, stages in DECODE_SETTINGS:
        kw = dict(num_splits=splits, block_n=block_n, num_stages=stages)
        got = paged_decode_attention(q, caches[0][:, 0], caches[0][:, 1], tables[0], lens, scale=scale, **kw)
        ok = torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        us = graph_us([lambda i=i: paged_decode_attention(q, caches[i][:, 0], caches[i][:, 1], tables[i], lens,
                                                          scale=scale, out=outs[i], **kw) for i in range(LAYERS)],
                      reps)
        out.append(dict(kernel="paged_decode", num_splits=splits or "auto", block_n=block_n,
                        num_stages=stages or "default",
                        us=us, ok=ok, gb_s=nbytes / us / 1e3))
        progress(out[-1])
    return out


def sweep_lowbit(ctx: int, rows: int, reps: int) -> list[dict]:
    """lowbit_page_scores per layer (random codes and scales: the kernel's time does not depend on
    their values), alone and followed by select_pages, per (sub_tokens, num_warps, page) setting."""
    maxp = ctx // S
    dev = "cuda"
    db, ng = D * LOWBIT_BITS // 8, D // LOWBIT_GROUP
    q = torch.randn(rows, H, D, device=dev, dtype=torch.bfloat16)
    index = []
    for _ in range(LAYERS):
        codes = torch.randint(0, 256, (rows, ctx, KVH, db), device=dev, dtype=torch.uint8)
        step = torch.rand(rows, ctx, KVH, ng, device=dev) * 0.4 + 0.1  # as 4-bit codes of unit-scale keys
        mn = -7.5 * step + 0.1 * torch.randn_like(step)
        index.append((codes, torch.stack([step, mn], dim=-1).half()))
    ss = torch.arange(rows, dtype=torch.int32, device=dev)
    lo = torch.ones(rows, dtype=torch.int32, device=dev)  # one sink page, the newest page recent
    hi = torch.full((rows,), maxp - 1, dtype=torch.int32, device=dev)
    k = BUDGET_PAGES - 2
    kw = dict(scale=D ** -0.5, page_size=S, bits=LOWBIT_BITS, group_size=LOWBIT_GROUP)
    base, ref_ok = {}, {}  # per page rule: the default knobs' scores, and whether they match the reference
    for page in dict.fromkeys(page for *_, page in LOWBIT_SETTINGS):
        ref = lowbit_page_scores_ref(q, *index[0], ss, lo, hi, **kw, page=page)
        base[page] = lowbit_page_scores(q, *index[0], ss, lo, hi, **kw, page=page)
        ref_ok[page] = torch.allclose(base[page].nan_to_num(0, neginf=0), ref.nan_to_num(0, neginf=0), rtol=1e-2,
                                      atol=1e-6)
        print(f"  lowbit page={page}, default knobs vs torch reference: {'ok' if ref_ok[page] else 'MISMATCH'}",
              flush=True)
        del ref
    nbytes = rows * (maxp - 2) * S * KVH * (db + ng * 4) + q.numel() * q.element_size()
    out = []
    for sub_tokens, warps, page in LOWBIT_SETTINGS:
        knob = dict(sub_tokens=sub_tokens, num_warps=warps, page=page)
        got = lowbit_page_scores(q, *index[0], ss, lo, hi, **kw, **knob)
        ok = ref_ok[page] and torch.allclose(got.nan_to_num(0, neginf=0), base[page].nan_to_num(0, neginf=0),
                                             rtol=1e-4, atol=1e-7)
        scores = [lambda x=x: lowbit_page_scores(q, *x, ss, lo, hi, **kw, **knob) for x in index]
        us = graph_us(scores, reps)
        out.append(dict(kernel="lowbit_scores", **knob, us=us, ok=ok, gb_s=nbytes / us / 1e3))
        progress(out[-1])
        us = graph_us([lambda f=f: select_pages(f(), lo, hi, k) for f in scores], reps)
        out.append(dict(kernel="lowbit_select", **knob, us=us, ok=ok, gb_s=nbytes / us / 1e3))
        progress(out[-1])
    return out


def progress(r: dict) -> None:
    print(f"  {r['kernel']:13s} {knobs(r):34s} {r['us']:8.1f} µs{'' if r['ok'] else '  MISMATCH'}", flush=True)


def knobs(r: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in r.items() if k not in ("kernel", "us", "ok", "gb_s", "shape"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="32K x 8,128K x 4", help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--out", default=str(REPO / "bench/results/selection_kernels_gpu.json"))
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--only", choices=sorted(KERNELS), action="append",
                    help="run only these sections (repeatable); default: all")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    sections = args.only or list(KERNELS)
    sweeps = dict(page_scores=lambda c, b: sweep_scores(c, b, args.reps),
                  decode=lambda c, b: sweep_decode(b, args.reps), lowbit=lambda c, b: sweep_lowbit(c, b, args.reps))
    head = header(torch.device("cuda"), args.git_commit)
    rows = []
    for name in args.shapes.split(","):
        ctx, batch = SHAPES[name]
        for section in sections:
            print(f"== {name}: {section}", flush=True)
            for r in sweeps[section](ctx, batch):
                rows.append(dict(shape=name, **r))
            write_json(Path(args.out), dict(**head, rows=rows, partial=True))  # what has run so far
            torch.cuda.empty_cache()
    kerns = [k for section in sections for k in KERNELS[section]]
    best = {}
    for name in args.shapes.split(","):
        print(f"\n== {name} (µs per call, one call per layer in one graph)")
        for kern in kerns:
            rs = [r for r in rows if r["shape"] == name and r["kernel"] == kern]
            good = [r for r in rs if r["ok"] and r["us"] == r["us"]]
            top = min(good, key=lambda r: r["us"]) if good else None
            if top:
                best[f"{name} {kern}"] = dict(knobs=knobs(top), us=top["us"])
            for r in sorted(rs, key=lambda r: (r["us"] != r["us"], r["us"])):
                gb = f"{r['gb_s']:7.0f} GB/s" if "gb_s" in r else ""
                print(f"  {kern:13s} {knobs(r):34s} {r['us']:8.1f} µs {gb} {'' if r['ok'] else 'MISMATCH'}"
                      f"{'  <- best' if r is top else ''}")
    write_json(Path(args.out), dict(**head, rows=rows, best=best))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(kerns), figsize=(5 * len(kerns), 4), squeeze=False)
        for ax, kern in zip(axes[0], kerns):
            for name in args.shapes.split(","):
                rs = [r for r in rows if r["shape"] == name and r["kernel"] == kern and r["ok"]]
                ax.plot(range(len(rs)), [r["us"] for r in rs], marker="o", label=name)
                ax.set_xticks(range(len(rs)), [knobs(r).replace(" ", "\n") for r in rs], fontsize=5, rotation=90)
            ax.set_title(kern)
            ax.set_ylabel("µs per call")
            ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
