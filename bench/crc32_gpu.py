"""CRC-32 of L3 pages on the GPU (`hisa.ops.crc32.crc32_pages`) against zlib(-ng) on the host.

The pages of a 16K-token prompt of the Llama-3.1-8B shape: `--pages` pages of `--page-mib` MiB,
random bytes, on the device (the kernel) and in pinned host memory (zlib-ng's crc32 on `--threads`
threads, what `L3Store.get_into` checks today). Every device crc is compared with the host's. Per
lane count: the median time of `--repeats` calls (CUDA events). Prints a table, writes JSON and a
bar plot to --out.

Usage::

    python bench/crc32_gpu.py --out bench/results/crc32_gpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from _common import bar_pair_plot, header, write_json  # noqa: E402

from hisa.ops.crc32 import crc32_pages  # noqa: E402

try:
    from zlib_ng.zlib_ng import crc32
    CRC = "zlib-ng"
except ImportError:
    from zlib import crc32
    CRC = "zlib"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pages", type=int, default=1020)
    p.add_argument("--page-mib", type=float, default=2.0)
    p.add_argument("--lanes", default="128,256")
    p.add_argument("--pieces", default="auto,8,32,128", help="programs per page (auto: the default rule)")
    p.add_argument("--chunk-pages", type=int, default=64, help="also time one landing copy's pages (default 64)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/crc32_gpu.json")
    a = p.parse_args()
    dev = torch.device("cuda")
    nbytes = int(a.page_mib * 2**20) // 4 * 4
    g = torch.Generator(device=dev).manual_seed(0)
    pages = torch.randint(-2**31, 2**31 - 1, (a.pages, nbytes // 4), dtype=torch.int32, device=dev, generator=g)
    values = torch.randint(0, 2**32, (a.pages,), dtype=torch.int64, device=dev, generator=g)
    host = pages.cpu().pin_memory()
    vals = values.tolist()
    total = a.pages * nbytes

    def host_crc(i: int) -> int:
        return crc32(host[i].numpy(), vals[i])

    with ThreadPoolExecutor(a.threads) as pool:
        want = list(pool.map(host_crc, range(a.pages)))
        host_s = []
        for _ in range(max(3, a.repeats // 3)):
            t0 = time.perf_counter()
            list(pool.map(host_crc, range(a.pages)))
            host_s.append(time.perf_counter() - t0)
    rows = [dict(kind=f"host {CRC}, {a.threads} threads", ms=statistics.median(host_s) * 1e3, ok=True)]
    def timed(n: int, **kw) -> float:
        times = []
        for _ in range(a.repeats):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            crc32_pages(pages[:n], values[:n], **kw)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        return statistics.median(times)

    for lanes in [int(x) for x in a.lanes.split(",")]:
        for pieces in a.pieces.split(","):
            kw = dict(lanes=lanes, pieces=None if pieces == "auto" else int(pieces))
            ok = crc32_pages(pages, values, **kw).tolist() == want
            rows.append(dict(kind=f"GPU, {lanes} lanes, {pieces} pieces", lanes=lanes, pieces=pieces,
                             ms=timed(a.pages, **kw), ok=ok, chunk_ms=timed(a.chunk_pages, **kw)))
    for r in rows:
        r["gb_s"] = total / (r["ms"] / 1e3) / 1e9
        chunk = f"  {a.chunk_pages} pages: {r['chunk_ms']:.3f} ms" if "chunk_ms" in r else ""
        print(f"{r['kind']:>32}  {r['ms']:8.2f} ms  {r['gb_s']:7.1f} GB/s  {'ok' if r['ok'] else 'WRONG'}{chunk}")
    payload = dict(header(dev, a.git_commit), command=" ".join(["python"] + sys.argv), pages=a.pages,
                   page_bytes=nbytes, crc32=CRC, rows=rows)
    write_json(a.out, payload)
    try:
        bar_pair_plot(a.out.with_suffix(".png"), [r["kind"] for r in rows], [r["ms"] for r in rows],
                      [r["gb_s"] / 100 for r in rows], before_label="ms", after_label="GB/s / 100",
                      ylabel="ms  |  GB/s / 100", title=f"crc32 of {a.pages} x {nbytes / 2**20:.1f} MiB pages")
    except Exception as e:  # noqa: BLE001 - the plot is a convenience
        print("no plot:", e)
    if not all(r["ok"] for r in rows):
        raise SystemExit("a device crc differs from zlib's")


if __name__ == "__main__":
    main()
