"""Paged decode attention on a GPU: correctness against the fp32 reference, latency, achieved HBM bandwidth.

For every configuration (batch x kv_len x page_size x dtype; 32 query heads, 8 KV heads, head dim
128 by default) it builds a paged cache with each request's pages at random physical positions
(k, v = views of one [P, 2, S, KVH, D] tensor, as the engine holds them), then
  * checks the Triton kernel against `paged_decode_attention_ref` run in fp32 (max abs error and
    relative error ||out - ref|| / ||ref||);
  * times the Triton kernel and the torch reference with `triton.testing.do_bench` (median ms,
    L2 flushed between runs): eager calls, Python launch overhead included;
  * on CUDA also times the kernel replayed from a CUDA graph (as a decode step runs it), cold L2:
    the graph calls it over enough copies of the cache (>= 256 MB) that no call finds its K/V in L2;
  * reports HBM GB/s = bytes of K and V read (sum of kv_lens * KVH * D * 2 * itemsize) / time.
It prints a table and writes JSON (command, device, date, git commit, figures) and a PNG plot.

Usage::

    python bench/paged_decode_gpu.py                       # H100: full sizes, bench/results/paged_decode_gpu.json
    TRITON_INTERPRET=1 python bench/paged_decode_gpu.py --smoke   # CPU: tiny sizes, checks it runs
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FULL = dict(num_heads=32, num_kv_heads=8, head_dim=128, page_sizes=(64, 16), kv_lens=(32768, 4096),
            batches=(1, 8), dtypes=("bfloat16", "float16"))
# The interpreter computes bf16 wrongly, so the CPU smoke run uses fp16 and fp32.
SMOKE = dict(num_heads=4, num_kv_heads=2, head_dim=32, page_sizes=(16, 4), kv_lens=(200, 9),
             batches=(1, 2), dtypes=("float16", "float32"))
# relative error ||out - ref|| / ||ref|| allowed per dtype (bf16 keeps 8 mantissa bits, fp16 11)
REL_TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}


def build_case(*, batch: int, kv_len: int, page_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q [B, H, D], kv [P, 2, S, KVH, D], page_table int32 [B, max_pages] (random physical pages), kv_lens int32 [B]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pages_per_req = -(-kv_len // page_size)
    num_pages = batch * pages_per_req + 1  # one page no request uses
    kv = torch.randn(num_pages, 2, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    perm = torch.randperm(num_pages, generator=gen)[: batch * pages_per_req]
    page_table = torch.full((batch, pages_per_req + 1), -1, dtype=torch.int32)  # one -1 column of padding
    page_table[:, :pages_per_req] = perm.view(batch, pages_per_req).to(torch.int32)
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    kv_lens = torch.full((batch,), kv_len, dtype=torch.int32)
    return q, kv, page_table.to(device), kv_lens.to(device)


def time_ms(fn, device: torch.device, *, reps: int) -> float:
    """Median milliseconds of fn(): do_bench on CUDA, a wall-clock median elsewhere (smoke runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_graph_ms(fns: list, *, reps: int = 50) -> float:
    """Median milliseconds per fn of one CUDA graph that calls every fn of `fns` in turn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for i in range(reps + 5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 5:
            samples.append(start.elapsed_time(end) / len(fns))
    return statistics.median(samples)


def run_config(*, batch: int, kv_len: int, page_size: int, dtype_name: str, num_heads: int, num_kv_heads: int,
               head_dim: int, device: torch.device, num_splits: int | None, reps: int,
               block_n: int = 64, num_stages: int | None = None, graph_only: bool = False) -> dict:
    from hisa.attention.paged_decode import default_num_splits, paged_decode_attention
    from hisa.attention.reference import paged_decode_attention_ref

    dtype = getattr(torch, dtype_name)
    q, kv, table, lens = build_case(batch=batch, kv_len=kv_len, page_size=page_size, num_heads=num_heads,
                                    num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=device)
    k_cache, v_cache = kv[:, 0], kv[:, 1]  # [P, S, KVH, D] strided views
    scale = head_dim ** -0.5
    use_triton = True  # on CPU this needs TRITON_INTERPRET=1 (main sets it for --smoke)
    splits = num_splits or default_num_splits(batch=batch, num_kv_heads=num_kv_heads,
                                              max_tokens=table.shape[1] * page_size, block_n=block_n,
                                              device=device)
    knobs = dict(num_splits=splits, block_n=block_n, num_stages=num_stages)

    def triton_fn():
        return paged_decode_attention(q, k_cache, v_cache, table, lens, scale=scale, use_triton=use_triton, **knobs)

    def ref_fn():
        return paged_decode_attention_ref(q, k_cache, v_cache, table, lens, scale=scale)

    out = triton_fn().float()  # [B, H, D]
    ref = paged_decode_attention_ref(q.float(), k_cache, v_cache, table, lens, scale=scale)  # fp32 math, fp32 out
    max_abs = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    finite = bool(torch.isfinite(out).all().item())

    t_triton = float("nan") if graph_only else time_ms(triton_fn, device, reps=reps)
    t_ref = float("nan") if graph_only else time_ms(ref_fn, device, reps=reps)
    kv_bytes = int(lens.sum().item()) * num_kv_heads * head_dim * 2 * kv.element_size()  # K and V read once
    t_graph = None
    if device.type == "cuda":
        n_copies = max(1, -(-(256 << 20) // (kv.numel() * kv.element_size())))
        caches = [kv] + [torch.randn_like(kv) for _ in range(n_copies - 1)]  # [P, 2, S, KVH, D] each
        outs = [torch.empty_like(q) for _ in caches]
        t_graph = time_graph_ms([
            (lambda c=c, o=o: paged_decode_attention(q, c[:, 0], c[:, 1], table, lens, scale=scale, out=o,
                                                     **knobs))
            for c, o in zip(caches, outs)])
        del caches, outs
    return dict(batch=batch, kv_len=kv_len, page_size=page_size, dtype=dtype_name, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=head_dim, num_splits=splits, block_n=block_n,
                num_stages=num_stages,
                max_abs_err=max_abs, rel_err=rel, ok=finite and rel <= REL_TOL[dtype_name],
                triton_ms=t_triton, ref_ms=t_ref, kv_bytes=kv_bytes,
                triton_gbps=kv_bytes / (t_triton * 1e-3) / 1e9, ref_gbps=kv_bytes / (t_ref * 1e-3) / 1e9,
                speedup=t_ref / t_triton, graph_ms=t_graph,
                graph_gbps=None if t_graph is None else kv_bytes / (t_graph * 1e-3) / 1e9)


def git_commit(given: str | None) -> dict:
    """HEAD and whether tracked files differ from it; `given` (--git-commit) wins, for copied trees without .git."""
    if given:
        return dict(commit=given, dirty=None, source="--git-commit")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
                    source="git rev-parse HEAD")
    except (OSError, subprocess.CalledProcessError) as e:
        return dict(commit="unknown", dirty=None, source=f"git failed: {e}")


def format_table(rows: list[dict]) -> str:
    head = (f"{'B':>3} {'kv_len':>7} {'S':>3} {'dtype':>8} {'splits':>6} {'max_abs':>9} {'rel_err':>9} {'ok':>3} "
            f"{'triton ms':>10} {'GB/s':>8} {'graph ms':>9} {'GB/s':>8} {'ref ms':>9} {'ref GB/s':>9} {'x':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch']:>3} {r['kv_len']:>7} {r['page_size']:>3} {r['dtype']:>8} {r['num_splits']:>6} "
                     f"{r['max_abs_err']:>9.2e} {r['rel_err']:>9.2e} {'y' if r['ok'] else 'NO':>3} "
                     f"{r['triton_ms']:>10.4f} {r['triton_gbps']:>8.1f} {_fmt(r['graph_ms'], 9, '.4f')} "
                     f"{_fmt(r['graph_gbps'], 8, '.1f')} {r['ref_ms']:>9.3f} {r['ref_gbps']:>9.1f} "
                     f"{r['speedup']:>7.1f}")
    return "\n".join(lines)


def _fmt(x: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"


def write_plot(rows: list[dict], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    labels = [f"B{r['batch']} L{r['kv_len']} S{r['page_size']} {short[r['dtype']]} "
              f"n{r['num_splits']} b{r['block_n']} s{r['num_stages'] or 3}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows)), 4.0))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["triton_gbps"] for r in rows], width=0.4, label="eager (do_bench)")
    if rows[0]["graph_gbps"] is not None:
        ax.bar([i + 0.2 for i in x], [r["graph_gbps"] for r in rows], width=0.4, label="CUDA graph, cold L2")
    ax.legend(fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("achieved HBM GB/s (K+V bytes / time)")
    ax.set_title(f"paged decode attention (Triton), {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/paged_decode_gpu.json, _smoke.json with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; on a CPU runs the kernels in the interpreter")
    parser.add_argument("--num-splits", type=int, default=None, help="force num_splits (default: automatic)")
    parser.add_argument("--git-commit", default=None,
                        help="commit to record when the tree is a copy without .git (default: git rev-parse HEAD)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per figure off CUDA (do_bench decides on CUDA)")
    parser.add_argument("--sweep", metavar="B,KV_LEN,PAGE", default=None,
                        help="one shape (e.g. 8,2080,32: a sparse step's rows) over num_splits x block_n x "
                             "num_stages, CUDA-graph timing only (bf16)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            parser.error("no CUDA device: the full sizes need a GPU; use --smoke for a CPU check")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels import triton
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu (TRITON_INTERPRET=1)"
    sizes = SMOKE if args.smoke else FULL
    if not cuda:
        sizes = dict(sizes, dtypes=tuple(d for d in sizes["dtypes"] if d != "bfloat16"))
    out_path = args.out or REPO / "bench" / "results" / ("paged_decode_gpu_smoke.json" if args.smoke
                                                         else "paged_decode_gpu.json")

    print(f"paged decode attention on {device_name}: H={sizes['num_heads']} KVH={sizes['num_kv_heads']} "
          f"D={sizes['head_dim']}, torch {torch.__version__}")
    rows = []
    if args.sweep:
        batch, kv_len, page_size = (int(x) for x in args.sweep.split(","))
        configs = [dict(num_splits=ns, block_n=bn, num_stages=st) for ns in (None, 4, 6, 8, 12, 16, 24, 32)
                   for bn in (32, 64) for st in (2, 3, 4)]
        if not cuda:
            configs = configs[:2]
        for knobs in configs:
            rows.append(run_config(batch=batch, kv_len=kv_len, page_size=page_size,
                                   dtype_name="bfloat16" if cuda else "float16", num_heads=sizes["num_heads"],
                                   num_kv_heads=sizes["num_kv_heads"], head_dim=sizes["head_dim"], device=device,
                                   reps=args.reps, graph_only=True, **knobs))
            r = rows[-1]
            print(f"splits {r['num_splits']:>3} (asked {knobs['num_splits']}) block_n {r['block_n']:>3} "
                  f"stages {r['num_stages']}: graph {_fmt(r['graph_ms'], 8, '.4f')} ms "
                  f"{_fmt(r['graph_gbps'], 7, '.0f')} GB/s ok={r['ok']}", flush=True)
    grid = [] if args.sweep else itertools.product(sizes["batches"], sizes["kv_lens"], sizes["page_sizes"],
                                                   sizes["dtypes"])
    for batch, kv_len, page_size, dtype_name in grid:
        rows.append(run_config(batch=batch, kv_len=kv_len, page_size=page_size, dtype_name=dtype_name,
                               num_heads=sizes["num_heads"], num_kv_heads=sizes["num_kv_heads"],
                               head_dim=sizes["head_dim"], device=device, num_splits=args.num_splits,
                               reps=args.reps))
        print(format_table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else format_table(rows), flush=True)
        if cuda:
            torch.cuda.empty_cache()

    import triton

    result = dict(
        benchmark="paged_decode_gpu",
        command=shlex.join([sys.executable, *sys.argv]),
        device=device_name,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git=git_commit(args.git_commit),
        versions=dict(torch=torch.__version__, triton=triton.__version__,
                      cuda=torch.version.cuda if cuda else None),
        timing=("triton_ms/ref_ms: triton.testing.do_bench median (ms), L2 flushed, eager launches; graph_ms: "
                "median per call of a CUDA graph calling the kernel over >= 256 MB of cache copies (cold L2)")
        if cuda else f"median of {args.reps} wall-clock runs (interpreter)",
        gbps_definition="sum(kv_lens) * KVH * D * 2 (K and V) * itemsize / time",
        rel_err_definition="||out - ref||_2 / ||ref||_2, ref = paged_decode_attention_ref in fp32",
        rel_tol=REL_TOL,
        smoke=args.smoke,
        results=rows,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    plot_path = out_path.with_suffix(".png")
    write_plot(rows, plot_path, device_name)
    print(f"\nwrote {out_path} and {plot_path}")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        print(f"{len(failed)} configuration(s) exceed the error tolerance {REL_TOL}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
