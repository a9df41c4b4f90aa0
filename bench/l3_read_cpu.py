"""Read + verify throughput of the L3 `file` backend: pages from the page cache into one preallocated
host buffer (what an L3 prefix load does before its host-to-device copy), old path vs new, per thread
count.

  old  L3Store.get: each page read into a fresh bytes object (the backend's reader threads), its
       checksum checked (the store's threads), then copied into its row of the buffer (one thread,
       as engine/l3_prefix.py's `_fill` did);
  new  L3Store.get_into: each page read by one preadv straight into its row of the buffer (header
       and key into a small buffer beside it) and checked there, on the same thread.

Also one thread's rates of the two parts, to estimate a many-core machine: a preadv of a cached page
into the buffer, and the crc32 over a page (zlib-ng's where installed, as the store uses; and zlib's).
Both paths check with the store's crc32, so run it with and without zlib-ng to see its share. The pages are written first (so they are in the page
cache) and read once before timing. Writes JSON (command, date, commit, machine) and a plot beside it.

    python bench/l3_read_cpu.py --pages 1000 --page-mib 2 --threads 1 2 4 \
        --out bench/results/l3_read_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from _common import REPO, header, write_json

sys.path.insert(0, str(REPO / "src"))   # this tree's hisa, whatever is installed

from hisa.kvcache.l3 import L3Store, record  # noqa: E402
from hisa.kvcache.l3.file_backend import FileBackend  # noqa: E402


def old_path(store: L3Store, keys: list[str], rows: np.ndarray) -> None:
    payloads = store.get(keys)
    for row, payload in zip(rows, payloads):   # engine/l3_prefix.py `_fill` before get_into
        row[:] = np.frombuffer(payload, dtype=np.uint8)


def new_path(store: L3Store, keys: list[str], rows: np.ndarray) -> None:
    ok = store.get_into(keys, [memoryview(r) for r in rows])
    assert all(ok)


def set_threads(store: L3Store, n: int) -> None:
    for pool in (store.readers, store.backend._readers):
        pool.close()
        pool.workers = n


def one_thread_parts(store: L3Store, keys: list[str], rows: np.ndarray) -> dict:
    """Seconds per GB of one thread: preadv of cached pages into the buffer, crc32 over them."""
    n = min(len(keys), 200)
    nbytes = n * rows.shape[1]
    t0 = time.perf_counter()
    for key, row in zip(keys[:n], rows):
        head = bytearray(record.head_bytes(key))
        store.backend.get_into([key], [[head, memoryview(row)]])
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for row in rows[:n]:
        record.crc32(row)
    crc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for row in rows[:n]:
        zlib.crc32(row)
    zlib_s = time.perf_counter() - t0
    return dict(pages=n, read_gb_s=round(nbytes / read_s / 1e9, 2), crc32=record.CRC32,
                crc32_gb_s=round(nbytes / crc_s / 1e9, 2), zlib_crc32_gb_s=round(nbytes / zlib_s / 1e9, 2),
                read_and_crc32_gb_s=round(nbytes / (read_s + crc_s) / 1e9, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--page-mib", type=float, default=2.0, help="payload MiB per page (Llama-3.1-8B bf16, page 16: 2)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="reader thread counts to measure (default: 1, 2, 4, ... up to os.cpu_count())")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the pages go (default: a temporary directory)")
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "l3_read_cpu.json")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    threads = args.threads or sorted({1 << i for i in range(cpus.bit_length()) if 1 << i <= cpus} | {cpus})
    page_bytes = int(args.page_mib * 2**20)
    total = args.pages * page_bytes

    with tempfile.TemporaryDirectory(prefix="hisa-l3-read-", dir=args.dir) as tmp:
        store = L3Store(FileBackend(tmp))
        keys = [f"{i:06x}" + "ab" * 29 for i in range(args.pages)]   # 64 hex characters, like page_keys
        rng = np.random.default_rng(0)
        for first in range(0, args.pages, 64):
            batch = keys[first:first + 64]
            store.set(batch, [rng.integers(0, 256, page_bytes, dtype=np.uint8).data for _ in batch])
        rows = np.empty((args.pages, page_bytes), dtype=np.uint8)   # the preallocated buffer (pinned on CUDA)
        rows.fill(0)                                               # its pages touched once, as a reused one is
        new_path(store, keys, rows)                                # every page cached, and correct
        parts = one_thread_parts(store, keys, rows)
        print(f"one thread: preadv {parts['read_gb_s']} GB/s, crc32 ({parts['crc32']}) {parts['crc32_gb_s']} GB/s "
              f"(zlib {zlib.ZLIB_RUNTIME_VERSION}: {parts['zlib_crc32_gb_s']} GB/s), "
              f"both {parts['read_and_crc32_gb_s']} GB/s", flush=True)
        results = []
        for n in threads:
            set_threads(store, n)
            for name, fn in (("old", old_path), ("new", new_path)):
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(store, keys, rows)
                    times.append(time.perf_counter() - t0)
                best, med = min(times), statistics.median(times)
                row = dict(path=name, threads=n, seconds=[round(t, 4) for t in times],
                           gb_s_best=round(total / best / 1e9, 2), gb_s_median=round(total / med / 1e9, 2),
                           gb_s_per_thread_best=round(total / best / 1e9 / n, 2))
                results.append(row)
                print(f"{name} threads {n:2d}: {row['gb_s_best']:6.2f} GB/s best, {row['gb_s_median']:6.2f} median "
                      f"({row['gb_s_per_thread_best']:.2f} per thread)", flush=True)
        store.close()
    payload = dict(**header(torch.device("cpu"), args.git_commit), crc32=record.CRC32, pages=args.pages,
                   page_bytes=page_bytes,
                   total_bytes=total, one_thread=parts, rows=results,
                   note="From the page cache (pages written just before). Best and median of --repeats runs; "
                        "the machine may be shared with other jobs. A core count past os.cpu_count() only "
                        "oversubscribes.")
    write_json(args.out, payload)
    plot(results, args.out.with_suffix(".png"), total, cpus)


def plot(results: list[dict], path: Path, total: int, cpus: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, color in (("old", "#888"), ("new", "#3a7")):
        pts = [(r["threads"], r["gb_s_best"]) for r in results if r["path"] == name]
        ax.plot(*zip(*pts), "o-", color=color, label=f"{name} (get{'_into' if name == 'new' else ''})")
    ax.set_xlabel("reader threads")
    ax.set_ylabel("GB/s (best)")
    ax.set_title(f"L3 file read + verify into one buffer, {total / 1e9:.2f} GB ({cpus} CPUs)", fontsize=9)
    ax.legend(fontsize=8)
    ax.set_ylim(0, None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
