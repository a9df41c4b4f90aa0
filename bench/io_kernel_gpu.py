"""Benchmark of the SparseKVCacheManager's hot-path kernels: the I/O row gather and the diff (LRU) step.

I/O: one layer of Llama-3.1-8B (8 KV heads x 128 dims, bf16), pages of 64, 16 and 1 tokens
(rows of 256, 64 and 4 KiB), a pinned host pool of --host-tokens tokens. Gathering N random
pages into device slots, timed four ways in one run:
  uva       the Triton kernel reading pinned host memory in place (hisa.kvcache.io.load_pages)
  staged    index_select on the CPU into a pinned staging buffer + one non_blocking H2D copy
  per_row   one copy_ (cudaMemcpy) per row
  bulk      one pinned H2D copy_ of the same number of contiguous bytes (the PCIe ceiling)
plus `uva_store` (the offload direction, device -> pinned host, store_pages). Each call is
timed from an idle GPU with CUDA events (so host-side work counts), median of --reps.
Diff: lru_diff (Triton) at R requests x NS slots x K selected, 85% overlap between steps,
against the torch reference.

    python bench/io_kernel_gpu.py                       # on a GPU, writes bench/results/io_kernel_gpu.json
    TRITON_INTERPRET=1 python bench/io_kernel_gpu.py --smoke   # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the Triton kernels run in the interpreter on a CPU machine (smoke only)
    os.environ.setdefault("TRITON_INTERPRET", "1")

KV_HEADS, HEAD_DIM, DTYPE = 8, 128, torch.bfloat16


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, runs on a CPU (interpreter)")
    ap.add_argument("--out", default="bench/results/io_kernel_gpu.json")
    ap.add_argument("--host-tokens", type=int, default=65536, help="tokens in the pinned host pool (one layer)")
    ap.add_argument("--page-sizes", default="64,16,1")
    ap.add_argument("--rows", default="32,128,512", help="pages gathered per call")
    ap.add_argument("--block-bytes", default="8192,16384,32768", help="UVA kernel bytes per program (sweep)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--host-alloc", default="torch",
                    help="comma-separated host pool allocations to compare: torch (pin_memory, cudaHostAlloc), "
                         "register (hisa's pool: cudaHostRegister of ordinary pages)")
    ap.add_argument("--methods", default="uva,staged,per_row,bulk,uva_store",
                    help="comma-separated subset of uva, staged, per_row, bulk, uva_store")
    ap.add_argument("--skip-diff", action="store_true", help="only the I/O part")
    ap.add_argument("--sets", type=int, default=0,
                    help="input sets of rows, disjoint (0: a few, reused); with at least 2 x reps + 2 sets every call "
                         "reads rows no call read before (cold address translations, as a decode step's misses)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.host_tokens, args.page_sizes, args.rows, args.block_bytes, args.reps = 512, "4,1", "4,8", "1024", 2
    return args


class Timer:
    """Times fn(i) (i picks one of several input sets, so caches never hold the data).

    idle: median of single calls, each from an idle device (launch and host work included);
    bb:   mean of back-to-back calls (throughput: launch gaps overlap the previous call).
    CUDA events on a GPU, perf_counter on a CPU.
    """

    def __init__(self, reps: int):
        self.reps = reps

    def __call__(self, fn, warmup: int = 2) -> tuple[float, float]:
        for i in range(warmup):
            fn(i)
        idle = []
        for i in range(warmup, warmup + self.reps):  # the inputs go on where the last call stopped
            t0 = self._start()
            fn(i)
            idle.append(self._stop(t0))
        t0 = self._start()
        for i in range(warmup + self.reps, warmup + 2 * self.reps):
            fn(i)
        return statistics.median(idle), self._stop(t0) / self.reps

    def graph(self, fns) -> float:
        """GPU time per call of fns (captured once into one CUDA graph, replayed --reps times)."""
        for f in fns:
            f()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        g.replay()
        t0 = self._start()
        for _ in range(self.reps):
            g.replay()
        return self._stop(t0) / self.reps / len(fns)

    @staticmethod
    def _start():
        if CUDA:
            torch.cuda.synchronize()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @staticmethod
    def _stop(t0) -> float:
        if CUDA:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return t0.elapsed_time(ev) / 1e3
        return time.perf_counter() - t0


def bench_io(args, timer: Timer, dev: torch.device) -> list[dict]:
    from hisa.kvcache import io

    results = []
    max_rows = max(int(n) for n in args.rows.split(","))
    blocks = [int(b) for b in args.block_bytes.split(",")]
    from hisa.kvcache.host_pool import host_tensor

    class Owner:  # keeps a registered pool pinned while it lives
        pass

    wanted = set(args.methods.split(","))
    for alloc, page_size in ((a, int(p)) for a in args.host_alloc.split(",") for p in args.page_sizes.split(",")):
        row = 2 * page_size * KV_HEADS * HEAD_DIM  # elements: K then V of one page
        row_bytes = row * torch.finfo(DTYPE).bits // 8
        host_pages = max(args.host_tokens // page_size, 2 * max_rows)
        t0 = time.perf_counter()
        owner = Owner()
        if alloc == "torch" or not CUDA:
            host = torch.empty(host_pages, row, dtype=DTYPE, pin_memory=CUDA)  # [H_PAGES, ROW]
        else:
            host = host_tensor((host_pages, row), DTYPE, pin=True, owner=owner)
        alloc_s = time.perf_counter() - t0
        huge_kib = _anon_huge_kib()
        # random bits (a pool of many GiB: one random row block repeated, cheaper than randint over all of it)
        block = torch.randint(-2**15, 2**15, (min(host_pages, 256), row), dtype=torch.int16)
        for i in range(0, host_pages, block.shape[0]):
            n_ = min(block.shape[0], host_pages - i)
            host.view(torch.int16)[i:i + n_].copy_(block[:n_])
        host.view(torch.int16)[:, 0] = torch.arange(host_pages, dtype=torch.int16)  # rows differ
        dev_kv = torch.zeros(2 * max_rows, row, dtype=DTYPE, device=dev)  # [D_SLOTS, ROW]
        staging = torch.empty(max_rows, row, dtype=DTYPE, pin_memory=CUDA)
        staging_dev = torch.empty(max_rows, row, dtype=DTYPE, device=dev)
        gen = torch.Generator().manual_seed(page_size)
        for n in (int(x) for x in args.rows.split(",")):
            nbytes = n * row_bytes
            n_sets = 2 if args.smoke else max(4, min(32, -(-4 * host.nbytes // 4 // nbytes)))
            if args.sets:
                n_sets = min(args.sets, host_pages // n)
                srcs_cpu = list(torch.randperm(host_pages, generator=gen)[:n * n_sets].view(n_sets, n))
            else:
                srcs_cpu = [torch.randperm(host_pages, generator=gen)[:n] for _ in range(n_sets)]
            dsts_cpu = [torch.randperm(dev_kv.shape[0], generator=gen)[:n] for _ in range(n_sets)]
            srcs, dsts = [x.to(dev) for x in srcs_cpu], [x.to(dev) for x in dsts_cpu]
            pairs = [list(zip(s.tolist(), d.tolist())) for s, d in zip(srcs_cpu, dsts_cpu)]
            starts = [int(torch.randint(0, host_pages - n + 1, (), generator=gen)) for _ in range(n_sets)]

            def uva(b):
                return lambda i: io.load_pages(host, dev_kv, srcs[i % n_sets], dsts[i % n_sets],
                                               backend="triton", block_bytes=b)

            def staged(i):
                j = i % n_sets
                torch.index_select(host, 0, srcs_cpu[j], out=staging[:n])
                staging_dev[:n].copy_(staging[:n], non_blocking=True)
                dev_kv.index_copy_(0, dsts[j], staging_dev[:n])

            def per_row(i):
                for s, d in pairs[i % n_sets]:
                    dev_kv[d].copy_(host[s], non_blocking=True)

            def bulk(i):
                j = starts[i % n_sets]
                dev_kv[:n].copy_(host[j:j + n], non_blocking=True)

            def uva_store(i):
                io.store_pages(dev_kv, host, dsts[i % n_sets], srcs[i % n_sets], backend="triton")

            methods = {f"uva_b{b}": uva(b) for b in blocks} if "uva" in wanted else {}
            methods.update({k: f for k, f in dict(staged=staged, per_row=per_row, bulk=bulk, uva_store=uva_store).items()
                            if k in wanted})
            # correctness once: the UVA gather equals the host rows (exact bits)
            dev_kv.zero_()
            io.load_pages(host, dev_kv, srcs[0], dsts[0], backend="triton")
            ok = torch.equal(dev_kv[dsts[0]].cpu().view(torch.int16), host[srcs_cpu[0]].view(torch.int16))
            rec = {"host_alloc": alloc, "alloc_s": alloc_s, "host_gib": host.nbytes / 2**30, "anon_huge_gib": huge_kib / 2**20,
                   "sets": n_sets,
                   "page_size": page_size, "row_bytes": row_bytes, "rows": n, "bytes": nbytes,
                   "host_pages": host_pages, "input_sets": n_sets, "uva_correct": ok}
            # uva_store writes host rows: put the pool's bits back afterwards
            saved = host.clone() if "uva_store" in methods else None
            for name, fn in methods.items():
                rec[f"{name}_idle_s"], rec[f"{name}_bb_s"] = timer(fn)
            if saved is not None:
                host.copy_(saved)
            del saved
            if CUDA:  # pure GPU time of the UVA kernel: one graph of n_sets calls
                b = blocks[len(blocks) // 2]
                rec["uva_graph_s"] = timer.graph([lambda i=i: uva(b)(i) for i in range(n_sets)])
            for key in [k for k in rec if k.endswith("_s")]:
                rec[key[:-2] + "_GBps"] = nbytes / rec[key] / 1e9
            if "uva" in wanted and "bulk" in wanted:
                best = max(rec[f"uva_b{b}_bb_GBps"] for b in blocks)
                rec["uva_over_bulk_bb"] = best / rec["bulk_bb_GBps"]
                rec["uva_over_bulk_idle"] = max(rec[f"uva_b{b}_idle_GBps"] for b in blocks) / rec["bulk_idle_GBps"]
            results.append(rec)
            print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items()
                   if k.endswith("GBps") or k in ("host_alloc", "host_gib", "rows", "alloc_s", "anon_huge_gib", "sets")},
                  flush=True)
        del host, staging, owner
    return results


def _anon_huge_kib() -> int:
    """This process's anonymous memory in transparent huge pages (KiB; 0 where unknown)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
    except OSError:
        return 0


def print_io(results: list[dict]) -> None:
    names = [k[:-8] for k in results[0] if k.endswith("_bb_GBps")]
    print("I/O GB/s, back-to-back (idle single call in brackets); uva_b<bytes> = Triton UVA kernel")
    print(f"{'host pool':>22} {'page':>4} {'row KiB':>7} {'N':>4}  " + " ".join(f"{n:>16}" for n in names)
          + f" {'uva_graph':>9} {'uva/bulk':>8}")
    for r in results:
        cells = " ".join(f"{r[n + '_bb_GBps']:7.1f} ({r[n + '_idle_GBps']:6.1f})" for n in names)
        graph = f"{r['uva_graph_GBps']:9.1f}" if "uva_graph_GBps" in r else f"{'-':>9}"
        ratio = f"{r['uva_over_bulk_bb']:8.2f}" if "uva_over_bulk_bb" in r else f"{'-':>8}"
        pool = f"{r['host_alloc']} {r['host_gib']:.1f} GiB"
        print(f"{pool:>22} {r['page_size']:>4} {r['row_bytes'] // 1024:>7} {r['rows']:>4}  {cells} {graph} "
              f"{ratio}{'' if r['uva_correct'] else '  WRONG DATA'}")


def topk_steps(R: int, NS: int, K: int, *, n_steps: int, seed: int, dev: torch.device) -> list[torch.Tensor]:
    """int32 [R, K] selections over 4*NS pages; each step keeps ~85% of the previous one."""
    gen = torch.Generator().manual_seed(seed)
    prev = [torch.randperm(4 * NS, generator=gen)[:K].tolist() for _ in range(R)]
    steps = []
    for _ in range(n_steps):
        rows = []
        for r in range(R):
            keep = [p for p, u in zip(prev[r], torch.rand(K, generator=gen).tolist()) if u < 0.85]
            kept = set(keep)
            fresh = [p for p in torch.randperm(4 * NS, generator=gen).tolist() if p not in kept]
            rows.append(keep + fresh[:K - len(keep)])
        prev = rows
        steps.append(torch.tensor(rows, dtype=torch.int32, device=dev))
    return steps


def bench_diff(args, timer: Timer, dev: torch.device) -> list[dict]:
    from hisa.kvcache import diff

    if args.smoke:
        configs = [(4, 16, 8)]
    else:
        configs = [(r, ns, k) for r in (64, 128, 256) for ns in (64, 128, 256) for k in (32, 64, 128) if k <= ns]
    results = []
    for R, NS, K in configs:
        steps = topk_steps(R, NS, K, n_steps=4 if args.smoke else 16, seed=R + NS + K, dev=dev)
        rec = {"R": R, "NS": NS, "K": K}
        for backend in ("triton", "torch"):
            bp = torch.full((R, NS), -1, dtype=torch.int32, device=dev)
            lu = torch.zeros((R, NS), dtype=torch.int32, device=dev)
            out = diff._allocate(R, K, dev)
            misses = []
            for i, tk in enumerate(steps):  # one pass from an empty buffer: the hit rate
                diff.lru_diff(bp, lu, tk, i + 1, out=out, backend=backend)
                misses.append(int(out.num_misses.sum()))
            rec["hit_rate_steady"] = 1 - sum(misses[1:]) / max(1, (len(steps) - 1) * R * K)

            def call(i, backend=backend, bp=bp, lu=lu, out=out):
                diff.lru_diff(bp, lu, steps[i % len(steps)], len(steps) + 1 + i, out=out, backend=backend)

            rec[f"{backend}_idle_s"], rec[f"{backend}_bb_s"] = timer(call)
            if CUDA and backend == "triton":
                step_t = torch.zeros((), dtype=torch.int32, device=dev)
                rec["triton_graph_s"] = timer.graph(
                    [lambda tk=tk: diff.lru_diff(bp, lu, tk, step_t, out=out) for tk in steps])
        results.append(rec)
    return results


def print_diff(results: list[dict]) -> None:
    print("diff: lru_diff per call, microseconds (one layer, all R requests)")
    print(f"{'R':>4} {'NS':>4} {'K':>4} {'triton idle':>11} {'triton bb':>9} {'graph':>7} {'torch idle':>10} "
          f"{'torch bb':>8} {'hit rate':>8}")
    for r in results:
        graph = f"{r['triton_graph_s'] * 1e6:7.1f}" if "triton_graph_s" in r else f"{'-':>7}"
        print(f"{r['R']:>4} {r['NS']:>4} {r['K']:>4} {r['triton_idle_s'] * 1e6:11.1f} {r['triton_bb_s'] * 1e6:9.1f} "
              f"{graph} {r['torch_idle_s'] * 1e6:10.1f} {r['torch_bb_s'] * 1e6:8.1f} {r['hit_rate_steady']:8.3f}")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not CUDA and not args.smoke:
        sys.exit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on a CPU")
    dev = torch.device("cuda" if CUDA else "cpu")
    name = torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu"
    print(f"device: {name}; torch {torch.__version__}; smoke={args.smoke}", flush=True)
    timer = Timer(args.reps)
    io_results = bench_io(args, timer, dev)
    diff_results = [] if args.skip_diff else bench_diff(args, timer, dev)
    print_io(io_results)
    print_diff(diff_results)
    import triton

    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "smoke": args.smoke,
        "shape": {"kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": str(DTYPE), "host_tokens": args.host_tokens},
        "io": io_results,
        "diff": diff_results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
