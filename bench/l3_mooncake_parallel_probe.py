"""Probe: do several `batch_get_into` calls at once read a Mooncake Store faster than one?

hisa's mooncake backend reads a load's pages a batch at a time, one client call per batch (`get_into`,
`get_into_batched`). On the H200 machine that gave 4.6-5.0 GB/s through the store process's shared
memory and 2.6-3.4 GB/s over TCP, where a 16K prompt of Llama-3.1-8B needs ~12 GB/s for issue 13's
3x (bench/results/l3_prefix_gpu_h200_mooncake_shm_warm.json). This starts a master and one store
process on loopback (tests/kvcache/l3/l3_servers.py), stores `--pages` pages, and reads them all into
one buffer split into 1, 2, 4, 8 (`--parts`) calls made at once from as many threads, both as the
store process's dummy client (through the shared pool, `client=`) and as a TCP client (a registered
buffer). Every page read is compared with what was stored. Writes JSON (and a plot) to --out.

    python bench/l3_mooncake_parallel_probe.py --out bench/results/l3_mooncake_parallel_probe_cpu.json
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
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segment", default="2 GB", help="the store process's segment (holds every page)")
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    page = int(a.page_mib * (1 << 20))
    n = a.pages
    keys = [f"probe-{i:06d}" for i in range(n)]
    pattern = np.random.default_rng(0).integers(0, 256, page, dtype=np.uint8)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = MooncakeStoreServers(Path(tmp), segment=a.segment).start()
        try:
            master = f"127.0.0.1:{servers.rpc_port}"
            writer = MooncakeBackend(master=master, metadata=servers.metadata)
            for i in range(0, n, 16):   # page i: the pattern rolled by i (each page differs)
                writer.set(keys[i:i + 16], [np.roll(pattern, j).tobytes() for j in range(i, min(n, i + 16))])
            clients = {
                "shm": MooncakeBackend(master=master, metadata=servers.metadata,
                                       client=f"127.0.0.1:{servers.store_port}", pool_bytes=n * page + (64 << 20)),
                "tcp": writer,
            }
            for path, b in clients.items():
                if path == "shm":
                    view = b.host_buffer(n * page)
                    base = ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))
                    dest = np.frombuffer(view, dtype=np.uint8).reshape(n, page)
                else:
                    dest = torch.empty(n, page, dtype=torch.uint8).numpy()
                    base = dest.ctypes.data
                    if b.store.register_buffer(base, n * page) != 0:
                        raise SystemExit("register_buffer failed")

                def call(lo: int, hi: int) -> list[int]:
                    return b.store.batch_get_into(keys[lo:hi], [base + i * page for i in range(lo, hi)],
                                                  [page] * (hi - lo))

                for parts in a.parts:
                    ex = ThreadPoolExecutor(parts)
                    bounds = [(j * n // parts, (j + 1) * n // parts) for j in range(parts)]
                    rates = []
                    for _ in range(a.repeats + 1):   # the first pass is a warm-up
                        dest[:, :8] = 0
                        t0 = time.perf_counter()
                        codes = [c for r in ex.map(lambda lh: call(*lh), bounds) for c in r]
                        dt = time.perf_counter() - t0
                        if any(c != page for c in codes):
                            raise SystemExit(f"{path}, {parts} parts: codes {sorted(set(codes))}")
                        rates.append(n * page / dt / 1e9)
                    for i in (0, n // 2, n - 1):
                        if not np.array_equal(dest[i], np.roll(pattern, i)):
                            raise SystemExit(f"{path}: page {i} differs from what was stored")
                    ex.shutdown()
                    rates = rates[1:]
                    rows_out.append(dict(path=path, parts=parts, gb_s=rates, median_gb_s=statistics.median(rates)))
                    print(f"{path:4s} {parts} call(s) at once: " + " ".join(f"{r:6.2f}" for r in rates)
                          + f" GB/s (median {statistics.median(rates):.2f})", flush=True)
            for b in clients.values():
                b.close()
        finally:
            servers.stop()
    doc = header(torch.device("cpu"), a.git_commit)
    doc.update(pages=n, page_bytes=page, rows=rows_out)
    write_json(a.out, doc)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for path in ("shm", "tcp"):
        r = [x for x in rows_out if x["path"] == path]
        ax.plot([x["parts"] for x in r], [x["median_gb_s"] for x in r], marker="o", label=path)
    ax.set_xlabel("batch_get_into calls at once")
    ax.set_ylabel("GB/s (median)")
    ax.set_title(f"Mooncake Store reads, {n} pages of {page >> 20} MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
