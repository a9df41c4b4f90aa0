"""Can a decode step read a projection's weight from L2 instead of HBM? (H200 experiment)

A sparse decode layer's selection kernels leave HBM partly idle, and the output projection that
follows attention (33.5 MB at Llama-3.1-8B shapes) would fit the 50 MB L2. This times the o
projection (hisa.ops.linear, 8 rows) inside CUDA graphs after: a cold L2 (256 MB read before it);
its weight read just before (evict_last); the weight read, then 67 MB of "KV" read with
evict_first or the default policy (what paged decode over 2,048 selected tokens x 8 rows reads).
Kernel times from the profiler, median over replays.

    python bench/l2_prefetch_gpu.py --out bench/results/l2_prefetch_gpu_h200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import REPO, header, write_json  # noqa: E402
from hisa.ops.linear import linear  # noqa: E402


@triton.jit
def touch_kernel(ptr, n, sink_ptr, BLOCK: tl.constexpr, POLICY: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(ptr + offs, mask=offs < n, other=0.0, eviction_policy=POLICY)
    s = tl.sum(x.to(tl.float32), axis=0)
    if s == 1.2345e-30:  # never: keeps the load
        tl.store(sink_ptr, s)


def touch(t: torch.Tensor, sink: torch.Tensor, policy: str = "") -> None:
    n = t.numel()
    block = 8192
    touch_kernel[(triton.cdiv(n, block),)](t, n, sink, BLOCK=block, POLICY=policy, num_warps=8)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/l2_prefetch_gpu.json")
    a = p.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    bf = torch.bfloat16
    x = torch.randn(8, 4096, device=dev, dtype=bf)
    weights = {"o 4096x4096": torch.randn(4096, 4096, device=dev, dtype=bf),
               "qkv 6144x4096": torch.randn(6144, 4096, device=dev, dtype=bf)}
    kv = torch.randn(67 * 2**20 // 2, device=dev, dtype=bf)
    flush = torch.randn(128 * 2**20, device=dev, dtype=bf)  # 256 MB
    sink = torch.zeros(1, device=dev)
    rows = []
    for wname, w in weights.items():
        seqs = {
            "cold": lambda: touch(flush, sink),
            "weight just read (evict_last)": lambda: touch(w, sink, "evict_last"),
            "weight (evict_last), then 67 MB evict_first": lambda: (touch(w, sink, "evict_last"),
                                                                    touch(kv, sink, "evict_first")),
            "weight (evict_last), then 67 MB default": lambda: (touch(w, sink, "evict_last"), touch(kv, sink)),
            "cold, then 67 MB evict_first": lambda: (touch(flush, sink), touch(kv, sink, "evict_first")),
        }
        for label, before in seqs.items():
            def body():
                before()
                linear(x, w)

            body()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(a.replays):
                    g.replay()
                torch.cuda.synchronize()
            ks = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gemv = [e.device_time_total for e in ks if "skinny_linear" in e.name]
            touches = [e.device_time_total for e in ks if "touch_kernel" in e.name]
            us = statistics.median(gemv)
            rows.append(dict(weight=wname, before=label, gemv_us=us, gemv_gb_s=w.numel() * 2 / us / 1e3,
                             touch_us_median=statistics.median(touches) if touches else None, replays=a.replays))
            print(f"{wname:14s} {label:46s} gemv {us:6.2f} us ({w.numel() * 2 / us / 1e3:6.0f} GB/s)", flush=True)
    write_json(a.out, dict(**header(dev, a.git_commit), l2_bytes=props.L2_cache_size, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
