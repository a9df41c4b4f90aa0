"""Where the L3 `file` load's host time goes: the same read + crc32 of page files from the page cache
by threads (as `L3Store.get_into` does them) and by processes, with and without the `fstat` per
page, and reads alone.

  full      open, fstat, one preadv (header + payload), crc32 of the payload, close: the store's
            path (file_backend._read_into, then record.check)
  lean      open, one preadv (header + payload + one spare byte that only a longer file fills),
            crc32, close: one system call fewer per page
  readonly  open, one preadv, close: no checksum
  processes the `full` path in N processes (spawned), each over its share of the pages, into one
            shared-memory buffer: whether the GIL bounds the threads

Pages are written first (so they sit in the page cache) and read once before the timed runs;
median of --repeats. Writes JSON (command, device, date, commit) and a bar plot beside it.

    python bench/l3_read_gil_cpu.py --pages 1020 --threads 8 12 --processes 8 12 16 \\
        --out bench/results/l3_read_gil_cpu.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch
from _common import REPO, header, write_json

sys.path.insert(0, str(REPO / "src"))   # this tree's hisa, whatever is installed

from hisa.kvcache.l3.record import CRC32, crc32  # noqa: E402

HEAD = 64  # header + key bytes in front of each payload (the store's is 24 + the key's length)


def _pread(path: str, buffers: list, *, fstat: bool = False) -> None:
    """open, (fstat,) one preadv into `buffers` from offset 0, close."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if fstat:
            os.fstat(fd)
        os.preadv(fd, buffers, 0)
    finally:
        os.close(fd)


def page_full(path: str, row: memoryview) -> int:
    _pread(path, [bytearray(HEAD), row], fstat=True)
    return crc32(row)


def page_lean(path: str, row: memoryview) -> int:
    _pread(path, [bytearray(HEAD), row, bytearray(1)])
    return crc32(row)


def page_readonly(path: str, row: memoryview) -> None:
    _pread(path, [bytearray(HEAD), row])


def _share(args: tuple) -> float:
    """In a worker process: the `full` path over pages lo..hi-1 into the shared buffer; seconds."""
    paths, lo, hi, name, page_bytes = args
    shm = shared_memory.SharedMemory(name=name)
    try:
        rows = memoryview(shm.buf)
        t0 = time.perf_counter()
        for i in range(lo, hi):
            page_full(paths[i], rows[i * page_bytes:(i + 1) * page_bytes])
        dt = time.perf_counter() - t0
        del rows
        return dt
    finally:
        shm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=1020)
    ap.add_argument("--page-mib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[8, 12])
    ap.add_argument("--processes", type=int, nargs="*", default=[8, 12, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "l3_read_gil_cpu.json")
    args = ap.parse_args()
    page_bytes = int(args.page_mib * 2**20)
    total = args.pages * page_bytes
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="hisa-l3-gil-") as tmp:
        rng = np.random.default_rng(0)
        paths = [os.path.join(tmp, f"{i:05d}") for i in range(args.pages)]
        for p in paths:
            with open(p, "wb") as f:
                f.write(rng.integers(0, 256, HEAD + page_bytes, dtype=np.uint8).tobytes())
        buf = np.zeros(total, np.uint8)
        views = [memoryview(buf)[i * page_bytes:(i + 1) * page_bytes] for i in range(args.pages)]
        for fn in (page_full, page_lean, page_readonly):
            for n in args.threads:
                with ThreadPoolExecutor(n) as ex:
                    list(ex.map(fn, paths, views))
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        list(ex.map(fn, paths, views))
                        times.append(time.perf_counter() - t0)
                rows_out.append(dict(path=fn.__name__.removeprefix("page_"), workers=n, kind="threads",
                                     seconds=[round(t, 4) for t in times],
                                     gb_s=round(total / statistics.median(times) / 1e9, 2)))
                print(f"{rows_out[-1]['path']:9s} {n:2d} threads   {rows_out[-1]['gb_s']:6.2f} GB/s (median)", flush=True)
        if args.processes:
            shm = shared_memory.SharedMemory(create=True, size=total)
            try:
                np.ndarray(total, np.uint8, buffer=shm.buf).fill(0)
                ctx = mp.get_context("spawn")
                for n in args.processes:
                    bounds = [args.pages * k // n for k in range(n + 1)]
                    jobs = [(paths, a, b, shm.name, page_bytes) for a, b in zip(bounds, bounds[1:])]
                    with ctx.Pool(n) as pool:
                        pool.map(_share, jobs)
                        times, inner = [], []
                        for _ in range(args.repeats):
                            t0 = time.perf_counter()
                            inner.append(max(pool.map(_share, jobs)))
                            times.append(time.perf_counter() - t0)
                    rows_out.append(dict(path="full", workers=n, kind="processes", seconds=[round(t, 4) for t in times],
                                         gb_s=round(total / statistics.median(times) / 1e9, 2),
                                         gb_s_inside_workers=round(total / statistics.median(inner) / 1e9, 2)))
                    print(f"full      {n:2d} processes {rows_out[-1]['gb_s']:6.2f} GB/s (median; "
                          f"{rows_out[-1]['gb_s_inside_workers']} inside the workers)", flush=True)
            finally:
                shm.close()
                shm.unlink()
    payload = dict(**header(torch.device("cpu"), args.git_commit), crc32=CRC32, pages=args.pages,
                   page_bytes=page_bytes, total_bytes=total, cpus=os.cpu_count(), rows=rows_out,
                   note="From the page cache. GB/s = pages' payload bytes / median seconds of --repeats runs.")
    write_json(args.out, payload)
    plot(rows_out, args.out.with_suffix(".png"), total)


def plot(rows: list[dict], path: Path, total: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['path']}\n{r['workers']} {r['kind'][:4]}." for r in rows]
    ax.bar(range(len(rows)), [r["gb_s"] for r in rows], color=["#3a7" if r["kind"] == "threads" else "#888" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("GB/s (median)")
    ax.set_title(f"L3 file pages read (+ crc32) from the page cache, {total / 1e9:.2f} GB", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
