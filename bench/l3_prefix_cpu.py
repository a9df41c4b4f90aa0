"""Time to first token of a long prompt whose prefix was seen before, from the KV pool or L3, on the CPU.

The embedded SmolLM2-135M (fp32, dense). A prompt of --prompt-len tokens = a shared prefix (all but
the last --tail tokens) + a tail. For each mode:
  recompute   no reuse: the whole prompt is prefilled;
  pool        the pool's prefix cache (--prefix-cache, no L3): an engine first serves the prefix with
              another tail, then the measured prompt takes the prefix's full pages from the pool;
  file/redis/mooncake
              an engine with --l3 (and --no-prefix-cache, so the pages come from L3) first serves the prefix with another tail (its prefill stores the
              prefix's pages; the bench then waits until that write has ended, fill_drain_s), then
              the measured prompt: the prefix's full pages are read from L3 and only the rest is prefilled.
              A read slower than prefilling is cut short and the rest of its pages read from the back
              while the front prefills; `redis:nosplit` (any L3 mode) prefills them instead (the cut
              alone, as before the split), for A/B runs.
Servers (redis-server, Mooncake master + store process) are started on loopback ports and stopped
afterwards. Each mode's first output token is checked against the recompute one. Writes JSON (with
command, date, commit, machine) and a bar plot beside it.

    python bench/l3_prefix_cpu.py --prompt-len 8000 --threads 1 --out bench/results/l3_prefix_cpu.json
    python bench/l3_prefix_cpu.py --model random:llama-3.1-8b --device cuda --prompt-len 16384 \
        --chunk 8192 --modes recompute pool file --out bench/results/l3_prefix_gpu.json   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO, header, write_json

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "kvcache" / "l3"))

from tests.conftest import long_text  # noqa: E402

from hisa import LLM, SamplingParams  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402


def ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """(seconds from add to the first token, that token) of one request running alone."""
    out = llm.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)[0]
    return out.first_token_time - out.arrival_time, out.token_ids[0]


def profiled_ttft(llm: LLM, prompt: list[int], device: torch.device, top: int = 15) -> dict:
    """One request run under the profiler: wall time, GPU kernel time and span, and the host ops and
    kernels that took the most."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        wall, _ = ttft(llm, prompt)
    evs = prof.key_averages()
    host = sorted(((e.key, e.count, e.cpu_time_total / 1e3) for e in evs), key=lambda x: -x[2])[:top]
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names: dict[str, list] = {}
    for e in kern:
        n = names.setdefault(e.name[:70], [0, 0.0])
        n[0] += 1
        n[1] += e.device_time_total / 1e3
    out = dict(wall_ms=wall * 1e3, kernels=len(kern), kernel_ms=sum(v[1] for v in names.values()),
               span_ms=(max(e.time_range.end for e in kern) - min(e.time_range.start for e in kern)) / 1e3 if kern else 0.0,
               top_host_ops=[[k, c, round(ms, 3)] for k, c, ms in host],
               top_kernels=sorted(([k, c, round(ms, 3)] for k, (c, ms) in names.items()), key=lambda x: -x[2])[:top])
    print(f"profiled: wall {out['wall_ms']:.1f} ms, {out['kernels']} kernels, {out['kernel_ms']:.1f} ms of kernels "
          f"over a {out['span_ms']:.1f} ms span", flush=True)
    for k, c, ms in out["top_host_ops"]:
        print(f"  host  {ms:9.3f} ms  x{c:<5d} {k}", flush=True)
    for k, c, ms in out["top_kernels"]:
        print(f"  gpu   {ms:9.3f} ms  x{c:<5d} {k}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=8000)
    ap.add_argument("--tail", type=int, default=64, help="tokens after the shared prefix (default 64)")
    ap.add_argument("--chunk", type=int, default=2048, help="--max-num-batched-tokens (default 2048)")
    ap.add_argument("--modes", nargs="+", default=["recompute", "pool", "file", "redis", "mooncake"],
                    help="recompute: no reuse; pool: the device pool's prefix cache (--prefix-cache); file/redis/"
                         "mooncake: L3 only (the pool's prefix cache off, so the pages come from L3); mooncake:shm through the "
                         "store process's shared memory instead of TCP; a mode may repeat")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine 2 threads ran 10x slower)")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2; e.g. random:llama-3.1-8b on a GPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--read-threads", type=int, default=None,
                    help="L3 reader threads (default: the store's, half the cores up to 16)")
    ap.add_argument("--no-device-landing", action="store_true",
                    help="CUDA: copy a load's pages to the device only once its lookup is back (default: pages "
                         "read and checked are copied on while the rest are read)")
    ap.add_argument("--check", choices=("device", "host"), default=None,
                    help="CUDA: where a load checks its pages' crc32: on the device once landed, or on the store's "
                         "reader threads as they are read (default: the engine's, l3_prefix.CHECK_ON_DEVICE)")
    ap.add_argument("--profile", action="store_true",
                    help="run the measured request of each mode under the torch profiler and print where its "
                         "time goes (host ops and GPU kernels; the profiler's overhead inflates ttft_s)")
    ap.add_argument("--profile-fill", action="store_true",
                    help="run the request that fills the pool / L3 under the torch profiler (its fill_ttft_s then "
                         "includes the profiler's overhead): with L3 on a GPU it took 2.2 s vs 0.59 s without, "
                         "so far unexplained")
    ap.add_argument("--mooncake-segment", default="1 GB",
                    help="memory the Mooncake store process lends (a 16K prompt of the Llama-3.1-8B shape is 2.1 GB)")
    ap.add_argument("--sparse", default=None, metavar="ALGO",
                    help="run the prompts as sparse requests of this algorithm (e.g. quest); default dense")
    ap.add_argument("--residency", default="host", choices=["auto", "device", "host"],
                    help="with --sparse: where their KV lives (default host: L3 pages go to the host pool)")
    ap.add_argument("--token-budget", type=int, default=1024, help="with --sparse (default 1024)")
    ap.add_argument("--host-pool-gb", type=float, default=None, help="with --sparse: the host pool (default: automatic)")
    ap.add_argument("--redis-port", type=int, default=None,
                    help="the redis-server's port (default: a free one); e.g. to shape its link with tc")
    ap.add_argument("--split-margin", type=float, default=None,
                    help="L3 modes: split a read once finishing it looks this many times slower than "
                         "prefilling its pages (default: the engine's SPLIT_MARGIN)")
    ap.add_argument("--land-chunk-mib", type=int, default=None,
                    help="L3 modes: the most a lookup reads per batch (default: the engine's LAND_CHUNK_BYTES, times STORE_CHUNKS for several Mooncake stores)")
    ap.add_argument("--per-store-batches", action="store_true",
                    help="L3 modes over several batched stores: read each store's next pages in turn "
                         "(L3PrefixCache.per_store_batches)")
    ap.add_argument("--mooncake-stores", type=int, default=1,
                    help="mooncake modes: this many stores (a master and a store process each), pages spread "
                         "over them by key and read from all at once")
    ap.add_argument("--redis-servers", type=int, default=1,
                    help="redis modes: start this many redis-servers and spread the pages over them "
                         "(--l3 redis://HOST:PORT,HOST:PORT,...; default 1)")
    ap.add_argument("--redis-io-threads", type=int, default=1,
                    help="the redis-server's --io-threads (default 1, Redis's own default)")
    ap.add_argument("--probe-pages", type=int, default=0,
                    help="L3 modes: before the measured request, one whose prompt is the prefix's first N "
                         "pages + another tail, so the engine knows the store's read rate (as a server that "
                         "has run a while does); default 0")
    ap.add_argument("--note", default=None, help="free text stored in the JSON (e.g. how the link was shaped)")
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "l3_prefix_cpu.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=device, dtype=dtype, progress=False)
    tok = loaded.tokenizer
    if tok is not None:
        text_ids = tok.encode(long_text(3 * args.prompt_len, seed=7))
        other = tok.encode(long_text(200, seed=8))[: args.tail]          # the tail of the request that fills L3
        tail = tok.encode(long_text(200, seed=9))[: args.tail]
    else:  # a random-weight model: random token ids
        g = torch.Generator().manual_seed(7)
        lo = min(1000, loaded.config.vocab_size // 4)  # away from the special tokens at both ends
        text_ids, other, tail = (torch.randint(lo, loaded.config.vocab_size - lo, (n,), generator=g).tolist()
                                 for n in (args.prompt_len, args.tail, args.tail))
    prefix = text_ids[: args.prompt_len - args.tail]
    measured = prefix + tail
    assert len(measured) == args.prompt_len
    kw = dict(loaded=loaded, device=device.type, dtype=str(dtype).removeprefix("torch."), progress=False,
              max_num_batched_tokens=args.chunk, max_model_len=max(args.prompt_len + 8, 2048), max_num_seqs=4,
              prefix_cache=False, kv_cache_gb=args.kv_cache_gb)
    kind = "dense"
    if args.sparse is not None:
        from hisa.sparse.config import SparseConfig

        kw["sparse"] = SparseConfig(algorithm=args.sparse, token_budget=args.token_budget, residency=args.residency,
                                    min_prompt_len=min(1024, args.prompt_len - args.tail),
                                    host_pool_gb=args.host_pool_gb)
        kind = f"sparse {args.sparse} (budget {args.token_budget}, residency {args.residency})"
        if args.residency == "host" and "pool" in args.modes:
            raise SystemExit("--modes pool: the pool's prefix cache holds device pages, which host-backed "
                             "requests do not take")
    # Warm-up on other tokens, through every shape the measured requests run: a whole prompt (the
    # recompute's chunks), then its prefix with another tail (the tail's chunk after a cached prefix,
    # which every reuse mode runs). Without it the first request of a shape may pay one-time costs
    # (CUDA's lazy module loading, cuBLAS's choice of kernels) that no later request pays: an H200
    # profile of the pool mode's first request once showed 12 ms of module loading.
    if tok is not None:
        warm_ids = tok.encode(long_text(3 * args.prompt_len, seed=11))[: args.prompt_len]
    else:
        warm_ids = torch.randint(lo, loaded.config.vocab_size - lo, (args.prompt_len,), generator=g).tolist()
    warm = LLM(**{**kw, "prefix_cache": True})
    for ids in (warm_ids, warm_ids[: args.prompt_len - args.tail] + other):
        warm.generate([ids], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    warm.close()
    del warm

    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="hisa-l3-bench-") as tmp:
        for mode_name in args.modes:
            mode, _, option = mode_name.partition(":")
            if option not in ("", "nosplit", "shm") or option == "shm" and mode != "mooncake":
                raise SystemExit(f"unknown mode option {option!r} in {mode_name!r} (nosplit; mooncake:shm)")
            server = None
            if mode in ("recompute", "pool"):
                url = None
            elif mode == "file":
                url = f"file:{tmp}/l3-{len(rows)}"   # (a mode may repeat: each run its own directory)
            elif mode == "redis":
                from l3_servers import RedisServers

                (Path(tmp) / f"redis-{len(rows)}").mkdir()   # (a mode may repeat: each run its own servers)
                server = RedisServers(Path(tmp) / f"redis-{len(rows)}", args.redis_servers, port=args.redis_port,
                                      extra_args=["--io-threads", str(args.redis_io_threads)]).start()
                url = server.url
            elif mode == "mooncake":
                from l3_servers import MooncakeStoreServers, mooncake_url

                stores = [MooncakeStoreServers(Path(tmp) / f"mooncake-{len(rows)}" / str(j),   # (a mode may
                                               segment=args.mooncake_segment)   # repeat: each run its own stores)
                          for j in range(args.mooncake_stores)]
                server = _AllOf(stores)   # (stopped with the mode, each started in turn)
                for one in stores:
                    one.start()
                url = mooncake_url(stores, shm=option == "shm")   # shm: as the store processes' dummy client
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            try:
                llm = LLM(**{**kw, "prefix_cache": mode == "pool"}, l3=url)
                row = dict(mode=mode_name, prompt_tokens=len(measured), prefix_tokens=len(prefix))
                if url is not None:
                    llm.engine.l3_prefix.split_slow_loads = option != "nosplit"
                    if args.split_margin is not None:
                        llm.engine.l3_prefix.split_margin = args.split_margin
                    row["split_margin"] = llm.engine.l3_prefix.split_margin
                    import hisa.engine.l3_prefix as l3p
                    if args.land_chunk_mib is not None:   # (the batch of several batched stores too)
                        l3p.LAND_CHUNK_BYTES, l3p.STORE_CHUNKS = args.land_chunk_mib << 20, 1
                    row["batch_bytes"] = l3p.LAND_CHUNK_BYTES * llm.engine.l3_prefix._stores_at_once
                    llm.engine.l3_prefix.per_store_batches = args.per_store_batches
                    row["per_store_batches"] = args.per_store_batches
                    row["split_slow_loads"] = llm.engine.l3_prefix.split_slow_loads
                    store = llm.engine.l3_prefix.l3
                    if args.read_threads is not None:
                        store.readers.workers = args.read_threads
                    row["read_threads"] = store.readers.workers
                    if args.no_device_landing:
                        llm.engine.l3_prefix.land_on_device = False
                    if args.check is not None:
                        llm.engine.l3_prefix.check_on_device = args.check == "device"
                    if args.no_device_landing:
                        llm.engine.l3_prefix.check_on_device = False
                    row["device_landing"] = llm.engine.l3_prefix.land_on_device
                    row["check_on_device"] = llm.engine.l3_prefix.check_on_device
                if mode != "recompute":
                    t0 = time.perf_counter()
                    if args.profile_fill:   # where the first request's time goes (its pages are stored too)
                        row["fill_profile"] = profiled_ttft(llm, prefix + other, device)
                        row["fill_ttft_s"] = row["fill_profile"]["wall_ms"] / 1e3   # (with the profiler's overhead)
                    else:
                        row["fill_ttft_s"], _ = ttft(llm, prefix + other)   # prefill + storing the pages
                    row["fill_wall_s"] = time.perf_counter() - t0
                    if url is not None:   # the prefix was computed before: its write has ended (else the
                        t0 = time.perf_counter()   # measured lookup would queue behind it on the I/O thread)
                        llm.engine.l3_prefix.drain()
                        row["fill_drain_s"] = time.perf_counter() - t0
                if url is not None and args.probe_pages:   # the store's rate, from a short read
                    probe = prefix[:args.probe_pages * 16] + other
                    row["probe_ttft_s"], _ = ttft(llm, probe)
                    row["probe_read_bytes_per_s"] = llm.engine.l3_prefix.metrics()["read_bytes_per_s"]
                if url is not None:
                    before = llm.engine.l3_prefix.copy_timing()
                if args.profile:  # another tail, so the timed request below does not find this one's pages
                    row["profile"] = profiled_ttft(llm, prefix + tail[::-1], device)
                row["ttft_s"], first = ttft(llm, measured)
                if url is not None:   # the measured load: reading + checking pages (I/O thread), copying them
                    after = llm.engine.l3_prefix.copy_timing()
                    load = {k: after[k] - before.get(k, 0) for k in after}
                    load["read_gb_s"] = load["read_bytes"] / max(load["read_s"], 1e-9) / 1e9
                    row["load"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in load.items()}
                if mode == "recompute":
                    reference = first
                row["first_token"] = first
                row["same_first_token"] = reference is None or first == reference
                if url is not None:
                    row["l3"] = llm.engine.l3_prefix.metrics()
                if mode == "pool":
                    row["prefix_cache"] = llm.engine.prefix_cache.metrics()
                rows.append(row)
                said = ""
                if url is not None:
                    load = row["load"]
                    said = (f"  (filling it: {row['fill_ttft_s']:.2f} s; pages loaded {row['l3']['pages_loaded']}, "
                            f"MB read {row['l3']['store_bytes_read'] / 1e6:.1f}, cut {row['l3']['loads_cut_short']}, "
                            f"met from the back {row['l3']['pages_met']}; load: read+check {load['read_s']:.3f} s "
                            f"= {load['read_gb_s']:.1f} GB/s on {row['read_threads']} threads, exists {load['exists_s']:.4f} s, copy issue "
                            f"{load['copy_s']:.3f} s"
                            + (f", copy on device {load['copy_device_s']:.3f} s" if "copy_device_s" in load else "")
                            + (f"; cut after {load['cut_after_s']:.3f} s, back read started {load['back_wait_s']:.3f} s "
                               f"later and ran {load['back_read_s']:.3f} s, met {load['met_after_s']:.3f} s after the "
                               f"cut, {load['split_steps']} steered step(s), back pages landed while read "
                               f"{load.get('back_landed_bytes', 0) / 1e6:.0f} MB" if row['l3']['loads_split'] else "")
                            + ")")
                elif mode == "pool":
                    said = (f"  (filling it: {row['fill_ttft_s']:.2f} s; pages reused "
                            f"{row['prefix_cache']['pages_hit']})")
                print(f"{mode_name:14s} ttft {row['ttft_s']:.3f} s{said}", flush=True)
                llm.close()
            finally:
                if server is not None:
                    server.stop()
    base = next((r["ttft_s"] for r in rows if r["mode"] == "recompute"), None)
    for r in rows:
        if base is not None:
            r["speedup_vs_recompute"] = round(base / r["ttft_s"], 2)
    payload = dict(**header(device, args.git_commit),
                   model=f"{args.model or 'SmolLM2-135M-Instruct (embedded GGUF)'}, {str(dtype).removeprefix('torch.')}, "
                         f"{kind}, page 16",
                   prompt_len=args.prompt_len, tail=args.tail, max_num_batched_tokens=args.chunk, threads=args.threads,
                   crc32=_crc32_impl(), redis_io_threads=args.redis_io_threads, redis_servers=args.redis_servers, rows=rows, **({"setup_note": args.note} if args.note else {}),
                   note="ttft_s: arrival to first token of one request alone (engine step time, L3 reads "
                        "included). load (L3 modes, the measured request): read_s = the I/O thread's reads + "
                        "checks into the host rows (read_bytes of pages), copy_s = the engine thread copying "
                        "them to device pages once the lookup is back (CUDA: issuing the async copies), "
                        "copy_device_s = those copies' device time, landed_bytes = pages copied on to the device "
                        "while the lookup was still reading (device_landing). Machine shared with other jobs: "
                        "absolute times vary run to run.")
    write_json(args.out, payload)
    plot(rows, args.out.with_suffix(".png"), payload["device"].get("name", "cpu"), args.model or "SmolLM2")


def plot(rows, path: Path, device: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["mode"] for r in rows]
    vals = [r["ttft_s"] for r in rows]
    bars = ax.bar(names, vals, color=["#888"] + ["#3a7"] * (len(rows) - 1))
    for b, r in zip(bars, rows):
        label = f"{r['ttft_s']:.2f}s" + (f"\n{r['speedup_vs_recompute']}x" if "speedup_vs_recompute" in r else "")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"{model} {rows[0]['prompt_tokens']}-token prompt, prefix reused ({device})", fontsize=9)
    ax.set_ylim(0, max(vals) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def _crc32_impl() -> str:
    """Which crc32 the store checks pages with ("zlib-ng" or "zlib": ~8x apart per core)."""
    from hisa.kvcache.l3 import record

    return record.CRC32


class _AllOf:
    """Several servers stopped as one."""

    def __init__(self, servers):
        self.servers = servers

    def stop(self):
        for s in self.servers:
            s.stop()


if __name__ == "__main__":
    main()

