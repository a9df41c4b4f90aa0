"""Read throughput of the L3 `redis` backend for large pages, on loopback to a redis-server this
script starts (`--io-threads N` starts it with N I/O threads).

Writes `--pages` pages of `--page-mib` MiB (Llama-3.1-8B bf16 at page 32: 2 MiB) through
`L3Store.set`, then times, `--repeats` times (median):
- per reply parser (hiredis, redis-py's own) x bytes per socket read: the backend's batched `get`
  (one MGET of every page) and `L3Store.get_into` through it (each page then copied into its row of
  one host buffer and checked on the store's reader threads): the load path before 2026-12-03;
- per number of reader threads (`--threads`): `L3Store.get_into` as it is now, each reader thread
  GETting its pages over a socket of its own straight into their rows (`RedisBackend.get_into`),
  then checking them there.
With `--servers N` (N > 1) it starts N redis-servers and spreads the pages over them
(`hisa.kvcache.l3.sharded`, what `--l3 redis://HOST:PORT,HOST:PORT,...` does): the direct path
only, per number of reader threads.
Prints a table, writes JSON (command, date, commit, machine) and a plot beside it.

    python bench/l3_redis_read.py --pages 200 --out bench/results/l3_redis_read_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import REPO, header, write_json

sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests" / "kvcache" / "l3"))

from hisa.kvcache.l3 import L3Store, open_backend  # noqa: E402
from hisa.kvcache.l3 import redis_backend  # noqa: E402
from l3_servers import REDIS_SERVER, RedisServers  # noqa: E402


def _io_args(n: int) -> list[str]:
    return ["--io-threads", str(n), "--io-threads-do-reads", "yes"] if n > 1 else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--page-mib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--read-sizes", type=int, nargs="+", default=[64 << 10])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--io-threads", type=int, default=1, help="the server's io-threads (1: Redis's default)")
    ap.add_argument("--servers", type=int, default=1,
                    help="redis-servers to spread the pages over (default 1); > 1: the direct path only")
    ap.add_argument("--direct-only", action="store_true", help="skip the MGET rows")
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "l3_redis_read_cpu.json")
    args = ap.parse_args()
    if REDIS_SERVER is None:
        print("needs redis-server on PATH", file=sys.stderr)
        return 2
    import redis
    from redis._parsers import _HiredisParser, _RESP2Parser
    from redis.utils import HIREDIS_AVAILABLE

    parsers = {"python": _RESP2Parser, **({"hiredis": _HiredisParser} if HIREDIS_AVAILABLE else {})}
    page_bytes = int(args.page_mib * (1 << 20))
    rows, gb = [], args.pages * page_bytes / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        running = RedisServers(Path(tmp), args.servers, extra_args=_io_args(args.io_threads)).start()
        server = running.servers[0]

        def connect():   # what --l3 with these servers opens
            return open_backend(running.url)

        try:
            writer = L3Store(connect())
            rng = np.random.default_rng(0)
            keys = [f"{i:064x}" for i in range(args.pages)]
            for i in range(0, args.pages, 32):   # (in batches: one pipeline per 32 pages)
                writer.set(keys[i:i + 32], [rng.integers(0, 256, page_bytes, dtype=np.uint8).data
                                            for _ in keys[i:i + 32]])
            writer.close()
            buf = np.empty((args.pages, page_bytes), np.uint8)
            for pname, pclass in (parsers.items() if args.servers == 1 and not args.direct_only else ()):
                for size in args.read_sizes:
                    backend = redis_backend.RedisBackend("127.0.0.1", server.port)
                    kw = dict(backend.client.connection_pool.connection_kwargs, parser_class=pclass,
                              socket_read_size=size)
                    backend.client.close()
                    backend.client = redis.Redis(connection_pool=redis.ConnectionPool(**kw))
                    backend.get_into = None   # (an instance attribute: L3Store takes the MGET path)
                    store = L3Store(backend)
                    backend.get(keys[:1])
                    conn = backend.client.connection_pool.get_connection()
                    parser = type(conn._parser).__name__   # (RESP3 swaps redis-py's Python parser for its RESP3 one)
                    backend.client.connection_pool.release(conn)
                    t_get, t_into = [], []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        got = backend.get(keys)
                        t_get.append(time.perf_counter() - t0)
                        assert all(g is not None for g in got)
                        del got
                        t0 = time.perf_counter()
                        ok = store.get_into(keys, [memoryview(buf[i]) for i in range(args.pages)])
                        t_into.append(time.perf_counter() - t0)
                        assert all(ok), "a page failed its check"
                    store.close()
                    row = dict(path="mget", parser=pname, parser_class=parser, socket_read_bytes=size,
                               get_s=statistics.median(t_get),
                               get_into_s=statistics.median(t_into))
                    row.update(get_gb_s=gb / row["get_s"], get_into_gb_s=gb / row["get_into_s"])
                    rows.append(row)
                    print(f"{pname:8s} read {size >> 10:5d} KiB   MGET {row['get_gb_s']:5.2f} GB/s   "
                          f"get_into (copy + check) {row['get_into_gb_s']:5.2f} GB/s", flush=True)
            for threads in args.threads:
                store = L3Store(connect(), read_threads=threads)
                views = [memoryview(buf[i]) for i in range(args.pages)]
                assert all(store.get_into(keys, views)), "a page failed its check"   # (connects)
                t_into = []
                for _ in range(args.repeats):
                    buf[:, :64] = 0
                    t0 = time.perf_counter()
                    ok = store.get_into(keys, views)
                    t_into.append(time.perf_counter() - t0)
                    assert all(ok), "a page failed its check"
                store.close()
                row = dict(path="direct", reader_threads=threads, get_into_s=statistics.median(t_into))
                row["get_into_gb_s"] = gb / row["get_into_s"]
                rows.append(row)
                print(f"direct   {threads:2d} reader threads   get_into (GET into rows + check) "
                      f"{row['get_into_gb_s']:5.2f} GB/s", flush=True)
        finally:
            running.stop()
    payload = dict(**header(torch.device("cpu"), args.git_commit), pages=args.pages, page_bytes=page_bytes,
                   server=dict(binary=REDIS_SERVER, io_threads=args.io_threads, servers=args.servers),
                   cpus=os.cpu_count(),
                   rows=rows)
    write_json(args.out, payload)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = [f"MGET + copy\n{r['parser']}" if r["path"] == "mget" else f"direct\n{r['reader_threads']} thr"
                  for r in rows]
        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
        ax.bar(labels, [r["get_into_gb_s"] for r in rows],
               color=["tab:gray" if r["path"] == "mget" else "tab:blue" for r in rows])
        ax.set_ylabel("GB/s (read + checked)")
        ax.set_title(f"L3 redis: L3Store.get_into of {args.pages} pages of {args.page_mib:g} MiB, loopback, "
                     f"io-threads {args.io_threads}, {args.servers} server(s)")
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
