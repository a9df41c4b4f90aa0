"""Probe (GPU): can an L3 `file` load skip the host copy by letting the GPU read the page cache?

Writes `--pages` files of `--page-mib` MiB (random bytes, left in the page cache), then times, side by
side in one process:
  * copy: what `L3Store.get_into` does today on CUDA: os.preadv of each file into a pinned row on
    `--threads` threads, then one host-to-device copy per 64 pages;
  * mapped: each file mmap'ed read-only, registered with cudaHostRegister(ReadOnly) and copied to the
    device straight from the page cache (no CPU copy); the registration and unregistration are timed;
  * crc: zlib's crc32 over every mapped page on `--threads` threads (the check a load must still make,
    a read-only pass).
Prints a table, writes JSON (and a plot) to --out. Not part of the engine: a measurement for a design.

Usage::

    python bench/l3_mmap_probe_gpu.py --out bench/results/l3_mmap_probe_gpu.json
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_json  # noqa: E402

try:
    from zlib_ng import zlib_ng as zlib
except ImportError:  # the system zlib
    import zlib

HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pages", type=int, default=1020)
    p.add_argument("--page-mib", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the page files go (default: a temporary directory)")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/l3_mmap_probe_gpu.json"))
    a = p.parse_args()
    warnings.filterwarnings("ignore", message=".*not writable.*")   # torch.from_numpy of a read-only mapping
    dev = torch.device("cuda")
    size = int(a.page_mib * 2**20) // 4096 * 4096
    root = Path(a.dir or tempfile.mkdtemp(prefix="hisa-mmap-probe-"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(a.pages):
        path = root / f"page{i:05d}"
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths.append(path)
    total = size * a.pages
    dst = torch.empty(a.pages, size, dtype=torch.uint8, device=dev)
    rows = torch.empty(a.pages, size, dtype=torch.uint8).pin_memory()
    pool = ThreadPoolExecutor(a.threads)
    cudart = torch.cuda.cudart()
    results = []

    def read_into(i: int) -> None:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            os.preadv(fd, [memoryview(rows[i].numpy())], 0)
        finally:
            os.close(fd)

    for rep in range(a.repeats):
        # copy: preadv into pinned rows on the threads, then host-to-device copies of 64 rows
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        list(pool.map(read_into, range(a.pages)))
        t1 = time.perf_counter()
        for s in range(0, a.pages, 64):
            dst[s:s + 64].copy_(rows[s:s + 64], non_blocking=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        # mapped: mmap + register (read-only) each file, copy from it, unregister
        maps, arrays, ptrs = [], [], []
        t3 = time.perf_counter()
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            os.close(fd)
            arr = np.frombuffer(mm, dtype=np.uint8)
            ptr = arr.ctypes.data
            err = cudart.cudaHostRegister(ptr, size, HOST_REGISTER_READ_ONLY)
            if int(err) != 0:
                raise SystemExit(f"cudaHostRegister failed: {err}")
            maps.append(mm)
            arrays.append(arr)
            ptrs.append(ptr)
        t4 = time.perf_counter()
        for i, arr in enumerate(arrays):
            dst[i].copy_(torch.from_numpy(arr), non_blocking=True)
        torch.cuda.synchronize()
        t5 = time.perf_counter()
        crc = list(pool.map(lambda arr: zlib.crc32(arr), arrays))
        t6 = time.perf_counter()
        for ptr in ptrs:
            cudart.cudaHostUnregister(ptr)
        t7 = time.perf_counter()
        del arrays, arr   # the mappings close once nothing exports them
        maps.clear()
        ok = torch.equal(dst[-1].cpu(), rows[-1])
        row = dict(rep=rep, bytes=total, copy_read_s=t1 - t0, copy_h2d_s=t2 - t1, copy_total_s=t2 - t0,
                   mapped_register_s=t4 - t3, mapped_h2d_s=t5 - t4, crc_s=t6 - t5, unregister_s=t7 - t6,
                   mapped_total_s=t5 - t3, same_bytes=ok, crc0=crc[0])
        row.update(copy_gb_s=total / row["copy_total_s"] / 1e9, mapped_h2d_gb_s=total / row["mapped_h2d_s"] / 1e9,
                   crc_gb_s=total / row["crc_s"] / 1e9, register_gb_s=total / row["mapped_register_s"] / 1e9)
        results.append(row)
        print(f"rep {rep}: copy {row['copy_total_s'] * 1e3:.1f} ms (read {row['copy_read_s'] * 1e3:.1f}, h2d "
              f"{row['copy_h2d_s'] * 1e3:.1f}) = {row['copy_gb_s']:.1f} GB/s | mapped: register "
              f"{row['mapped_register_s'] * 1e3:.1f} ms, h2d {row['mapped_h2d_s'] * 1e3:.1f} ms "
              f"({row['mapped_h2d_gb_s']:.1f} GB/s), crc {row['crc_s'] * 1e3:.1f} ms ({row['crc_gb_s']:.1f} GB/s on "
              f"{a.threads} threads), unregister {row['unregister_s'] * 1e3:.1f} ms; same bytes {ok}", flush=True)
    payload = header(torch.device("cuda"), a.git_commit)
    payload.update(pages=a.pages, page_bytes=size, threads=a.threads, results=results)
    write_json(a.out, payload)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        last = results[-1]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = ["copy: read", "copy: h2d", "mapped: register", "mapped: h2d", "crc (read-only)", "unregister"]
        vals = [last[k] * 1e3 for k in ("copy_read_s", "copy_h2d_s", "mapped_register_s", "mapped_h2d_s", "crc_s",
                                        "unregister_s")]
        ax.barh(names, vals, color=["#888", "#888", "#37a", "#37a", "#3a7", "#37a"])
        ax.set_xlabel(f"ms for {total / 1e9:.2f} GB ({a.pages} pages)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(a.out.with_suffix(".png"), dpi=120)
    except Exception as e:  # noqa: BLE001 — the plot is a convenience
        print("no plot:", e)


if __name__ == "__main__":
    main()
