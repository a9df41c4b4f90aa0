"""Where a host-backed decode step's miss loads lose PCIe bandwidth.

The decode benchmark's host-backed rows move their misses at 18-37 GB/s inside a step
(bench/results/decode_profile_gpu_h200_128k_b11.json, decode_speed_gpu_h200_32k_v4.json), while the
same UVA gather reaches 48-50 GB/s alone (io_cold_gpu_h200_64g.json). This script builds the
benchmark's engine (random Llama-3.1-8B shape, bf16, page 32, quest, every request host-backed),
decodes a few steps, then runs one eager step with each layer's `load_pages` call timed on its own
(synchronized before and after), and afterwards replays every recorded call alone with the same
tensors and rows, and with the pairs compacted (no masked programs), and with as many random rows of
the same pool. Prints a table per layer and writes JSON. Before that, two steps eager and two replayed
from their CUDA graph run under the profiler: the copy kernel's time there, nothing synchronized
between the kernels, against the bytes the step loaded.

Two more suspects are timed with the step's own calls: the state a step leaves the GPU in (each call
replayed right after a kernel that streams `--thrash-gib` of HBM, as the weight GEMMs before it do:
translation and L2 state gone), and the copy's program size (`--blocks`). `--thp-gib` then compares a
registered pool in ordinary 4 KiB pages with one in transparent huge pages (2 MiB), idle and after
the same thrash, on cold random rows (what a step's misses are).

    python bench/io_in_step_gpu.py --ctx 32768 --batch 8 --out bench/results/io_in_step_gpu_h200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, checked_step, header, write_json  # noqa: E402
from decode_speed_gpu import Engine, sync  # noqa: E402

import hisa.kvcache.manager as manager_module  # noqa: E402
from hisa.kvcache.io import load_pages  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402


def timed_ms(fn, reps: int = 1) -> float:
    """GPU time of fn() from an idle device (median of reps); wall time off CUDA (a smoke run)."""
    return timed_after_ms(None, fn, reps)


class Thrash:
    """Stream `gib` of HBM (a sum over a device buffer) on the current stream: what the weight GEMMs
    between two layers' loads do to the L2 and the GPU's translation caches."""

    def __init__(self, dev: torch.device, gib: float):
        n = int(gib * 2**30) // 2
        self.buf = torch.ones(n, dtype=torch.bfloat16, device=dev) if n else None
        self.out = torch.empty((), dtype=torch.float32, device=dev)

    def __call__(self) -> None:
        if self.buf is not None:
            torch.sum(self.buf, 0, dtype=torch.float32, out=self.out)


def timed_after_ms(pre, fn, reps: int = 3) -> float:
    """GPU time of fn() alone when it runs right after pre() (None: from an idle device) on the same
    stream, median of reps; wall time off CUDA (a smoke run)."""
    out = []
    for _ in range(reps):
        if not torch.cuda.is_available():
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
            continue
        torch.cuda.synchronize()
        if pre is not None:
            pre()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1))
    return statistics.median(out)


def thp_buffer(nbytes: int) -> torch.Tensor:
    """uint8 host memory of nbytes, 2 MiB aligned and advised MADV_HUGEPAGE (transparent huge pages)."""
    import mmap
    huge = 2 * 2**20
    m = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(m, dtype=torch.uint8)
    off = -whole.data_ptr() % huge
    m.madvise(mmap.MADV_HUGEPAGE, off, nbytes)
    return whole[off:off + nbytes]


def thp_compare(dev: torch.device, gib: float, row_bytes: int, dtype: torch.dtype, thrash: Thrash,
                sizes: tuple[int, ...] = (75, 176), sets: int = 8) -> list[dict]:
    """Cold random rows from a registered pool of `gib` in 4 KiB pages vs transparent huge pages."""
    from hisa.kvcache.host_pool import host_tensor, pin_ranges
    cudart = torch.cuda.cudart()
    elem = torch.empty((), dtype=dtype).element_size()
    pages = int(gib * 2**30) // row_bytes
    out = []

    class Owner:
        pass

    owners = []
    for kind in ("register_4k", "register_thp"):
        owner = Owner()
        owners.append(owner)
        if kind == "register_4k":
            host = host_tensor((pages, row_bytes // elem), dtype, pin=True, owner=owner)
        else:
            raw = thp_buffer(pages * row_bytes)
            raw.fill_(1)  # fault the huge pages in before registering
            for start, length in pin_ranges(raw.data_ptr(), raw.numel()):
                assert int(cudart.cudaHostRegister(start, length, 3)) == 0, "cudaHostRegister failed"
            host = raw.view(dtype).view(pages, row_bytes // elem)
        anon_huge = _anon_huge_gib()
        dev_rows = torch.empty(max(sizes), row_bytes // elem, dtype=dtype, device=dev)
        gen = torch.Generator().manual_seed(1)
        for n in sizes:
            dst = torch.arange(n, device=dev)
            r = dict(pool=kind, gib=gib, rows=n, mib=n * row_bytes / 2**20, anon_huge_gib=anon_huge)
            for name, pre in (("idle", lambda: None), ("after_thrash", thrash)):
                ms = []
                for _ in range(sets):  # rows no earlier call read: cold translations
                    src = torch.randperm(pages, generator=gen)[:n].to(dev)
                    ms.append(timed_after_ms(pre, lambda: load_pages(host, dev_rows, src, dst), reps=1))
                r[f"{name}_ms"] = statistics.median(ms)
                r[f"{name}_gb_s"] = n * row_bytes / (r[f"{name}_ms"] * 1e-3) / 1e9
            out.append(r)
            print(f"{kind:13s} rows {n:4d}  idle {r['idle_gb_s']:5.1f} GB/s  after thrash {r['after_thrash_gb_s']:5.1f} GB/s"
                  f"  (anon huge pages {anon_huge:.1f} GiB)", flush=True)
    return out


def _anon_huge_gib() -> float:
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def profiled_copy(eng, *, graphs: bool) -> dict:
    """One decode step under the profiler, eager (kernels launched one by one, nothing synchronized
    in between) or replayed from its CUDA graph: the copy kernel's GPU time and the bytes the step
    loaded (the miss counters before and after)."""
    e = eng.llm.engine
    saved = e.runner.graphs
    if not graphs:
        e.runner.graphs = None
    before = sum(e.sparse.manager.misses.tolist())
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    try:
        with torch.profiler.profile(activities=acts) as prof:
            sync(eng.device)
            checked_step(e)
            sync(eng.device)
    finally:
        e.runner.graphs = saved
    loaded = (sum(e.sparse.manager.misses.tolist()) - before) * e.sparse.manager.row_bytes
    ks = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    copies = [ev.device_time_total / 1e3 for ev in ks if ev.name.startswith("copy_rows_kernel")]
    ms = sum(copies)
    return dict(mode="graph" if graphs else "eager", kernels_seen=len(ks), copy_calls=len(copies), copy_ms=ms,
                loaded_mib=loaded / 2**20, copy_gb_s=loaded / (ms * 1e-3) / 1e9 if ms else 0.0,
                copy_ms_per_call=[round(c, 4) for c in copies])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warm-steps", type=int, default=4)
    ap.add_argument("--host-pool-gb", type=float, default=None)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--thrash-gib", type=float, default=2.0, help="HBM streamed before the 'after thrash' replays")
    ap.add_argument("--blocks", default="4096,65536", help="other bytes-per-program to replay with (after thrash)")
    ap.add_argument("--thp-gib", type=float, default=0.0, help="also compare 4 KiB vs huge-page pools of this size")
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
    print(f"prefilled {a.batch} x {eng.ctx} in {eng.prefill_s:.1f} s", flush=True)
    eng.decode(a.warm_steps)
    profiled = []
    if dev.type == "cuda":
        for graphs in (True, False, True, False):
            r = profiled_copy(eng, graphs=graphs)
            profiled.append(r)
            print(f"profiled {r['mode']:5s} step: copy_rows {r['copy_calls']} calls {r['copy_ms']:.3f} ms for "
                  f"{r['loaded_mib']:.1f} MiB ({r['copy_gb_s']:.1f} GB/s); kernels seen {r['kernels_seen']}", flush=True)
    thrash = Thrash(dev, a.thrash_gib if dev.type == "cuda" else 0.0)
    blocks = [int(b) for b in a.blocks.split(",") if b]
    calls = []

    def recording(host, dev_rows, src, dst, **kw):
        ms = timed_ms(lambda: load_pages(host, dev_rows, src, dst, **kw))
        calls.append(dict(host=host, dev=dev_rows, src=src.clone(), dst=dst.clone(), ms=ms))

    graphs, e.runner.graphs = e.runner.graphs, None  # one eager step: the calls run where we can time them
    manager_module.load_pages = recording
    try:
        checked_step(e)
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
                 random_rows_ms=timed_ms(lambda: load_pages(host, dev_rows, rand, dst_c), reps=1),
                 after_thrash_ms=timed_after_ms(thrash, lambda: load_pages(host, dev_rows, src, dst)),
                 compact_after_thrash_ms=timed_after_ms(thrash, lambda: load_pages(host, dev_rows, src_c, dst_c)))
        for b in blocks:
            r[f"block{b}_after_thrash_ms"] = timed_after_ms(
                thrash, lambda: load_pages(host, dev_rows, src_c, dst_c, block_bytes=b))
        load_pages(host, dev_rows, src_c, dst_c)  # the real rows back
        distinct = int(src_c.unique().numel())
        r.update(distinct_src=distinct, host_row_span_gib=(int(src_c.max()) - int(src_c.min())) * row_bytes / 2**30
                 if n else 0.0)
        timings = [k for k in r if k.endswith("_ms")]
        for k in timings:
            r[k.replace("_ms", "_gb_s")] = n * row_bytes / (r[k] * 1e-3) / 1e9 if r[k] > 0 else 0.0
        rows.append(r)
        print(f"layer {layer:2d} pairs {r['pairs']:5d} rows {n:4d} ({r['mib']:6.1f} MiB)  in step {r['in_step_ms']:6.3f} ms "
              f"({r['in_step_gb_s']:5.1f} GB/s)  replay {r['replay_gb_s']:5.1f}  compact {r['compact_gb_s']:5.1f}  "
              f"random rows {r['random_rows_gb_s']:5.1f}  after thrash {r['after_thrash_gb_s']:5.1f}  "
              f"compact after thrash {r['compact_after_thrash_gb_s']:5.1f}  "
              + "  ".join(f"b{b} {r[f'block{b}_after_thrash_gb_s']:5.1f}" for b in blocks) + " GB/s", flush=True)
    timings = [k for k in rows[0] if k.endswith("_ms")] if rows else []
    tot = {k: sum(r[k] for r in rows) for k in ["mib", *timings]}
    summary = {k: tot[k] for k in tot}
    for k in timings:
        summary[k.replace("_ms", "_gb_s")] = tot["mib"] * 2**20 / (tot[k] * 1e-3) / 1e9 if tot[k] else 0.0
    print("total", {k: round(v, 2) for k, v in summary.items()}, flush=True)
    thp = []
    if a.thp_gib > 0 and dev.type == "cuda":
        row_bytes = calls[0]["host"].shape[1] * calls[0]["host"].element_size()
        try:
            print("THP setting:", open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip(), flush=True)
        except OSError:
            pass
        thp = thp_compare(dev, a.thp_gib, row_bytes, calls[0]["host"].dtype, thrash)
    st = e.sparse.summary()
    write_json(a.out, dict(**header(dev, a.git_commit), model=f"random:{a.preset}", dtype="bfloat16", page_size=32,
                           budget_tokens=2048, ctx=eng.ctx, batch=a.batch, hit_rate=st["hit_rate"],
                           host_pool_gib=e.sparse.memory()["host_pool_bytes"] / 2**30, thrash_gib=a.thrash_gib,
                           summary=summary, profiled_steps=profiled, layers=rows, thp=thp))
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
