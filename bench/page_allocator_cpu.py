"""PageAllocator at page size 1 scale: host time and memory of the page bookkeeping (CPU).

At page size 1 (DSA's latent rows) a request holds one page id per token, 131K for a 128K
context, and the device and host pools hold tens of millions of ids; every id a finishing request
frees is host time on the engine thread. This times, on a pool of `--pool` ids: making the pool,
`allocate` of `--requests` requests of `--ids` ids each, `free` of their lists (last page first,
as the scheduler frees), `allocate(1)` (a decode step's new page) and the pool's host memory
(tracemalloc), for this tree and, with `--against REV`, for the tree at git revision REV (a
temporary worktree), each in its own process, side by side in one run. Prints a table, writes JSON
(command, device, date, git commit, figures) and a plot beside it.

    python bench/page_allocator_cpu.py --against 353fc8e --out bench/results/page_allocator_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, bar_pair_plot, header, write_json  # noqa: E402

MEASURE = r"""
import json, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from hisa.kvcache.page_allocator import PageAllocator
pool, requests, ids, reps = (int(x) for x in sys.argv[2:6])
tracemalloc.start()  # the pool's memory (tracemalloc slows allocations down: timed apart)
probe = PageAllocator(pool)
pool_mb = tracemalloc.get_traced_memory()[0] / 1e6
tracemalloc.stop()
del probe
t = time.perf_counter()
alloc = PageAllocator(pool)
make_s = time.perf_counter() - t
best = {}
for _ in range(reps):
    t = time.perf_counter()
    held = [alloc.allocate(ids) for _ in range(requests)]
    a = time.perf_counter() - t
    t = time.perf_counter()
    for pages in held:
        alloc.free(pages[::-1])
    f = time.perf_counter() - t
    t = time.perf_counter()
    one = [alloc.allocate(1) for _ in range(100000)]
    o = time.perf_counter() - t
    alloc.free([p for x in one for p in x])
    for k, v in (("allocate_ns_per_id", a / (requests * ids) * 1e9), ("free_ns_per_id", f / (requests * ids) * 1e9),
                 ("allocate_one_us", o / 100000 * 1e6)):
        best[k] = min(best.get(k, v), v)
print(json.dumps(dict(make_s=make_s, pool_mb=pool_mb, **best)))
"""


def measure(src: Path, args) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(args.pool), str(args.requests), str(args.ids),
                          str(args.reps)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=20_000_000, help="page ids in the pool")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--ids", type=int, default=131_072, help="page ids per request (a 128K context at page size 1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the best of each figure is kept")
    p.add_argument("--against", default=None, help="a git revision to measure beside this tree")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/page_allocator_cpu.json")
    args = p.parse_args(argv)
    if args.requests * args.ids > args.pool:
        raise SystemExit(f"--requests x --ids ({args.requests * args.ids}) must fit in --pool ({args.pool})")
    rows = [dict(tree="this tree", **measure(REPO / "src", args))]
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            wt = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(wt), args.against],
                           check=True)
            try:
                rows.insert(0, dict(tree=args.against, **measure(wt / "src", args)))
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=True)
    keys = ("make_s", "pool_mb", "allocate_ns_per_id", "free_ns_per_id", "allocate_one_us")
    print(f"{'tree':12s} " + " ".join(f"{k:>18s}" for k in keys))
    for r in rows:
        print(f"{r['tree']:12s} " + " ".join(f"{r[k]:18.3f}" for k in keys))
    write_json(args.out, dict(**header(torch.device("cpu"), args.git_commit), pool=args.pool, requests=args.requests,
                              ids_per_request=args.ids, reps=args.reps, rows=rows))
    if len(rows) == 2:
        labels = ["make the pool (s)", "pool (GB)", "allocate (10 ns/id)", "free (10 ns/id)", "allocate(1) (µs)"]
        scale = (1, 1e-3, 0.1, 0.1, 1)
        bar_pair_plot(args.out.with_suffix(".png"), labels, [rows[0][k] * s for k, s in zip(keys, scale)],
                      [rows[1][k] * s for k, s in zip(keys, scale)], before_label=args.against,
                      after_label="this tree", ylabel="host time / memory",
                      title=f"PageAllocator, {args.pool / 1e6:.0f}M ids, {args.requests} x {args.ids} ids")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
