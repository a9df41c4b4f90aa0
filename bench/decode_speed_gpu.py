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
    metadata read per step, over the HBM bandwidth measured in this run by a device copy). The
    weights are those a step reads: an untied input embedding counts one row per request (runs
    before 2026-12-02 counted all of it, 1.05 GB at Llama-3.1-8B: their bound was ~0.25 ms too high and
    their ratio to it ~6% too low).

`--overlap` (default auto: on for CUDA, as the engine) runs the engines in overlap mode
(`hisa.engine.overlap`): a step() launches the next decode step and returns the tokens of the one
before, so the timed steps are not synced one by one (that would serialize the host and device work
again): the time of a step is the time between two step() returns, and tokens/s counts the tokens
the calls returned. Each row records `overlap` (whether the engine ran in overlap mode).

Usage (H200)::

    python bench/decode_speed_gpu.py --out bench/results/decode_speed_gpu.json
    python bench/decode_speed_gpu.py --preset tiny-llama --contexts 2048 --batches 2 --max-context 4096 \\
        --device cpu --steps 4 --out /tmp/smoke.json   # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, checked_step, header, step_weight_bytes, write_json  # noqa: E402

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

    def __init__(self, loaded, *, device, ctx, batch, steps, sparse, page_size, chunk, util, seed=0, overlap="auto"):
        mc = loaded.config
        self.spare = batch * -(-ctx // chunk) + 8  # prefill steps during which early requests decode
        # a context at the model's limit (128K = 131,072) leaves room for the tokens it will generate
        ctx = min(ctx, mc.max_position_embeddings - steps - self.spare - page_size)
        self.device, self.ctx, self.steps, self.page_size = device, ctx, steps, page_size
        t0 = time.perf_counter()
        self.llm = LLM(loaded=loaded, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
                       page_size=page_size, progress=False, max_model_len=ctx + steps + self.spare + page_size,
                       max_num_batched_tokens=chunk, max_num_seqs=max(batch, 1), seed=seed, sparse=sparse, prefix_cache=False,
                       gpu_memory_utilization=util, overlap=overlap)
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
            checked_step(e)
            sync(device)
            self.prefill_s += time.perf_counter() - t

    def decode(self, n_steps: int) -> dict:
        """Time n_steps decode steps; the first two (warm-up, CUDA-graph capture) are reported apart."""
        e = self.llm.engine
        rows = []
        start = None  # the sparse counters when the timed steps begin (after the two warm-up steps)
        sync(self.device)
        t = time.perf_counter()
        for i in range(n_steps):
            if not e.has_unfinished_requests():
                break
            if i == 2 and e.sparse is not None:
                start = e.sparse.summary()  # reads device counters: a sync, outside the timed steps
                t = time.perf_counter()
            running = len(e.scheduler.running)
            host_backed = sum(1 for s in e.scheduler.running if s.host_backed)
            if not e.overlap:  # overlap mode: no sync per step; a step's time is the time between returns
                sync(self.device)
                t = time.perf_counter()
            produced = len(checked_step(e))
            if not e.overlap:
                sync(self.device)
            now = time.perf_counter()
            rows.append(dict(s=now - t, produced=produced, running=running, host_backed=host_backed))
            t = now
        warm = rows[2:] or rows
        total_s = sum(r["s"] for r in warm)
        out = dict(steps_timed=len(warm), tokens_produced=sum(r["produced"] for r in warm),
                   tokens_per_s=sum(r["produced"] for r in warm) / total_s,
                   ms_per_step=statistics.median(r["s"] * 1e3 for r in warm),
                   # the step period (what tok/s is made of); in overlap mode a step's own interval also
                   # holds parts of its neighbours, so the median and the mean differ
                   ms_per_step_mean=total_s * 1e3 / max(1, len(warm)),
                   running_batch_per_step=[r["running"] for r in warm],
                   host_backed_per_step=[r["host_backed"] for r in warm],
                   warmup_ms=[round(r["s"] * 1e3, 2) for r in rows[:2]], overlap=e.overlap)
        if e.sparse is not None:
            st = e.sparse.summary()
            # hits, misses and bytes of the timed steps only (the totals since start also count the
            # steps run while later requests prefilled, with fewer host-backed rows)
            st0 = start or dict(selected_pages=0, misses=0, bytes_h2d=0)
            sel, miss = st["selected_pages"] - st0["selected_pages"], st["misses"] - st0["misses"]
            moved = (st["bytes_h2d"] - st0["bytes_h2d"]) / max(1, len(warm))
            # the host-backed rows' own hit rate (resident rows never miss, and dilute `hit_rate`)
            host_sel = (sum(r["host_backed"] for r in warm) * e.model_config.num_layers
                        * (e.sparse.config.token_budget // self.page_size))
            out.update(hit_rate=(sel - miss) / sel if sel else 1.0, bytes_h2d_per_step=moved,
                       host_backed_hit_rate=1 - miss / host_sel if host_sel else None,
                       misses=miss, pcie_gb_s=moved / (total_s / max(1, len(warm))) / 1e9,
                       hit_rate_since_start=st["hit_rate"], bytes_h2d_per_step_since_start=st["bytes_h2d_per_step"],
                       resident_requests=st["resident_requests"], host_backed_requests=st["host_backed_requests"])
        return out

    def kernels_per_step(self) -> dict:
        """One eager decode step under the profiler: GPU kernels launched (per layer), and the step's
        device-to-host copies (the sampled tokens only, if the step is right)."""
        e = self.llm.engine
        graphs, e.runner.graphs = e.runner.graphs, None
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            checked_step(e)
            sync(self.device)
        e.runner.graphs = graphs
        kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in ev.name.lower() and "memset" not in ev.name.lower()]
        d2h = [ev for ev in prof.events() if "DtoH" in ev.name or "Device -> Pageable" in ev.name
               or "Device -> Pinned" in ev.name]
        names: dict[str, list] = {}
        for ev in kernels:
            entry = names.setdefault(ev.name[:60], [0, 0.0])
            entry[0] += 1
            entry[1] += ev.device_time_total / 1e3  # ms
        layers = self.llm.engine.model_config.num_layers
        return dict(kernels=len(kernels), kernels_per_layer=len(kernels) / layers, d2h_copies=len(d2h),
                    kernel_ms=sum(v[1] for v in names.values()),
                    top_kernels=sorted(([k, n, round(ms, 3)] for k, (n, ms) in names.items()), key=lambda x: -x[2])[:25],
                    **(self.graph_timeline() if e.runner.graphs is not None else {}))

    def graph_timeline(self, steps: int = 3) -> dict:
        """Where a replayed (CUDA-graph) step's time goes, from the profiler's GPU timeline, medians
        over `steps` steps: wall (the step on the host, synced), span (first kernel start to last
        kernel end), busy (kernel time); wall - span is host time the GPU waits through, span - busy
        the gaps between the graph's kernels."""
        e = self.llm.engine
        walls, spans, busys = [], [], []
        for _ in range(steps):
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                sync(self.device)
                t = time.perf_counter()
                checked_step(e)
                sync(self.device)
                walls.append((time.perf_counter() - t) * 1e3)
            ks = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
                  and "memcpy" not in ev.name.lower() and "memset" not in ev.name.lower()]
            if not ks:  # a profiler that does not see kernels inside graph replays
                return {}
            spans.append((max(ev.time_range.end for ev in ks) - min(ev.time_range.start for ev in ks)) / 1e3)
            busys.append(sum(ev.device_time_total for ev in ks) / 1e3)
        med = statistics.median
        return dict(graph_wall_ms=med(walls), graph_span_ms=med(spans), graph_busy_ms=med(busys))

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
    """How many requests of about ctx + steps tokens one engine holds at once (none preempted).

    Counted from the pools of an engine built the way `Engine` builds it (max_model_len at most the
    model's), with each request charged its max_model_len's pages, so the timed run never preempts."""
    max_len = min(ctx + steps + 1100 + page_size, loaded.config.max_position_embeddings)  # 1100: Engine.spare's bound
    llm = LLM(loaded=loaded, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
              page_size=page_size, progress=False, max_model_len=max_len, sparse=sparse,
              gpu_memory_utilization=util, max_num_seqs=1, prefix_cache=False)
    e = llm.engine
    per = -(-max_len // page_size) + 1  # pages of one request, one spare for the scheduler's reserve
    if sparse is None:
        n = e.allocator.num_pages // per
    else:
        host_fit = e.sparse.host_allocator.num_pages // per
        buf = e.sparse.buffer_pages
        n = 0
        for h in range(0, host_fit + 1):  # h host-backed requests, the rest resident
            if h * buf > e.allocator.num_pages:
                break
            n = max(n, h + (e.allocator.num_pages - h * buf) // per)
    del llm, e
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return n


def byte_bound(loaded, *, batch, budget, ctx, page_size, meta_bytes_per_page_layer, hbm) -> float:
    """Seconds a decode step must take at least: weights + selected KV + page metadata, read once.

    The weights a step reads: every parameter except an input embedding table that is not also the
    lm_head (a step reads one row of it per request, counted as such)."""
    mc = loaded.config
    weights = step_weight_bytes(loaded.model, batch)
    kv_token_layer = 2 * mc.num_kv_heads * mc.head_dim * 2  # bf16
    selected = batch * mc.num_layers * min(budget, ctx) * kv_token_layer
    metadata = batch * mc.num_layers * -(-ctx // page_size) * meta_bytes_per_page_layer
    return (weights + selected + metadata) / hbm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--contexts", default="32768", help="comma-separated; empty: none")
    p.add_argument("--batches", default="8")
    p.add_argument("--max-context", type=int, default=131072, help="the context of the largest-batch rows (0: skip)")
    p.add_argument("--largest", default="dense,sparse",
                   help="which engines run the --max-context rows: dense, sparse or both (split a long run in two)")
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
    p.add_argument("--skip-dense", action="store_true", help="no dense row at --contexts x --batches")
    p.add_argument("--overlap", default="auto", choices=("auto", "on", "off"),
                   help="overlap mode of the engines (auto: on for CUDA)")
    p.add_argument("--decode-streams", default="2",
                   help="SparseConfig.decode_streams of the sparse rows at --contexts x --batches; comma-separated "
                        "values give one row each, side by side (A/B)")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/decode_speed_gpu.json")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: one engine, in a child process
    a = p.parse_args(argv)
    if a.job:
        return run_job(a, json.loads(a.job))
    device = torch.device(a.device)
    hbm = hbm_bandwidth(device)
    print(f"HBM copy bandwidth {hbm / 1e12:.2f} TB/s", flush=True)
    rows = []

    def job(**spec):
        """One engine per child process: its memory (device pool, pinned host pool, graph pools) is the
        operating system's again when it exits, and a crash loses that row only."""
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--job",
                   json.dumps(dict(spec, hbm=hbm, out=f.name))]
            proc = subprocess.run(cmd, text=True, capture_output=True)
            if proc.returncode != 0:
                print(f"  job {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                got = [dict(row=spec.get("name"), context=spec.get("ctx"), error=proc.stderr[-2000:],
                            running_batch_per_step=[0], ms_per_step=float("nan"), tokens_per_s=float("nan"))]
            else:
                got = json.loads(Path(f.name).read_text())
        for r in got:
            _print_row(r)
        rows.extend(got)
        write_json(a.out, dict(**header(device, a.git_commit), model=f"random:{a.preset}", dtype="bfloat16",
                               page_size=a.page_size, budget_tokens=a.budget, algorithm=a.algorithm, steps=a.steps,
                               hbm_copy_bytes_per_s=hbm, partial=True, rows=rows))  # what a cut-short run keeps
        return {r["row"]: r for r in got}

    for ctx in (int(c) for c in a.contexts.split(",") if c):  # --contexts "": only the largest-batch rows
        for batch in (int(b) for b in a.batches.split(",")):
            pair = {} if a.skip_dense else job(kind="fixed", ctx=ctx, batch=batch, name="dense", residency=None)
            streams = [int(x) for x in a.decode_streams.split(",")]
            for n in streams:
                name = a.algorithm if len(streams) == 1 else f"{a.algorithm} s{n}"
                pair.update(job(kind="fixed", ctx=ctx, batch=batch, name=name, residency="auto", streams=n))
            if a.host_rows:  # the same batch with every request host-backed (the PCIe regime)
                pair.update(job(kind="fixed", ctx=ctx, batch=batch, name=f"{a.algorithm} host", residency="host"))
            ref = pair.get(f"dense b{batch}", {}).get("tokens_per_s")
            for label, r in pair.items():
                if not label.startswith("dense") and ref:
                    r["speedup_vs_dense"] = r["tokens_per_s"] / ref

    if a.max_context:
        ctx = a.max_context
        which = set(a.largest.split(","))
        dense = job(kind="largest", ctx=ctx, name="dense", residency=None) if "dense" in which else {}
        sparse = job(kind="largest", ctx=ctx, name=a.algorithm, residency="auto") if "sparse" in which else {}
        d, s_ = dense.get("dense largest"), sparse.get(f"{a.algorithm} largest")
        ds, ss = dense.get(f"dense b{a.small_batch}"), sparse.get(f"{a.algorithm} b{a.small_batch}")
        if d and s_ and "largest_batch" in d and "largest_batch" in s_:
            s_["largest_batch_vs_dense"] = s_["largest_batch"] / d["largest_batch"]
            best = max(d["tokens_per_s"], ds["tokens_per_s"] if ds else 0.0)
            s_["tokens_per_s_vs_dense_best"] = s_["tokens_per_s"] / best
        if ds and ss and ds.get("tokens_per_s"):
            ss["speedup_vs_dense"] = ss["tokens_per_s"] / ds["tokens_per_s"]

    print(f"\n{'row':22s} {'ctx':>7s} {'batch':>5s} {'ms/step':>8s} {'tok/s':>8s} {'x dense':>8s} {'hit':>6s} "
          f"{'MiB H2D':>8s} {'x bound':>8s}")
    for r in rows:
        if "error" in r:
            continue
        print(f"{r['row']:22s} {r['context']:7d} {max(r['running_batch_per_step']):5d} {r['ms_per_step']:8.2f} "
              f"{r['tokens_per_s']:8.1f} {r.get('speedup_vs_dense', float('nan')):8.2f} "
              f"{r.get('hit_rate', float('nan')):6.3f} {r.get('bytes_h2d_per_step', 0) / 2**20:8.1f} "
              f"{r.get('over_byte_bound', float('nan')):8.2f}")
    rows = [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]
    write_json(a.out, dict(**header(device, a.git_commit), model=f"random:{a.preset}", dtype="bfloat16",
                           page_size=a.page_size, budget_tokens=a.budget, algorithm=a.algorithm, steps=a.steps,
                           hbm_copy_bytes_per_s=hbm, rows=rows))
    _plot(rows, a.out.with_suffix(".png"))
    return 0


def run_job(a, spec: dict) -> int:
    """Child process: build one engine, time it, write its rows (JSON) to spec["out"]."""
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(f"random:{a.preset}", device=device, dtype=dtype, progress=False)
    ctx, name, hbm = spec["ctx"], spec["name"], spec["hbm"]
    overlap = {"auto": "auto", "on": True, "off": False}[a.overlap]

    def cfg(batch):
        if spec["residency"] is None:
            return None
        return SparseConfig(algorithm=a.algorithm, token_budget=a.budget, min_prompt_len=1024,
                            host_pool_gb=a.host_pool_gb, max_sparse_requests=max(batch, 1),
                            residency=spec["residency"],
                            decode_streams=spec.get("streams", int(a.decode_streams.split(",")[0])))

    def row(label, eng, res, batch, **extra):
        if eng.llm.engine.sparse is not None and not any(res["host_backed_per_step"]):
            meta = eng.llm.engine.sparse.algorithm.metadata_bytes_per_page() // loaded.config.num_layers
            bound = byte_bound(loaded, batch=batch, budget=a.budget, ctx=ctx, page_size=a.page_size,
                               meta_bytes_per_page_layer=meta, hbm=hbm)
            extra.update(byte_bound_ms=bound * 1e3, weight_bytes_per_step=step_weight_bytes(loaded.model, batch),
                         over_byte_bound=res["ms_per_step"] / (bound * 1e3),
                         over_byte_bound_mean=res["ms_per_step_mean"] / (bound * 1e3))
        return dict(row=label, context=eng.ctx, batch_asked=batch, prefill_s=eng.prefill_s, **res, memory=eng.memory(),
                    **extra)

    rows = []
    if spec["kind"] == "fixed":
        batch = spec["batch"]
        eng = Engine(loaded, device=device, ctx=ctx, batch=batch, steps=a.steps + 4, sparse=cfg(batch),
                     page_size=a.page_size, chunk=a.chunk, util=a.util, overlap=overlap)
        res = eng.decode(a.steps)
        extra = dict(profile=eng.kernels_per_step()) if a.profile else {}
        rows.append(row(f"{name} b{batch}", eng, res, batch, **extra))
    else:  # the largest batch this engine holds, then the same engine with --small-batch requests
        def fits(slots):  # requests an engine whose sparse cache has `slots` request slots holds
            return largest_batch(loaded, device=device, ctx=ctx, steps=2 * a.steps, sparse=cfg(slots),
                                 page_size=a.page_size, util=a.util)

        n = fits(64)
        if spec["residency"] is not None:
            # each slot preallocates its representations on the device, so fewer slots leave a larger
            # pool: grow n while an engine with n slots still holds n requests
            held = fits(n)  # each call builds an engine (and pins its host pool): none is asked twice
            for _ in range(4):
                if held <= n:
                    break
                more = fits(held)
                if more < held:
                    break
                n, held = held, more
        eng = Engine(loaded, device=device, ctx=ctx, batch=n, steps=2 * a.steps, sparse=cfg(n),
                     page_size=a.page_size, chunk=a.chunk, util=a.util, overlap=overlap)
        rows.append(row(f"{name} largest", eng, eng.decode(a.steps), n, largest_batch=n))
        eng.keep(a.small_batch)
        rows.append(row(f"{name} b{a.small_batch}", eng, eng.decode(a.steps), a.small_batch))
    Path(spec["out"]).write_text(json.dumps(rows))
    return 0


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{str(r['row']):24s} ctx={r['context']} failed", flush=True)
        return
    prof = r.get("profile")
    print(f"{r['row']:24s} ctx={r['context']:6d} running={max(r['running_batch_per_step'])} "
          f"{r['ms_per_step']:8.2f} ms/step {r['tokens_per_s']:9.1f} tok/s"
          + (f"  hit {r['hit_rate']:.3f}, {r['bytes_h2d_per_step'] / 2**20:.1f} MiB H2D/step" if "hit_rate" in r else "")
          + (f"  {r['over_byte_bound']:.2f}x byte bound" if "over_byte_bound" in r else "")
          + (f"  {prof['kernels_per_layer']:.1f} kernels/layer, {prof['d2h_copies']} D2H/step" if prof else "")
          + (f"  graph step: wall {prof['graph_wall_ms']:.2f}, GPU span {prof['graph_span_ms']:.2f}, kernels "
             f"{prof['graph_busy_ms']:.2f} ms" if prof and "graph_wall_ms" in prof else ""),
          flush=True)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    rows = [r for r in rows if "error" not in r]
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
