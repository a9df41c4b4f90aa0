"""Probe (host of a GPU machine): does checking an L3 `file` page while it is hot in the cache make
the read + check faster than reading the whole page and then checking it?

Today (`L3Store.get_into` with the file backend) each reader thread preadv's a 2 MiB page into its
pinned row and then runs crc32 over the row: on the H200 machine's host the two passes add up
(read 23-26 GB/s, crc 53-63 GB/s, both 8 threads; read + check 14-18), as if the crc read its page
back from DRAM. Here, side by side in one process, over `--pages` page files in the page cache:
  read        preadv of each page into its pinned row, no check;
  crc         crc32 over each row (already read), no read;
  whole       preadv of the whole page, then crc32 over it (what the store does);
  chunk<N>K   preadv and crc32 in N KiB pieces, each checked right after it is read;
each at every `--threads` count, and again while another thread keeps the PCIe link busy with
host-to-device copies from a separate pinned buffer (`+dma`, what the landing copies of a load do).
Writes JSON (and a plot) to --out. A measurement for a design, not part of the engine.

    python bench/l3_read_fused_probe.py --out bench/results/l3_read_fused_probe_h200.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_json  # noqa: E402

try:
    from zlib_ng.zlib_ng import crc32
    CRC32 = "zlib-ng"
except ImportError:
    from zlib import crc32
    CRC32 = "zlib"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=1020)
    ap.add_argument("--page-mib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--chunks-kib", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    page = int(a.page_mib * (1 << 20))
    root = tempfile.mkdtemp(dir=a.dir, prefix="hisa-probe-")
    data = np.random.default_rng(0).integers(0, 256, page, dtype=np.uint8).tobytes()
    paths = []
    for i in range(a.pages):
        p = os.path.join(root, f"p{i}")
        with open(p, "wb") as f:
            f.write(data)
        paths.append(p)
    cuda = torch.cuda.is_available()
    rows = torch.empty(a.pages, page, dtype=torch.uint8, pin_memory=cuda)
    views = [memoryview(rows[i].numpy()) for i in range(a.pages)]
    want = crc32(data)

    def read(i):
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            return os.preadv(fd, [views[i]], 0)
        finally:
            os.close(fd)

    def check(i):
        return crc32(views[i]) == want

    def whole(i):
        read(i)
        return check(i)

    def chunked(n):
        def f(i):
            fd = os.open(paths[i], os.O_RDONLY)
            v, c, off = views[i], 0, 0
            try:
                while off < page:
                    got = os.preadv(fd, [v[off:off + n]], off)
                    c = crc32(v[off:off + got], c)
                    off += got
            finally:
                os.close(fd)
            return c == want
        return f

    variants = {"read": read, "crc": check, "whole": whole}
    variants.update({f"chunk{k}K": chunked(k << 10) for k in a.chunks_kib})
    for f in variants.values():   # warm: every page in the page cache, every row touched
        list(map(f, range(a.pages)))

    stop = threading.Event()

    def dma():
        src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        s = torch.cuda.Stream()
        moved, t0 = 0, time.perf_counter()
        with torch.cuda.stream(s):
            while not stop.is_set():
                dst.copy_(src, non_blocking=True)
                s.synchronize()
                moved += src.numel()
        dma_rate.append(moved / (time.perf_counter() - t0) / 1e9)

    rows_out = []
    for dma_on in ([False, True] if cuda else [False]):
        for t in a.threads:
            ex = ThreadPoolExecutor(t)
            dma_rate: list[float] = []
            th = None
            if dma_on:
                stop.clear()
                th = threading.Thread(target=dma)
                th.start()
                time.sleep(0.3)
            for name, f in variants.items():
                rates = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    ok = list(ex.map(f, range(a.pages)))
                    rates.append(a.pages * page / (time.perf_counter() - t0) / 1e9)
                    if name != "read" and not all(ok):
                        raise SystemExit(f"{name}: a page failed its check")
                rows_out.append(dict(variant=name, threads=t, dma=dma_on, gb_s=rates,
                                     median_gb_s=statistics.median(rates)))
                print(f"{'+dma' if dma_on else '    '} threads {t:2d} {name:10s} "
                      + " ".join(f"{r:6.2f}" for r in rates) + f"  GB/s (median {statistics.median(rates):.2f})",
                      flush=True)
            if th is not None:
                stop.set()
                th.join()
                print(f"     dma during these: {dma_rate[0]:.1f} GB/s", flush=True)
                rows_out[-1]["dma_gb_s_during_block"] = dma_rate[0]
            ex.shutdown()
    for p in paths:
        os.unlink(p)
    os.rmdir(root)
    doc = header(torch.device("cuda" if cuda else "cpu"), a.git_commit)
    doc.update(pages=a.pages, page_bytes=page, crc32=CRC32, cpus=os.cpu_count(), rows=rows_out)
    write_json(a.out, doc)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 4))
        names = list(variants)
        for k, (dma_on, t) in enumerate([(d, t) for d in ([False, True] if cuda else [False]) for t in a.threads]):
            ys = [next(r["median_gb_s"] for r in rows_out if r["variant"] == n and r["threads"] == t and r["dma"] == dma_on)
                  for n in names]
            ax.plot(names, ys, marker="o", label=f"{t} threads{' +dma' if dma_on else ''}")
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"L3 file read + check, {a.pages} pages of {page >> 20} MiB, {CRC32}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
