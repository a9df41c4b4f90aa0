"""Where a host-backed decode step's miss loads lose PCIe bandwidth.

The decode benchmark's host-backed rows move their misses at 18-37 GB/s inside a step
(bench/results/decode_profile_gpu_h200_128k_b11.json, decode_speed_gpu_h200_32k_v4.json), while the
same UVA gather reaches 48-50 GB/s alone (io_cold_gpu_h200_64g.json). This script builds the
benchmark's engine (random Llama-3.1-8B shape, bf16, page 32, quest, every request host-backed),
decodes a few steps, then runs one eager step with each layer's `load_pages` call timed on its own
(synchronized before and after), and afterwards replays every recorded call alone with the same
tensors and rows, and with the pairs compacted (no masked programs), and with as many random rows of
the same pool. Prints a table per layer and writes JSON.

    python bench/io_in_step_gpu.py --ctx 32768 --batch 8 --out bench/results/io_in_step_gpu_h200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, write_json  # noqa: E402
from decode_speed_gpu import Engine, sync  # noqa: E402

import hisa.kvcache.manager as manager_module  # noqa: E402
from hisa.kvcache.io import load_pages  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402


def timed_ms(fn, reps: int = 1) -> float:
    """GPU time of fn() from an idle device (median of reps); wall time off CUDA (a smoke run)."""
    out = []
    if not torch.cuda.is_available():
        import time
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
        return statistics.median(out)
    for _ in range(reps):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1))
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warm-steps", type=int, default=4)
    ap.add_argument("--host-pool-gb", type=float, default=None)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/io_in_step_gpu.json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    loaded = load_model(f"random:{a.preset}", device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                        progress=False)
    sp = SparseConfig(algorithm="quest", token_budget=2048, min_prompt_len=1024, host_pool_gb=a.host_pool_gb,
                      max_sparse_requests=a.batch, residency="host")
    eng = Engine(loaded, device=dev, ctx=a.ctx, batch=a.batch, steps=a.warm_steps + 8, sparse=sp, page_size=32,
                 chunk=8192, util=0.9)
    e = eng.llm.engine
    eng.decode(a.warm_steps)
    calls = []

    def recording(host, dev_rows, src, dst, **kw):
        ms = timed_ms(lambda: load_pages(host, dev_rows, src, dst, **kw))
        calls.append(dict(host=host, dev=dev_rows, src=src.clone(), dst=dst.clone(), ms=ms))

    graphs, e.runner.graphs = e.runner.graphs, None  # one eager step: the calls run where we can time them
    manager_module.load_pages = recording
    try:
        e.step()
        sync(dev)
    finally:
        manager_module.load_pages = load_pages
        e.runner.graphs = graphs
    gen = torch.Generator().manual_seed(0)
    rows = []
    for layer, c in enumerate(calls):
        host, dev_rows, src, dst = c["host"], c["dev"], c["src"], c["dst"]
        ok = (src >= 0) & (dst >= 0)
        n = int(ok.sum())
        row_bytes = host.shape[1] * host.element_size()
        src_c, dst_c = src[ok].contiguous(), dst[ok].contiguous()
        # as many other rows of the same pool, read into the same device rows (then the real ones again)
        rand = torch.randperm(host.shape[0], generator=gen)[:n].to(dev)
        r = dict(layer=layer, pairs=int(src.numel()), rows=n, mib=n * row_bytes / 2**20, in_step_ms=c["ms"],
                 replay_ms=timed_ms(lambda: load_pages(host, dev_rows, src, dst), reps=3),
                 compact_ms=timed_ms(lambda: load_pages(host, dev_rows, src_c, dst_c), reps=3),
                 random_rows_ms=timed_ms(lambda: load_pages(host, dev_rows, rand, dst_c), reps=1))
        load_pages(host, dev_rows, src_c, dst_c)  # the real rows back
        distinct = int(src_c.unique().numel())
        r.update(distinct_src=distinct, host_row_span_gib=(int(src_c.max()) - int(src_c.min())) * row_bytes / 2**30
                 if n else 0.0)
        for k in ("in_step_ms", "replay_ms", "compact_ms", "random_rows_ms"):
            r[k.replace("_ms", "_gb_s")] = n * row_bytes / (r[k] * 1e-3) / 1e9 if r[k] > 0 else 0.0
        rows.append(r)
        print(f"layer {layer:2d} pairs {r['pairs']:5d} rows {n:4d} ({r['mib']:6.1f} MiB)  in step {r['in_step_ms']:6.3f} ms "
              f"({r['in_step_gb_s']:5.1f} GB/s)  replay {r['replay_gb_s']:5.1f}  compact {r['compact_gb_s']:5.1f}  "
              f"random rows {r['random_rows_gb_s']:5.1f} GB/s", flush=True)
    tot = {k: sum(r[k] for r in rows) for k in ("mib", "in_step_ms", "replay_ms", "compact_ms", "random_rows_ms")}
    summary = {k: tot[k] for k in tot}
    for k in ("in_step_ms", "replay_ms", "compact_ms", "random_rows_ms"):
        summary[k.replace("_ms", "_gb_s")] = tot["mib"] * 2**20 / (tot[k] * 1e-3) / 1e9 if tot[k] else 0.0
    print("total", {k: round(v, 2) for k, v in summary.items()})
    st = e.sparse.summary()
    write_json(a.out, dict(**header(dev, a.git_commit), model=f"random:{a.preset}", dtype="bfloat16", page_size=32,
                           budget_tokens=2048, ctx=eng.ctx, batch=a.batch, hit_rate=st["hit_rate"],
                           host_pool_gib=e.sparse.memory()["host_pool_bytes"] / 2**30, summary=summary, layers=rows))
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
