"""Probe: do several `batch_get_into` calls at once, on one Mooncake Store or several, read faster than one?

hisa's mooncake backend reads a load's pages a batch at a time, one client call per batch (`get_into`,
`get_into_batched`). On the H200 machine that gave 4.6-5.0 GB/s through the store process's shared
memory and 2.6-3.4 GB/s over TCP, where a 16K prompt of Llama-3.1-8B needs ~12 GB/s for issue 13's
3x (bench/results/l3_mooncake_parallel_probe_h200.json: one store process serves one client's calls
one after another). This starts `--stores` masters and store processes on loopback
(tests/kvcache/l3/l3_servers.py), stores `--pages` pages spread over them (page i on store i mod S),
and reads them all, each store's pages into a buffer of its own split into `--parts` calls, all
calls at once from as many threads: both as each store process's dummy client (through its shared
pool, each store's pages into an area of *its* pool, `client=`) and as a TCP client (registered
buffers). Every page read is compared with what was stored. Writes JSON (and a plot) to --out.

    python bench/l3_mooncake_parallel_probe.py --stores 1 2 --parts 1 --out bench/results/l3_mooncake_parallel_probe_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests" / "kvcache" / "l3"))
from _common import header, write_json  # noqa: E402
from l3_servers import MooncakeStoreServers  # noqa: E402

from hisa.kvcache.l3.mooncake_backend import MooncakeBackend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--page-mib", type=float, default=2.0)
    ap.add_argument("--stores", type=int, nargs="+", default=[1], help="store processes (each with its master)")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4, 8], help="calls at once per store")
    ap.add_argument("--batch", type=int, default=0, help="pages per call (0: all of a part's pages in one call)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segment", default="2 GB", help="what all store processes together lend (holds every page)")
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    page = int(a.page_mib * (1 << 20))
    n = a.pages
    keys = [f"probe-{i:06d}" for i in range(n)]
    pattern = np.random.default_rng(0).integers(0, 256, page, dtype=np.uint8)
    rows_out = []
    for n_stores in a.stores:
        with tempfile.TemporaryDirectory() as tmp:
            seg = f"{_bytes(a.segment) // n_stores // 10**6 + 64} MB"
            servers = [MooncakeStoreServers(Path(tmp) / str(s), segment=seg) for s in range(n_stores)]
            try:
                for s in servers:
                    s.start()
                rows_out += _measure(a, servers, keys, pattern, page)
            finally:
                for s in servers:
                    s.stop()
    doc = header(torch.device("cpu"), a.git_commit)
    doc.update(pages=n, page_bytes=page, rows=rows_out)
    write_json(a.out, doc)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for path in ("shm", "tcp"):
        for parts in a.parts:
            r = [x for x in rows_out if x["path"] == path and x["parts"] == parts]
            ax.plot([x["stores"] for x in r], [x["median_gb_s"] for x in r], marker="o",
                    label=f"{path}, {parts} call(s) per store")
    ax.set_xlabel("store processes")
    ax.set_ylabel("GB/s (median)")
    ax.set_title(f"Mooncake Store reads, {n} pages of {page >> 20} MiB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)


def _bytes(text: str) -> int:
    num, unit = text.split() if " " in text else (text, "B")
    return int(float(num) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit.upper()])


def _measure(a, servers, keys, pattern, page) -> list[dict]:
    """Both paths over these servers: page i on store i mod len(servers)."""
    n, n_stores = len(keys), len(servers)
    mine = [list(range(s, n, n_stores)) for s in range(n_stores)]   # each store's pages
    out = []
    writers = [MooncakeBackend(master=f"127.0.0.1:{s.rpc_port}", metadata=s.metadata) for s in servers]
    for s, w in enumerate(writers):
        idx = mine[s]
        for i in range(0, len(idx), 16):
            part = idx[i:i + 16]
            w.set([keys[j] for j in part], [np.roll(pattern, j).tobytes() for j in part])
    shm = [MooncakeBackend(master=f"127.0.0.1:{s.rpc_port}", metadata=s.metadata,
                           client=f"127.0.0.1:{s.store_port}", pool_bytes=len(mine[k]) * page + (64 << 20))
           for k, s in enumerate(servers)]
    for path, clients in (("shm", shm), ("tcp", writers)):
        dests, bases = [], []
        for s, b in enumerate(clients):
            size = len(mine[s]) * page
            if path == "shm":
                view = b.host_buffer(size)
                bases.append(ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view)))
                dests.append(np.frombuffer(view, dtype=np.uint8).reshape(len(mine[s]), page))
            else:
                d = torch.empty(len(mine[s]), page, dtype=torch.uint8).numpy()
                if b.store.register_buffer(d.ctypes.data, size) != 0:
                    raise SystemExit("register_buffer failed")
                dests.append(d)
                bases.append(d.ctypes.data)

        def call(s: int, lo: int, hi: int) -> list[int]:
            b, step, codes = clients[s], a.batch or (hi - lo), []
            for x in range(lo, hi, step):
                y = min(hi, x + step)
                codes += b.store.batch_get_into([keys[mine[s][i]] for i in range(x, y)],
                                                [bases[s] + i * page for i in range(x, y)], [page] * (y - x))
            return codes

        for parts in a.parts:
            calls = [(s, j * len(mine[s]) // parts, (j + 1) * len(mine[s]) // parts)
                     for s in range(n_stores) for j in range(parts)]
            ex = ThreadPoolExecutor(len(calls))
            rates = []
            for _ in range(a.repeats + 1):   # the first pass is a warm-up
                for d in dests:
                    d[:, :8] = 0
                t0 = time.perf_counter()
                codes = [c for r in ex.map(lambda c: call(*c), calls) for c in r]
                dt = time.perf_counter() - t0
                if any(c != page for c in codes):
                    raise SystemExit(f"{path}, {n_stores} stores, {parts} parts: codes {sorted(set(codes))}")
                rates.append(n * page / dt / 1e9)
            for s in range(n_stores):
                for i in (0, len(mine[s]) - 1):
                    if not np.array_equal(dests[s][i], np.roll(pattern, mine[s][i])):
                        raise SystemExit(f"{path}: page {mine[s][i]} differs from what was stored")
            ex.shutdown()
            rates = rates[1:]
            out.append(dict(path=path, stores=n_stores, parts=parts, batch=a.batch, gb_s=rates,
                            median_gb_s=statistics.median(rates)))
            print(f"{path:4s} {n_stores} store(s), {parts} call(s) at once per store: "
                  + " ".join(f"{r:6.2f}" for r in rates) + f" GB/s (median {statistics.median(rates):.2f})",
                  flush=True)
    for b in shm + writers:
        b.close()
    return out


if __name__ == "__main__":
    main()
