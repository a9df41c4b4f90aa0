"""Decode throughput of dense vs hierarchical sparse attention, side by side in one run (issue 10's table).

A random-weight model of Llama-3.1-8B's shape (bf16, page 32) decodes after prompts of random
tokens. Every figure counts the tokens the engine actually produced per second of decode steps, and
each row records the running batch of every step it timed (a step that ran fewer requests than
asked is visible, not averaged away). Rows:

  * `--contexts` x `--batches`: dense and sparse (quest, budget 2,048, residency auto: all KV on the
    device while it fits, so nothing moves over PCIe) at the same batch;
  * `--max-context` (128K): each engine at the largest batch it can hold (dense: its device page
    pool; sparse: the pool plus the host pool, i.e. resident + host-backed requests), then the same
    engine after aborting down to `--small-batch` requests (so the 128K prefills are paid once);
  * for all-resident sparse steps, the GPU time over the byte bound (weights + selected KV + page
    metadata read per step, over the HBM bandwidth measured in this run by a device copy).

Usage (H200)::

    python bench/decode_speed_gpu.py --out bench/results/decode_speed_gpu.json
    python bench/decode_speed_gpu.py --preset tiny-llama --contexts 2048 --batches 2 --max-context 4096 \\
        --device cpu --steps 4 --out /tmp/smoke.json   # smoke
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, write_json  # noqa: E402

from hisa import LLM, SamplingParams  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hbm_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), median of 10."""
    if device.type != "cuda":
        return float("nan")
    n = 2 * 2**30
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    ms = []
    for _ in range(12):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ms.append(e0.elapsed_time(e1))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (statistics.median(ms[2:]) * 1e-3)


class Engine:
    """One LLM with `batch` random prompts of `ctx` tokens; decode steps timed one by one."""

    def __init__(self, loaded, *, device, ctx, batch, steps, sparse, page_size, chunk, util, seed=0):
        mc = loaded.config
        self.device, self.ctx, self.steps, self.page_size = device, ctx, steps, page_size
        self.spare = batch * -(-ctx // chunk) + 8  # prefill steps during which early requests decode
        t0 = time.perf_counter()
        self.llm = LLM(loaded=loaded, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
                       page_size=page_size, progress=False, max_model_len=ctx + steps + self.spare + page_size,
                       max_num_batched_tokens=chunk, max_num_seqs=max(batch, 1), seed=seed, sparse=sparse,
                       gpu_memory_utilization=util)
        self.build_s = time.perf_counter() - t0
        e = self.llm.engine
        gen = torch.Generator().manual_seed(seed)
        lo = min(1000, mc.vocab_size // 4)  # skip special tokens at the ends of the vocabulary
        # requests that finish their prompt first decode while the others prefill: enough tokens that
        # none of them finishes before the timed steps (the bench aborts them at the end)
        self.rids = [e.add_request(torch.randint(lo, mc.vocab_size - lo, (ctx,), generator=gen).tolist(),
                                   SamplingParams(max_tokens=steps + self.spare, ignore_eos=True))
                     for _ in range(batch)]
        self.prefill_s = 0.0
        while any(s.num_computed < s.num_prompt for s in e.scheduler.running) or e.scheduler.waiting:
            sync(device)
            t = time.perf_counter()
            e.step()
            sync(device)
            self.prefill_s += time.perf_counter() - t

    def decode(self, n_steps: int) -> dict:
        """Time n_steps decode steps; the first two (warm-up, CUDA-graph capture) are reported apart."""
        e = self.llm.engine
        rows = []
        for _ in range(n_steps):
            if not e.has_unfinished_requests():
                break
            running = len(e.scheduler.running)
            host_backed = sum(1 for s in e.scheduler.running if s.host_backed)
            sync(self.device)
            t = time.perf_counter()
            produced = sum(1 for _ in e.step())
            sync(self.device)
            rows.append(dict(s=time.perf_counter() - t, produced=produced, running=running, host_backed=host_backed))
        warm = rows[2:] or rows
        total_s = sum(r["s"] for r in warm)
        out = dict(steps_timed=len(warm), tokens_produced=sum(r["produced"] for r in warm),
                   tokens_per_s=sum(r["produced"] for r in warm) / total_s,
                   ms_per_step=statistics.median(r["s"] * 1e3 for r in warm),
                   running_batch_per_step=[r["running"] for r in warm],
                   host_backed_per_step=[r["host_backed"] for r in warm],
                   warmup_ms=[round(r["s"] * 1e3, 2) for r in rows[:2]])
        if e.sparse is not None:
            st = e.sparse.summary()
            out.update(hit_rate=st["hit_rate"], bytes_h2d_per_step=st["bytes_h2d_per_step"], misses=st["misses"],
                       resident_requests=st["resident_requests"], host_backed_requests=st["host_backed_requests"])
        return out

    def kernels_per_step(self) -> dict:
        """One eager decode step under the profiler: GPU kernels launched (per layer), and the step's
        device-to-host copies (the sampled tokens only, if the step is right)."""
        e = self.llm.engine
        graphs, e.runner.graphs = e.runner.graphs, None
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            e.step()
            sync(self.device)
        e.runner.graphs = graphs
        kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in ev.name.lower() and "memset" not in ev.name.lower()]
        d2h = [ev for ev in prof.events() if "DtoH" in ev.name or "Device -> Pageable" in ev.name
               or "Device -> Pinned" in ev.name]
        names: dict[str, int] = {}
        for ev in kernels:
            names[ev.name[:60]] = names.get(ev.name[:60], 0) + 1
        layers = self.llm.engine.model_config.num_layers
        return dict(kernels=len(kernels), kernels_per_layer=len(kernels) / layers, d2h_copies=len(d2h),
                    top_kernels=sorted(names.items(), key=lambda kv: -kv[1])[:25])

    def keep(self, n: int) -> None:
        """Abort all but the n oldest requests (the resident ones, under HBM-first admission)."""
        for rid in self.rids[n:]:
            self.llm.engine.abort_request(rid)
        self.rids = self.rids[:n]

    def memory(self) -> dict:
        e = self.llm.engine
        page_bytes = e.cache.nbytes // e.cache.num_pages
        out = dict(device_pool_gib=e.cache.nbytes / 2**30, device_pool_pages=e.cache.num_pages,
                   dense_request_gib=-(-(self.ctx + self.steps) // self.page_size) * page_bytes / 2**30)
        if e.sparse is not None:
            m = e.sparse.memory()
            seqs = list(e.scheduler.running)
            per = [e.sparse.device_bytes(s) for s in seqs]
            out.update(host_pool_gib=m["host_pool_bytes"] / 2**30, metadata_gib=m["metadata_bytes"] / 2**30,
                       host_in_use_gib=m["host_bytes_in_use"] / 2**30,
                       host_backed_kv_gib_per_request=min((p["kv"] for s, p in zip(seqs, per) if s.host_backed),
                                                          default=0) / 2**30,
                       metadata_gib_per_request=max((p["metadata"] for p in per), default=0) / 2**30)
        return out

    def close(self) -> None:
        e = self.llm.engine
        for rid in list(self.rids):
            e.abort_request(rid)
        if e.runner.graphs is not None:
            e.runner.graphs.close()
        del self.llm
        gc.collect()  # captured graphs hold the engine in reference cycles
        torch.cuda.empty_cache() if self.device.type == "cuda" else None


def largest_batch(loaded, *, device, ctx, steps, sparse, page_size, util) -> int:
    """How many requests of ctx + steps tokens one engine holds at once (no request preempted)."""
    llm = LLM(loaded=loaded, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
              page_size=page_size, progress=False, max_model_len=ctx + steps + page_size, sparse=sparse,
              gpu_memory_utilization=util, max_num_seqs=1)
    e = llm.engine
    per = -(-(ctx + steps + 1) // page_size) + 1  # pages of one request, one spare for the scheduler's reserve
    dense_fit = e.allocator.num_pages // per
    if sparse is None:
        n = dense_fit
    else:
        host_fit = e.sparse.host_allocator.num_pages // per
        buf = e.sparse.buffer_pages
        n = 0
        for h in range(0, host_fit + 1):  # h host-backed requests, the rest resident
            if h * buf > e.allocator.num_pages:
                break
            n = max(n, h + (e.allocator.num_pages - h * buf) // per)
        n = min(n, sparse.max_sparse_requests)
    del llm, e
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return n


def byte_bound(loaded, *, batch, budget, ctx, page_size, meta_bytes_per_page_layer, hbm) -> float:
    """Seconds a decode step must take at least: weights + selected KV + page metadata, read once."""
    mc = loaded.config
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    kv_token_layer = 2 * mc.num_kv_heads * mc.head_dim * 2  # bf16
    selected = batch * mc.num_layers * min(budget, ctx) * kv_token_layer
    metadata = batch * mc.num_layers * -(-ctx // page_size) * meta_bytes_per_page_layer
    return (weights + selected + metadata) / hbm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--contexts", default="32768")
    p.add_argument("--batches", default="8")
    p.add_argument("--max-context", type=int, default=131072, help="the context of the largest-batch rows (0: skip)")
    p.add_argument("--small-batch", type=int, default=4, help="batch of the rows after the aborts at --max-context")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--algorithm", default="quest")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--host-pool-gb", type=float, default=None)
    p.add_argument("--util", type=float, default=0.9, help="gpu_memory_utilization of both engines")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true", help="count kernels per layer of one eager step (first rows)")
    p.add_argument("--host-rows", action="store_true", help="also run the first rows with every request host-backed")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/decode_speed_gpu.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(f"random:{a.preset}", device=device, dtype=dtype, progress=False)
    hbm = hbm_bandwidth(device)
    print(f"loaded random:{a.preset}; HBM copy bandwidth {hbm / 1e12:.2f} TB/s", flush=True)
    rows = []

    def sparse_cfg(batch, residency="auto"):
        return SparseConfig(algorithm=a.algorithm, token_budget=a.budget, min_prompt_len=1024,
                            host_pool_gb=a.host_pool_gb, max_sparse_requests=max(batch, 1), residency=residency)

    def record(label, ctx, eng, res, **extra):
        row = dict(row=label, context=ctx, batch_asked=len(eng.rids), prefill_s=eng.prefill_s, **res,
                   memory=eng.memory(), **extra)
        rows.append(row)
        print(f"{label:28s} ctx={ctx:6d} running={max(res['running_batch_per_step'])} "
              f"{res['ms_per_step']:8.2f} ms/step {res['tokens_per_s']:9.1f} tok/s"
              + (f"  hit {res['hit_rate']:.3f}, {res['bytes_h2d_per_step'] / 2**20:.1f} MiB H2D/step"
                 if "hit_rate" in res else ""), flush=True)
        return row

    meta = None
    for ctx in (int(c) for c in a.contexts.split(",")):
        for batch in (int(b) for b in a.batches.split(",")):
            pair = {}
            variants = [("dense", None), (a.algorithm, sparse_cfg(batch))]
            if a.host_rows:  # the same batch with every request host-backed (the PCIe regime)
                variants.append((f"{a.algorithm} host", sparse_cfg(batch, "host")))
            for name, sp in variants:
                eng = Engine(loaded, device=device, ctx=ctx, batch=batch, steps=a.steps + 4, sparse=sp,
                             page_size=a.page_size, chunk=a.chunk, util=a.util)
                res = eng.decode(a.steps)
                extra = {}
                if a.profile:
                    extra["profile"] = eng.kernels_per_step()
                    print(f"  {extra['profile']['kernels_per_layer']:.1f} kernels per layer, "
                          f"{extra['profile']['d2h_copies']} D2H copies per step", flush=True)
                if sp is not None:
                    alg = eng.llm.engine.sparse.algorithm
                    meta = alg.metadata_bytes_per_page() // loaded.config.num_layers
                    if not any(res["host_backed_per_step"]):
                        bound = byte_bound(loaded, batch=batch, budget=a.budget, ctx=ctx, page_size=a.page_size,
                                           meta_bytes_per_page_layer=meta, hbm=hbm)
                        extra = dict(byte_bound_ms=bound * 1e3, over_byte_bound=res["ms_per_step"] / (bound * 1e3))
                pair[name] = record(f"{name} b{batch}", ctx, eng, res, **extra)
                eng.close()
            for name in pair:
                if name != "dense":
                    pair[name]["speedup_vs_dense"] = pair[name]["tokens_per_s"] / pair["dense"]["tokens_per_s"]

    if a.max_context:
        ctx = a.max_context
        biggest = {}
        for name, sp_fn in (("dense", lambda b: None), (a.algorithm, sparse_cfg)):
            sp_probe = sp_fn(64)
            n = largest_batch(loaded, device=device, ctx=ctx, steps=a.steps, sparse=sp_probe, page_size=a.page_size,
                              util=a.util)
            sp = sp_fn(n)
            if sp is not None:  # the metadata of n slots, not 64: the pool grows, so ask again
                n = largest_batch(loaded, device=device, ctx=ctx, steps=a.steps, sparse=sp, page_size=a.page_size,
                                  util=a.util)
                sp = sp_fn(n)
            print(f"{name}: largest batch at {ctx} tokens = {n}", flush=True)
            eng = Engine(loaded, device=device, ctx=ctx, batch=n, steps=2 * a.steps, sparse=sp,
                         page_size=a.page_size, chunk=a.chunk, util=a.util)
            biggest[name] = record(f"{name} largest", ctx, eng, eng.decode(a.steps), largest_batch=n)
            eng.keep(a.small_batch)
            res = eng.decode(a.steps)
            extra = {}
            if sp is not None and not any(res["host_backed_per_step"]):
                bound = byte_bound(loaded, batch=a.small_batch, budget=a.budget, ctx=ctx, page_size=a.page_size,
                                   meta_bytes_per_page_layer=meta, hbm=hbm)
                extra = dict(byte_bound_ms=bound * 1e3, over_byte_bound=res["ms_per_step"] / (bound * 1e3))
            biggest[f"{name} small"] = record(f"{name} b{a.small_batch}", ctx, eng, res, **extra)
            eng.close()
        s, d = biggest[a.algorithm], biggest["dense"]
        s["largest_batch_vs_dense"] = s["largest_batch"] / d["largest_batch"]
        s["tokens_per_s_vs_dense_best"] = s["tokens_per_s"] / max(d["tokens_per_s"], biggest["dense small"]["tokens_per_s"])
        small = biggest[f"{a.algorithm} small"]
        small["speedup_vs_dense"] = small["tokens_per_s"] / biggest["dense small"]["tokens_per_s"]

    print(f"\n{'row':22s} {'ctx':>7s} {'batch':>5s} {'ms/step':>8s} {'tok/s':>8s} {'x dense':>8s} {'hit':>6s} "
          f"{'MiB H2D':>8s} {'x bound':>8s}")
    for r in rows:
        print(f"{r['row']:22s} {r['context']:7d} {max(r['running_batch_per_step']):5d} {r['ms_per_step']:8.2f} "
              f"{r['tokens_per_s']:8.1f} {r.get('speedup_vs_dense', float('nan')):8.2f} "
              f"{r.get('hit_rate', float('nan')):6.3f} {r.get('bytes_h2d_per_step', 0) / 2**20:8.1f} "
              f"{r.get('over_byte_bound', float('nan')):8.2f}")
    write_json(a.out, dict(**header(device, a.git_commit), model=f"random:{a.preset}", dtype=str(dtype),
                           page_size=a.page_size, budget_tokens=a.budget, algorithm=a.algorithm, steps=a.steps,
                           hbm_copy_bytes_per_s=hbm, rows=rows))
    _plot(rows, a.out.with_suffix(".png"))
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['row']}\n{r['context'] // 1024}K x{max(r['running_batch_per_step'])}" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
           color=["tab:gray" if r["row"].startswith("dense") else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s (produced)")
    ax.set_title("dense vs hierarchical sparse decode (random Llama-3.1-8B shape, bf16)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
