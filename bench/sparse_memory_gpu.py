"""The hierarchical sparse cache on a GPU: device bytes per request, bytes moved, hit rate, I/O bandwidth.

A random-weight model of Llama-3.1-8B's shape (bf16) runs one long prompt per context length,
side by side in one process:
  * dense: the whole KV in the paged device cache;
  * sparse (quest by default): the full KV in the pinned host pool, an LRU buffer of
    buffer_ratio x budget pages per layer on the device, only misses loaded each step.
For each it records prefill time, decode ms/step (median), the device bytes one request holds (dense:
its KV pages; sparse: the KV buffer and the algorithm's metadata, reported apart), bytes moved per
decode step (H2D loads, D2H offload), the hit rate (all steps, and without the first, cold step).

Then the I/O kernel alone: a gather of random pages straight from pinned host memory (UVA) into
device rows, next to a bulk pinned copy of the same number of bytes and to index_select on the CPU
+ copy, all timed with CUDA events in this run.

Random weights give near-uniform attention, so selections move more between steps than with a
trained model: the hit rate here is a pessimistic figure (a trained SmolLM2 reaches ~0.85–0.95 on CPU).

Usage (H100)::

    python bench/sparse_memory_gpu.py --contexts 32768,131072 --out bench/results/sparse_memory_gpu.json
    python bench/sparse_memory_gpu.py --preset tiny-llama --contexts 2048 --device cpu --steps 4   # smoke
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

from hisa import LLM, SamplingParams  # noqa: E402
from hisa.kvcache.io import load_pages  # noqa: E402
from hisa.kvcache.paged_cache import PagedKVCache  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(loaded, *, device, dtype, ctx, steps, batch, page_size, sparse: SparseConfig | None, chunk, seed,
            profile: Path | None = None, cuda_graphs: bool = True):
    """One engine, `batch` prompts of `ctx` random tokens, `steps` decode steps; returns figures
    (and the generated token ids, under "tokens")."""
    mc = loaded.config
    kw = dict(loaded=loaded, device=device.type, dtype=dtype, page_size=page_size, progress=False,
              max_model_len=ctx + steps + page_size, max_num_batched_tokens=chunk, max_num_seqs=batch, seed=seed,
              cuda_graphs=cuda_graphs, prefix_cache=False)
    page_bytes = PagedKVCache.page_bytes(num_layers=mc.num_layers, page_size=page_size, num_kv_heads=mc.num_kv_heads,
                                         head_dim=mc.head_dim, dtype=getattr(torch, dtype))
    if sparse is None:
        kw["num_kv_pages"] = batch * (-(-(ctx + steps + 1) // page_size)) + 1
    else:
        # the device pool: short prompts, and each host-backed request's LRU buffer + tail page
        buffer = min(sparse.buffer_slots(page_size), -(-(ctx + steps + page_size) // page_size)) + 1
        kw["num_kv_pages"] = max(64, -(-sparse.min_prompt_len // page_size) + 1) + batch * buffer
        kw["sparse"] = sparse
    llm = LLM(**kw)
    engine = llm.engine
    gen = torch.Generator().manual_seed(seed)
    rids = []
    for _ in range(batch):
        lo = min(1000, mc.vocab_size // 4)  # skip special tokens at the ends of the vocabulary
        ids = torch.randint(lo, mc.vocab_size - lo, (ctx,), generator=gen).tolist()
        rids.append(engine.add_request(ids, SamplingParams(max_tokens=steps, ignore_eos=True)))
    tokens = {}
    prefill_s, step_ms, per_request = 0.0, [], {}
    while engine.has_unfinished_requests():
        decoding = all(s.num_computed >= s.num_prompt for s in engine.scheduler.running) and \
            not engine.scheduler.waiting and engine.scheduler.running
        sync(device)
        prof = None
        if profile is not None and decoding and len(step_ms) == 4:  # one warm decode step under the profiler
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
            prof.__enter__()
        t0 = time.perf_counter()
        for o in checked_step(engine):
            if o.finished:
                tokens[o.request_id] = list(o.token_ids)
        sync(device)
        dt = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            profile.write_text(table + "\n")
            print(table, flush=True)
        if decoding:
            step_ms.append(dt * 1e3)
        else:
            prefill_s += dt
        for seq in engine.scheduler.running:
            if sparse is None:
                per_request = dict(kv=len(seq.pages) * page_bytes, metadata=0)
            elif seq.sparse:
                b = engine.sparse.device_bytes(seq)
                per_request = dict(kv=b["kv"], metadata=b["metadata"])
    out = dict(mode="dense" if sparse is None else sparse.algorithm, context=ctx, batch=batch, prefill_s=prefill_s,
               decode_steps=len(step_ms), decode_ms_per_step=statistics.median(step_ms[1:] or step_ms),
               first_decode_ms=step_ms[0], tokens_per_s=batch * 1e3 / statistics.median(step_ms[1:] or step_ms),
               device_bytes_per_request=per_request["kv"] + per_request["metadata"],
               device_kv_bytes_per_request=per_request["kv"], device_metadata_bytes_per_request=per_request["metadata"],
               cuda_graphs=engine.runner.graphs is not None,
               tokens=[tokens.get(r) for r in rids])
    if engine.runner.graphs is not None:
        out.update(graph_captures=engine.runner.graphs.captures, graph_replays=engine.runner.graphs.replays)
    if sparse is not None:
        st = engine.sparse.summary()
        out.update(hit_rate=st["hit_rate"], bytes_h2d_per_step=st["bytes_h2d_per_step"],
                   host_bytes_in_use=st["peak_host_bytes_in_use"], residency=sparse.residency,
                   budget_tokens=sparse.token_budget, buffer_ratio=sparse.buffer_ratio)
    del llm, engine
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return out


def io_bandwidth(device, *, row_bytes: int, rows: int, pool_rows: int, reps: int, dtype=torch.bfloat16):
    """GB/s of: UVA gather (our I/O kernel), bulk pinned copy, CPU index_select + copy — same bytes."""
    elt = torch.empty((), dtype=dtype).element_size()
    width = row_bytes // elt
    pin = device.type == "cuda"
    host = torch.empty(pool_rows, width, dtype=dtype, pin_memory=pin)
    host.view(torch.int16).copy_(torch.randint(-2**15, 2**15 - 1, (pool_rows, width), dtype=torch.int16))
    dev = torch.empty(rows, width, dtype=dtype, device=device)
    src = torch.randperm(pool_rows)[:rows]
    src_d, dst_d = src.to(device), torch.arange(rows, device=device)
    nbytes = rows * row_bytes

    def timed(fn):
        fn()
        sync(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_uva = timed(lambda: load_pages(host, dev, src_d, dst_d))
    assert torch.equal(dev.cpu().view(torch.int16), host[src].view(torch.int16)), "I/O kernel gathered the wrong rows"
    contiguous = host[:rows]
    t_bulk = timed(lambda: dev.copy_(contiguous, non_blocking=True))
    t_index = timed(lambda: dev.copy_(host.index_select(0, src), non_blocking=False))
    return dict(row_bytes=row_bytes, rows=rows, bytes=nbytes, uva_gather_gbps=nbytes / t_uva / 1e9,
                bulk_pinned_copy_gbps=nbytes / t_bulk / 1e9, cpu_index_select_copy_gbps=nbytes / t_index / 1e9,
                uva_over_bulk=t_bulk / t_uva)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.1-8b", help="random-weight model shape (random:<preset>)")
    p.add_argument("--contexts", default="32768,131072", help="prompt lengths (clamped to the model's context)")
    p.add_argument("--dense-contexts", default="32768", help="contexts where the dense engine also runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="decode steps per run")
    p.add_argument("--algorithm", default="quest")
    p.add_argument("--budget", type=int, default=2048, help="token budget")
    p.add_argument("--buffer-ratio", type=float, default=2.0)
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens (prefill chunk)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--io-rows", type=int, default=2048)
    p.add_argument("--io-reps", type=int, default=20)
    p.add_argument("--profile", type=Path, default=None,
                   help="write a torch.profiler table of one warm sparse decode step to this file")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/sparse_memory_gpu.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    print(f"loading random:{a.preset} ({dtype}) on {device} ...", flush=True)
    t = time.perf_counter()
    loaded = load_model(f"random:{a.preset}", device=device, dtype=getattr(torch, dtype), progress=False)
    print(f"  {time.perf_counter() - t:.1f} s", flush=True)
    mc = loaded.config
    limit = mc.max_position_embeddings - a.steps - a.page_size
    contexts = [min(int(c), limit) for c in a.contexts.split(",")]
    dense_ctx = {min(int(c), limit) for c in a.dense_contexts.split(",") if c}
    token_bytes = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    runs = []
    for ctx in contexts:
        if ctx in dense_ctx:
            print(f"dense  ctx={ctx} ...", flush=True)
            runs.append(run_one(loaded, device=device, dtype=dtype, ctx=ctx, steps=a.steps, batch=a.batch,
                                page_size=a.page_size, sparse=None, chunk=a.chunk, seed=0))
        pool_gb = a.batch * (ctx + a.steps + 2 * a.page_size) * token_bytes * 1.02 / 2**30 + 0.25
        # host-backed: the O(budget) device footprint this bench measures (residency auto would keep a
        # request that fits all on the device)
        cfg = SparseConfig(algorithm=a.algorithm, token_budget=a.budget, buffer_ratio=a.buffer_ratio,
                           min_prompt_len=1024, host_pool_gb=pool_gb, max_sparse_requests=a.batch, residency="host")
        print(f"{a.algorithm:6s} ctx={ctx} (host pool {pool_gb:.1f} GiB) ...", flush=True)
        runs.append(run_one(loaded, device=device, dtype=dtype, ctx=ctx, steps=a.steps, batch=a.batch,
                            page_size=a.page_size, sparse=cfg, chunk=a.chunk, seed=0,
                            profile=a.profile if ctx == contexts[0] else None))
        # what dense would hold for this context (computed: the same pages the dense engine allocates)
        runs[-1]["dense_device_bytes_per_request"] = -(-(ctx + a.steps) // a.page_size) * a.page_size * token_bytes
        runs[-1]["sparse_over_dense"] = runs[-1]["device_bytes_per_request"] / runs[-1]["dense_device_bytes_per_request"]
    row_bytes = a.page_size * 2 * mc.num_kv_heads * mc.head_dim * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    io = io_bandwidth(device, row_bytes=row_bytes, rows=a.io_rows, pool_rows=4 * a.io_rows, reps=a.io_reps)

    def mib(x):
        return f"{x / 2**20:9.1f}"

    print(f"\n{'mode':8s} {'context':>8s} {'dev MiB/req':>11s} {'KV MiB':>9s} {'meta MiB':>9s} {'x dense':>8s} "
          f"{'ms/step':>8s} {'tok/s':>7s} {'hit':>6s} {'MiB H2D/step':>12s} {'prefill s':>9s}")
    for r in runs:
        sp = r["mode"] != "dense"
        print(f"{r['mode']:8s} {r['context']:8d} {mib(r['device_bytes_per_request']):>11s} "
              f"{mib(r['device_kv_bytes_per_request'])} {mib(r['device_metadata_bytes_per_request'])} "
              f"{(r.get('sparse_over_dense', 1.0)):8.3f} {r['decode_ms_per_step']:8.2f} {r['tokens_per_s']:7.1f} "
              f"{(r['hit_rate'] if sp else float('nan')):6.3f} "
              f"{(mib(r['bytes_h2d_per_step']) if sp else '-'):>12s} {r['prefill_s']:9.2f}")
    print(f"\nI/O: {io['rows']} random rows of {io['row_bytes'] // 1024} KiB: UVA gather {io['uva_gather_gbps']:.1f} GB/s, "
          f"bulk pinned copy {io['bulk_pinned_copy_gbps']:.1f} GB/s (ratio {io['uva_over_bulk']:.2f}), "
          f"CPU index_select + copy {io['cpu_index_select_copy_gbps']:.1f} GB/s")
    write_json(a.out, dict(**header(device, a.git_commit), model=f"random:{a.preset}", dtype=dtype,
                           page_size=a.page_size, runs=runs, io=io))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
