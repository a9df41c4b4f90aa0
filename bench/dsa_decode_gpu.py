"""DeepSeek-V3.2 decode in the engine: DSA all on the device vs hierarchical DSA (latent KV in host memory).

A random-weight model at DeepSeek-V3.2's attention shapes (`random:deepseek-v3.2-small`: 4 layers,
128 heads, latent 512 + rope 64, indexer 64 x 128, top-2048, a reduced MoE; bf16) decodes `--steps`
tokens for `batch` copies of one prompt per context, in two modes side by side in one process
(`--kv-cache-dtype fp8`: both with DeepSeek's FP8 cache, 656-byte latent rows and 144-byte indexer
keys, `hisa.kvcache.mla_fp8`):

  * device: DSA with everything on the device (latent rows and indexer keys in device pages);
  * hier:   hierarchical DSA (`SparseConfig(algorithm="dsa")`): a host-backed request keeps its latent
            rows in the pinned host pool, its indexer keys on the device, and a device LRU buffer of
            buffer_ratio x index_topk latent rows (page size 1) plus the tail page. A numeric batch
            runs every request host-backed (residency "host"); `max` runs HBM first (residency
            "auto": as many requests resident as the device holds, the rest host-backed).

Prefill is shared: the longest context's prompt is prefilled once through the model (`--template
synthetic` uses random rows instead, no prefill at all), and every request of every row starts from a
copy of its first ctx - 1 latent rows and indexer keys (written into its device pages, or its host
pages and the indexer representation); the last prompt token runs as a real one-token prefill chunk
over that context. So a row costs its decode steps plus one short step, whatever its batch.

Per row: device bytes per request (latent KV / buffer, indexer cache, each), host bytes per request,
the fraction of the top-k fetched per layer per step (misses / selected rows, after the first decode
step: the buffer starts empty), H2D bytes per step, ms/step, tok/s (tokens produced / decode time),
the byte bound (bytes a step must read / 4.2 TB/s; PCIe 55 GB/s for the misses; the weights as
`_common.step_weight_bytes` counts them: runs before 2026-12-02 also counted the untied embedding
table, 1.85 GB at deepseek-v3.2-small, so their bound was too high), and whether the
hierarchical greedy tokens equal all-on-device's at the same batch. Also, per context: the largest
batch each mode fits (from the free HBM after the weights and the host pool the RAM allows; and
with 4x the HBM in host RAM), and the issue-12 ratios. JSON (written after every row: a killed run
keeps what it measured) and a plot beside it.

Usage (H200; the default grid: 32K and 128K, batches 4 and the largest of each mode; about 5 min,
most of it the one 128K prefill and pinning the host pool)::

    python bench/dsa_decode_gpu.py --git-commit $(git rev-parse HEAD)
    python bench/dsa_decode_gpu.py --contexts 131072 --device-batches 1,4,32 --hier-batches 4,32,max
    python bench/dsa_decode_gpu.py --template synthetic --graphs --host-gb 92 --kv-cache-dtype fp8   # FP8 latent rows
    python bench/dsa_decode_gpu.py --preset tiny-deepseek-v3.2 --device cpu --contexts 256,512 --steps 8 \\
        --device-batches 2,max --hier-batches 2,max --hbm-gb 0.004 --host-gb 0.002 --out /tmp/dsa_smoke.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, checked_step, header, step_weight_bytes  # noqa: E402

from hisa import LLM, SamplingParams  # noqa: E402
from hisa.engine.llm_engine import host_backed_buffer_pages  # noqa: E402
from hisa.engine.sequence import Status  # noqa: E402
from hisa.kvcache.host_pool import available_host_bytes, default_host_pool_bytes  # noqa: E402
from hisa.kvcache.mla_fp8 import index_key_width, packed_width  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402

HBM_BYTES_PER_S = 4.2e12  # H200, measured (docs/architecture.md)
PCIE_BYTES_PER_S = 55e9  # pinned H2D, Gen5
DEVICE_RESERVE = 6 * 2**30  # activations, logits, the indexer's fp32 scores and top-k, the MoE of a large batch


@dataclass
class Template:
    """The shared prompt and its KV: per layer latent rows [n, Dl + Dr] and indexer keys [n, ID] (device)."""

    prompt: list[int]
    latent: list[torch.Tensor]
    keys: list[torch.Tensor]


@dataclass
class Sizes:
    """Bytes per request at one context (page size S, whole pages) and the largest batches."""

    device_latent: int  # all on device: latent rows
    device_indexer: int  # all on device: indexer keys
    hier_buffer_latent: int  # host-backed: LRU buffer + tail page, latent part
    hier_buffer_indexer_unused: int  # the indexer part of those device pages (unused by a host-backed request)
    hier_indexer: int  # host-backed: its indexer representation slot (max_model_len tokens)
    host_latent: int  # host-backed: latent rows in the host pool
    buffer_pages: int  # LRU slots + tail page

    @property
    def device_total(self) -> int:
        return self.device_latent + self.device_indexer

    @property
    def hier_device_total(self) -> int:
        return self.hier_buffer_latent + self.hier_buffer_indexer_unused + self.hier_indexer


def latent_row_bytes(mc, *, elt: int, kv_cache_dtype: str) -> int:
    """Bytes of one stored latent row (one token, one layer): latent_dim values, or the FP8 row."""
    d = mc.dsa
    return packed_width(d.kv_lora_rank, d.qk_rope_head_dim) if kv_cache_dtype == "fp8" else d.latent_dim * elt


def index_key_bytes(mc, *, elt: int, kv_cache_dtype: str) -> int:
    """Bytes of one stored indexer key (one token, one layer): index_head_dim values, or FP8 + a scale
    (padded: `index_key_width`)."""
    return index_key_width(mc.dsa.index_head_dim) if kv_cache_dtype == "fp8" else mc.dsa.index_head_dim * elt


def sizes_for(mc, *, ctx: int, steps: int, page_size: int, buffer_ratio: float, elt: int,
              kv_cache_dtype: str = "auto") -> Sizes:
    L, s = mc.num_layers, page_size
    lat = latent_row_bytes(mc, elt=elt, kv_cache_dtype=kv_cache_dtype)
    idx = index_key_bytes(mc, elt=elt, kv_cache_dtype=kv_cache_dtype)
    max_len = ctx + steps + 1
    pages = -(-max_len // s)
    sp = SparseConfig(algorithm="dsa", buffer_ratio=buffer_ratio)
    buf = host_backed_buffer_pages(sp, mc, s, max_len)
    return Sizes(device_latent=pages * s * L * lat, device_indexer=pages * s * L * idx,
                 hier_buffer_latent=buf * s * L * lat,
                 hier_buffer_indexer_unused=buf * s * L * idx,
                 hier_indexer=pages * s * L * idx, host_latent=pages * s * L * lat,
                 buffer_pages=buf)


def largest(sz: Sizes, *, hbm: int, host: int) -> dict:
    """Largest batches: all on device (HBM only); hierarchical host-backed only (host pool, and HBM for
    indexer + buffer); hierarchical HBM first (host-backed up to the host pool, the rest of HBM resident:
    a resident request holds its pages and, as every sparse request, a representation slot)."""
    dev = max(0, hbm // sz.device_total)
    n_host = max(0, min(host // sz.host_latent, hbm // sz.hier_device_total))
    n_res = max(0, (hbm - n_host * sz.hier_device_total) // (sz.device_total + sz.hier_indexer))
    return dict(device=int(dev), hier_host_only=int(n_host), hier_auto=int(n_host + n_res),
                hier_auto_resident=int(n_res), hier_auto_host_backed=int(n_host))


# -- the shared prefill ---------------------------------------------------------------------------------
def make_template(loaded, *, ctx: int, device, dtype: str, page_size: int, chunk: int, mode: str, seed: int) -> Template:
    mc = loaded.config
    gen = torch.Generator().manual_seed(seed)
    lo = min(1000, mc.vocab_size // 4)  # skip special tokens at the ends of the vocabulary
    prompt = torch.randint(lo, mc.vocab_size - lo, (ctx,), generator=gen).tolist()
    L, d = mc.num_layers, mc.dsa
    if mode == "synthetic":  # random rows at the model's scale: no prefill at all
        g = torch.Generator(device=device).manual_seed(seed)
        latent = [torch.randn(ctx - 1, d.latent_dim, generator=g, device=device).to(getattr(torch, dtype))
                  for _ in range(L)]
        keys = [torch.randn(ctx - 1, d.index_head_dim, generator=g, device=device).to(getattr(torch, dtype))
                for _ in range(L)]
        return Template(prompt, latent, keys)
    with LLM(loaded=loaded, device=device.type, dtype=dtype, page_size=page_size, progress=False,
             max_model_len=ctx + page_size + 1, max_num_batched_tokens=chunk, max_num_seqs=1, seed=seed,
             num_kv_pages=-(-(ctx + 2) // page_size) + 2) as llm:
        engine = llm.engine
        rid = engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        seq = engine._seqs[rid]
        while seq.num_computed < ctx:
            checked_step(engine)
        pages = torch.tensor(seq.pages, dtype=torch.int64, device=device)
        c = engine.cache
        latent = [c.latent_rows(i)[pages].reshape(-1, d.latent_dim)[: ctx - 1].clone() for i in range(L)]
        keys = [c.index_keys(i)[pages].reshape(-1, d.index_head_dim)[: ctx - 1].clone() for i in range(L)]
    return Template(prompt, latent, keys)


def inject_prefix(engine, rid: str, tpl: Template, n: int) -> None:
    """Start request `rid` (queued, prompt tpl.prompt[:n + 1]) with its first n tokens' KV copied from
    the template, as if prefilled: admitted as the scheduler would (resident or host-backed), its pages
    allocated and filled, num_computed = n. The engine's next step prefills its last prompt token."""
    sch = engine.scheduler
    seq = engine._seqs[rid]
    reserve = {id(sch.allocator): 0}
    if sch.sparse is not None:
        reserve[id(sch.sparse.host_allocator)] = 0
    if not sch._admit(seq, n, reserve):
        raise RuntimeError(f"no room for request {rid} ({n} tokens): device pool {sch.allocator.num_free} pages free")
    sch.waiting.remove(seq)
    seq.status = Status.RUNNING
    seq.slot = sch._free_slots.pop()
    seq.pages.extend(sch.pool(seq).allocate(sch.pages_needed(seq, n)))
    sch.running.append(seq)
    s, cache = engine.config.page_size, engine.cache
    npg = -(-n // s)
    pad = npg * s - n
    for layer in range(cache.num_layers):
        latent = cache.pack(torch.nn.functional.pad(tpl.latent[layer][:n], (0, 0, 0, pad)))  # [npg * S, W] stored
        keys = cache.pack_index(torch.nn.functional.pad(tpl.keys[layer][:n], (0, 0, 0, pad)))  # [npg * S, KW] stored
        if seq.host_backed:
            m = engine.sparse.manager
            m.write_pages(layer, latent.reshape(npg, -1), seq.pages[:npg], tail_page=seq.buffer_pages[-1])
            engine.sparse.algorithm.construct_representations(layer, seq.sparse_slot, 0, keys)
        else:
            pages = torch.tensor(seq.pages[:npg], dtype=torch.int64, device=cache.device)
            cache.latent_rows(layer)[pages] = latent.view(npg, s, -1)
            cache.index_keys(layer)[pages] = keys.view(npg, s, -1)
    if seq.host_backed:
        engine.sparse.manager.set_host_pages(seq.sparse_slot, 0, seq.pages[:npg])
    else:
        engine.runner.buffers.set_pages(seq.slot, 0, seq.pages[:npg])
    seq.num_computed = n


# -- one row -------------------------------------------------------------------------------------------
def run_row(loaded, tpl: Template, sz: Sizes, *, mode: str, batch: int, residency: str | None, n_resident: int,
            ctx: int, steps: int, page_size: int, buffer_ratio: float, device, dtype: str, graphs: bool,
            seed: int, profile: Path | None = None, kv_cache_dtype: str = "auto") -> dict:
    """One row; with `profile`, the torch profiler's op table of a few timed steps is written there."""
    mc = loaded.config
    s = page_size
    if steps < 2:
        raise ValueError("--steps must be at least 2 (the first token comes from the cold step, untimed)")
    max_len = ctx + steps + 1
    pages_per_request = -(-max_len // s)
    slack = batch * 2 + 4
    kw = dict(loaded=loaded, device=device.type, dtype=dtype, page_size=s, progress=False, max_model_len=max_len,
              max_num_batched_tokens=max(batch, 256), max_num_seqs=batch, seed=seed, cuda_graphs=graphs,
              kv_cache_dtype=kv_cache_dtype)
    elt = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    lat = latent_row_bytes(mc, elt=elt, kv_cache_dtype=kv_cache_dtype)
    idx = index_key_bytes(mc, elt=elt, kv_cache_dtype=kv_cache_dtype)
    if mode == "device":
        kw["num_kv_pages"] = batch * pages_per_request + slack
    else:
        n_host = batch - n_resident
        host_pages = max(n_host, 1) * pages_per_request + slack  # (the engine wants room for one request)
        host_gb = host_pages * mc.num_layers * s * lat / 2**30
        min_prompt = min(1024, ctx // 2)  # the pool must hold one request just too short to go sparse
        kw["num_kv_pages"] = n_resident * pages_per_request + n_host * sz.buffer_pages + slack + -(-min_prompt // s) + 1
        kw["sparse"] = SparseConfig(algorithm="dsa", residency=residency, buffer_ratio=buffer_ratio,
                                    min_prompt_len=min_prompt, max_sparse_requests=batch,
                                    host_pool_gb=max(host_gb, 1e-3))
    t0 = time.perf_counter()
    llm = LLM(**kw)
    try:
        engine = llm.engine
        setup_s = time.perf_counter() - t0
        rids = [engine.add_request(tpl.prompt[:ctx], SamplingParams(max_tokens=steps, ignore_eos=True))
                for _ in range(batch)]
        t0 = time.perf_counter()
        for i, rid in enumerate(rids):
            if mode == "hier" and residency == "auto":  # HBM first, as planned: the first n_resident resident
                engine.sparse.residency = "device" if i < n_resident else "host"
            inject_prefix(engine, rid, tpl, ctx - 1)
        if mode == "hier":
            engine.sparse.residency = residency
        sync(device)
        inject_s = time.perf_counter() - t0
        hp = engine.sparse
        host_backed = sum(1 for q in engine.scheduler.running if q.host_backed)
        t0 = time.perf_counter()
        checked_step(engine)  # every request's last prompt token: a decode row over the copied context (cold buffers)
        sync(device)
        first_step_s = time.perf_counter() - t0
        first = None if hp is None else (hp.manager.misses.sum().item(), hp._selected.sum().item())
        tokens, step_ms, produced = {}, [], 0
        prof, profiled = None, set()
        if profile is not None:  # skip the first two timed steps (a graph capture), then record up to four;
            active = min(4, max(1, steps - 5))  # the profiled steps are left out of the median
            profiled = set(range(2, 3 + active))
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                             if device.type == "cuda" else [])
            prof = torch.profiler.profile(activities=acts, schedule=torch.profiler.schedule(
                wait=2, warmup=1, active=active))
            prof.start()
        while engine.has_unfinished_requests():
            sync(device)
            t0 = time.perf_counter()
            for o in checked_step(engine):
                produced += 1
                if o.finished:
                    tokens[o.request_id] = list(o.token_ids)
            sync(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            if prof is not None:
                prof.step()
        if prof is not None:
            prof.stop()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            profile.write_text(f"{mode} ctx {ctx} batch {batch} graphs {graphs}: the profiled steps' ops by {key}\n"
                               + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
        out = dict(mode=mode, context=ctx, batch=batch, residency=residency, host_backed=host_backed,
                   resident=batch - host_backed if mode == "hier" else 0, graphs=engine.runner.graphs is not None,
                   setup_s=setup_s, inject_s=inject_s, first_step_s=first_step_s, decode_steps=len(step_ms),
                   decode_ms_per_step=statistics.median([t for i, t in enumerate(step_ms) if i not in profiled]
                                                        or step_ms),
                   decode_ms_max=max(step_ms), step_ms=[round(t, 2) for t in step_ms],
                   profiled_steps=sorted(i for i in profiled if i < len(step_ms)),
                   tokens_per_s=produced / (sum(step_ms) / 1e3), tokens_produced=produced,
                   tokens=[tokens.get(r) for r in rids])
        out["tokens_per_s_median_step"] = batch * 1e3 / out["decode_ms_per_step"]
        if mode == "device":
            out.update(device_latent_bytes_per_request=sz.device_latent, device_indexer_bytes_per_request=sz.device_indexer,
                       host_bytes_per_request=0)
        else:
            out.update(device_latent_bytes_per_request=sz.hier_buffer_latent,
                       device_buffer_indexer_part_bytes_per_request=sz.hier_buffer_indexer_unused,
                       device_indexer_bytes_per_request=sz.hier_indexer, host_bytes_per_request=sz.host_latent)
            st = hp.summary()
            misses, selected = st["misses"], st["selected_pages"]
            m0, s0 = first if first is not None else (0, 0)
            warm_steps = max(1, len(step_ms))
            out.update(selected_rows=selected, misses=misses,
                       fetched_fraction=misses / selected if selected else None,
                       fetched_fraction_after_first_step=(misses - m0) / (selected - s0) if selected > s0 else None,
                       fetched_fraction_per_layer=[mi / se if se else None for mi, se in
                                                   zip(st["misses_per_layer"], st["selected_per_layer"])],
                       h2d_bytes_per_step=(misses - m0) * hp.manager.row_bytes / warm_steps,
                       h2d_bytes_first_step=m0 * hp.manager.row_bytes, host_pool_bytes=st["host_pool_bytes"],
                       peak_device_bytes_in_use=st["peak_device_bytes_in_use"])
        # bytes a decode step must read: the weights, per request and layer the top-k latent rows and every
        # indexer key; hierarchical: the misses over PCIe on top
        d, L = mc.dsa, mc.num_layers
        kv = batch * L * (min(d.index_topk, ctx) * lat + ctx * idx)
        weights = step_weight_bytes(loaded.model, batch)   # (not the untied embedding table: one row per request)
        out["step_read_bytes"] = weights + kv
        out["hbm_bound_ms"] = out["step_read_bytes"] / HBM_BYTES_PER_S * 1e3
        out["pcie_bound_ms"] = out.get("h2d_bytes_per_step", 0) / PCIE_BYTES_PER_S * 1e3
        out["measured_over_bound"] = out["decode_ms_per_step"] / (out["hbm_bound_ms"] + out["pcie_bound_ms"])
        if engine.runner.graphs is not None:
            out.update(graph_captures=engine.runner.graphs.captures, graph_replays=engine.runner.graphs.replays)
        return out
    finally:
        llm.close()
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_batches(spec: str, maximum: int) -> list[tuple[int, bool]]:
    """"4,max,max/2" -> [(4, False), (maximum, True), ...]; `max` entries are marked (capped at maximum)."""
    out = []
    for tok in (x.strip() for x in spec.split(",") if x.strip()):
        if tok.startswith("max"):
            div = int(tok.split("/")[1]) if "/" in tok else 1
            out.append((max(1, maximum // div), True))
        else:
            out.append((min(int(tok), maximum) if maximum > 0 else int(tok), False))
    seen, uniq = set(), []
    for b in out:
        if b[0] not in seen:
            seen.add(b[0])
            uniq.append(b)
    return uniq


# -- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v3.2-small")
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--device-batches", default="4,max", help="all-on-device rows; max = the largest that fits")
    p.add_argument("--hier-batches", default="4,max",
                   help="hierarchical rows: a number runs every request host-backed; max = HBM first at the largest")
    p.add_argument("--max-batch-cap", type=int, default=320,
                   help="never run a row larger than this (32K fits ~670 / ~1060 on an H200: both capped)")
    p.add_argument("--steps", type=int, default=16, help="decode tokens per request")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--buffer-ratio", type=float, default=2.0)
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk of the template's prefill")
    p.add_argument("--template", choices=("model", "synthetic"), default="model",
                   help="model: prefill the longest context once; synthetic: random KV, no prefill")
    p.add_argument("--graphs", action="store_true", help="capture decode steps in CUDA graphs (default eager)")
    p.add_argument("--profile", choices=("device", "hier"), action="append", default=[],
                   help="profile a few timed steps of that mode's largest row at each context: an op table "
                        "beside the JSON (<out stem>_<mode>_<ctx>.prof.txt)")
    p.add_argument("--hbm-gb", type=float, default=None, help="KV budget on the device (default: free after the "
                   "weights and the template, less a reserve)")
    p.add_argument("--host-gb", type=float, default=None,
                   help="host pool budget (default: 70%% of the RAM available, a little under the engine's 75%%)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="fp8: latent rows in DeepSeek's FP8 layout (656 bytes), in both modes (default: auto, bf16)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/dsa_decode_gpu.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    elt = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    contexts = [int(x) for x in a.contexts.split(",")]
    t = time.perf_counter()
    loaded = load_model(f"random:{a.preset}", device=device, dtype=getattr(torch, dtype), progress=False)
    mc = loaded.config
    weight_bytes = sum(q.numel() * q.element_size() for q in loaded.model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"[{where}] loaded random:{a.preset} ({dtype}, {weight_bytes / 2**30:.1f} GiB) in {time.perf_counter() - t:.1f} s",
          flush=True)
    payload = dict(**header(device, a.git_commit), preset=a.preset, dtype=dtype, weight_bytes=weight_bytes,
                   page_size=a.page_size, buffer_ratio=a.buffer_ratio, steps=a.steps, template=a.template,
                   kv_cache_dtype=a.kv_cache_dtype,
                   latent_row_bytes=latent_row_bytes(mc, elt=elt, kv_cache_dtype=a.kv_cache_dtype),
                   index_key_bytes=index_key_bytes(mc, elt=elt, kv_cache_dtype=a.kv_cache_dtype),
                   contexts={}, results=[])

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(a.out)

    t = time.perf_counter()
    full = make_template(loaded, ctx=max(contexts), device=device, dtype=dtype, page_size=a.page_size, chunk=a.chunk,
                         mode=a.template, seed=a.seed)
    sync(device)
    payload["template_s"] = time.perf_counter() - t
    print(f"template ({a.template}) of {max(contexts)} tokens in {payload['template_s']:.1f} s", flush=True)
    save()
    for ctx in contexts:
        tpl = Template(full.prompt[:ctx], full.latent, full.keys)  # a causal prefix: the first rows are its KV
        sz = sizes_for(mc, ctx=ctx, steps=a.steps, page_size=a.page_size, buffer_ratio=a.buffer_ratio, elt=elt,
                       kv_cache_dtype=a.kv_cache_dtype)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(device)
        else:
            free, total = 0, 0
        hbm = int(a.hbm_gb * 2**30) if a.hbm_gb is not None else int(free * 0.95) - DEVICE_RESERVE
        host = int(a.host_gb * 2**30) if a.host_gb is not None else default_host_pool_bytes(headroom=0.3)
        fit = largest(sz, hbm=hbm, host=host)
        total_hbm = total or hbm
        fit4 = largest(sz, hbm=hbm, host=int(4 * total_hbm * 0.75))
        info = dict(sizes=vars(sz) | dict(device_total=sz.device_total, hier_device_total=sz.hier_device_total),
                    kv_budget_hbm_bytes=hbm, host_pool_budget_bytes=host, host_available_bytes=available_host_bytes(),
                    largest=fit, largest_with_4x_hbm_host_ram=fit4,
                    hier_latent_over_device_latent=sz.hier_buffer_latent / sz.device_latent,
                    hier_latent_incl_unused_over_device_latent=(sz.hier_buffer_latent + sz.hier_buffer_indexer_unused) / sz.device_latent,
                    hier_device_over_device_total=sz.hier_device_total / sz.device_total,
                    largest_ratio=fit["hier_auto"] / fit["device"] if fit["device"] else None)
        payload["contexts"][str(ctx)] = info
        save()
        print(f"ctx {ctx}: per request all-on-device latent {sz.device_latent / 2**20:.1f} MiB + indexer "
              f"{sz.device_indexer / 2**20:.1f} MiB; host-backed: latent buffer {sz.hier_buffer_latent / 2**20:.2f} MiB "
              f"(+{sz.hier_buffer_indexer_unused / 2**20:.2f} MiB unused indexer part) + indexer "
              f"{sz.hier_indexer / 2**20:.1f} MiB on the device, {sz.host_latent / 2**20:.1f} MiB host", flush=True)
        print(f"  latent on device {info['hier_latent_over_device_latent']:.4f} of all-on-device (1/"
              f"{1 / info['hier_latent_over_device_latent']:.1f}; target <= 1/16), with the unused indexer part "
              f"{info['hier_latent_incl_unused_over_device_latent']:.4f}; everything on device "
              f"{info['hier_device_over_device_total']:.3f} (target <= 1/3)", flush=True)
        print(f"  largest batch (KV budget {hbm / 2**30:.1f} GiB HBM, host pool {host / 2**30:.1f} GiB): all-on-device "
              f"{fit['device']}, hierarchical HBM-first {fit['hier_auto']} ({fit['hier_auto_resident']} resident + "
              f"{fit['hier_auto_host_backed']} host-backed; ratio {info['largest_ratio'] or 0:.2f}, target >= 1.6), "
              f"host-backed only {fit['hier_host_only']}", flush=True)
        print(f"  with host RAM = 4x HBM ({4 * total_hbm * 0.75 / 2**30:.0f} GiB pool): hierarchical {fit4['hier_auto']} "
              f"({fit4['hier_auto_resident']} resident + {fit4['hier_auto_host_backed']} host-backed), "
              f"{fit4['hier_auto'] / max(1, fit['device']):.2f}x all-on-device", flush=True)
        cap = a.max_batch_cap
        plans = [("device", b, None, 0, is_max) for b, is_max in parse_batches(a.device_batches, min(fit["device"], cap))]
        for b, is_max in parse_batches(a.hier_batches, min(fit["hier_auto"], cap)):
            if is_max:  # HBM first: the first n_res requests resident, the rest host-backed (a capped
                n_res = min(fit["hier_auto_resident"], b)  # batch stays resident as far as the HBM allows)
                plans.append(("hier", b, "auto", n_res, True))
            else:
                plans.append(("hier", min(b, fit["hier_host_only"]) if fit["hier_host_only"] > 0 else b, "host", 0, False))
        by_batch: dict[tuple[str, int], dict] = {}
        for mode, b, residency, n_res, is_max in plans:
            label = f"ctx {ctx:>7} {mode:6} batch {b:>4}" + (f" ({residency}, {n_res} resident)" if mode == "hier" else "")
            t0 = time.perf_counter()
            try:
                r = run_row(loaded, tpl, sz, mode=mode, batch=b, residency=residency, n_resident=n_res, ctx=ctx,
                            steps=a.steps, page_size=a.page_size, buffer_ratio=a.buffer_ratio, device=device,
                            dtype=dtype, graphs=a.graphs, seed=a.seed, kv_cache_dtype=a.kv_cache_dtype,
                            profile=(a.out.with_name(f"{a.out.stem}_{mode}_{ctx}.prof.txt")
                                     if is_max and mode in a.profile else None))
            except Exception as e:  # keep going: a row that fails is recorded, the others still run
                traceback.print_exc()
                r = dict(mode=mode, context=ctx, batch=b, residency=residency, error=f"{type(e).__name__}: {e}")
                print(f"{label}: FAILED {r['error']}", flush=True)
                payload["results"].append(r)
                save()
                if device.type == "cuda":
                    try:
                        torch.cuda.synchronize(device)
                    except Exception:  # a sticky CUDA error: nothing after this can run
                        print("the CUDA context is broken; stopping", flush=True)
                        break
                continue
            r["is_largest"] = is_max
            r["wall_s"] = time.perf_counter() - t0
            toks = r.pop("tokens")
            r["tokens_same_across_batch"] = all(x == toks[0] for x in toks)
            r["tokens_first_request"] = toks[0]
            by_batch[(mode, b)] = r
            if mode == "hier":
                ref = by_batch.get(("device", b))
                r["tokens_equal_device_same_batch"] = None if ref is None else ref["tokens_first_request"] == toks[0]
                # every row decodes the same prompt: any device row's tokens (bf16 GEMMs of another batch
                # size may round differently, so only the same batch is a strict check on a GPU)
                r["tokens_equal_device_rows"] = {str(bb): rr["tokens_first_request"] == toks[0]
                                                 for (mm, bb), rr in by_batch.items() if mm == "device"}
                if ref is not None and ref["tokens_first_request"] != toks[0]:
                    same = [x == y for x, y in zip(ref["tokens_first_request"], toks[0])]
                    r["tokens_first_difference_at"] = same.index(False) if False in same else None
            payload["results"].append(r)
            save()
            extra = ""
            if mode == "hier":
                ff = r.get("fetched_fraction_after_first_step")
                extra = (f"; fetched {ff if ff is None else round(ff, 3)} of the top-k per layer-step (first step "
                         f"{r['h2d_bytes_first_step'] / 2**20:.0f} MiB), H2D {r['h2d_bytes_per_step'] / 2**20:.1f} MiB/step"
                         f", tokens == device (same batch): {r['tokens_equal_device_same_batch']}, (by device batch): "
                         f"{r['tokens_equal_device_rows']}")
            print(f"{label}: {r['decode_ms_per_step']:8.2f} ms/step, {r['tokens_per_s']:8.1f} tok/s (bound "
                  f"{r['hbm_bound_ms'] + r['pcie_bound_ms']:.2f} ms, x{r['measured_over_bound']:.1f}); setup "
                  f"{r['setup_s']:.1f} s, copy {r['inject_s']:.1f} s, first (cold) step {r['first_step_s']:.2f} s"
                  f"{extra}", flush=True)
        dev_max = [r for (m, _), r in by_batch.items() if m == "device" and r["is_largest"]]
        hier_max = [r for (m, _), r in by_batch.items() if m == "hier" and r["is_largest"]]
        if dev_max and hier_max:
            ratio = hier_max[0]["tokens_per_s"] / dev_max[0]["tokens_per_s"]
            steady = hier_max[0]["tokens_per_s_median_step"] / dev_max[0]["tokens_per_s_median_step"]
            info["tok_s_ratio_at_largest"] = ratio  # over every timed step (the last one frees every page)
            info["tok_s_ratio_at_largest_median_step"] = steady  # the steady state
            info["batch_ratio_run"] = hier_max[0]["batch"] / dev_max[0]["batch"]
            print(f"  ctx {ctx}: at the largest batches run, hierarchical {hier_max[0]['batch']} vs all-on-device "
                  f"{dev_max[0]['batch']} ({info['batch_ratio_run']:.2f}x): tok/s {ratio:.2f}x over all timed steps, "
                  f"{steady:.2f}x at the median step (target >= 1.4)", flush=True)
        save()
    print(f"results written to {a.out}")
    _plot(payload, a.out.with_suffix(".png"))
    return 0


def _plot(payload: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    rows = [r for r in payload["results"] if "error" not in r]
    ctxs = sorted({r["context"] for r in rows})
    if not ctxs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    for ctx in ctxs:
        for mode, style in (("device", "s--"), ("hier", "o-")):
            sub = sorted((r for r in rows if r["context"] == ctx and r["mode"] == mode), key=lambda r: r["batch"])
            if sub:
                ax.plot([r["batch"] for r in sub], [r["tokens_per_s"] for r in sub], style,
                        label=f"{_ctx_label(ctx)} {'all on device' if mode == 'device' else 'hierarchical'}")
    ax.set(xlabel="batch", ylabel="decode tokens/s", title="decode throughput")
    ax.legend(fontsize=8)
    ax = axes[1]
    labels, dev_lat, dev_idx, hier_lat, hier_idx = [], [], [], [], []
    for ctx in ctxs:
        s = payload["contexts"][str(ctx)]["sizes"]
        labels.append(_ctx_label(ctx))
        dev_lat.append(s["device_latent"] / 2**20)
        dev_idx.append(s["device_indexer"] / 2**20)
        hier_lat.append((s["hier_buffer_latent"] + s["hier_buffer_indexer_unused"]) / 2**20)
        hier_idx.append(s["hier_indexer"] / 2**20)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], dev_lat, 0.4, label="all on device: latent")
    ax.bar([i - 0.2 for i in x], dev_idx, 0.4, bottom=dev_lat, label="all on device: indexer")
    ax.bar([i + 0.2 for i in x], hier_lat, 0.4, label="hierarchical: latent buffer")
    ax.bar([i + 0.2 for i in x], hier_idx, 0.4, bottom=hier_lat, label="hierarchical: indexer")
    ax.set_xticks(list(x), labels)
    ax.set(ylabel="device MiB per request", title="device bytes per request")
    ax.legend(fontsize=8)
    fig.suptitle(f"{payload['preset']} ({payload['dtype']}, page {payload['page_size']}) on "
                 f"{payload['device'].get('name', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def _ctx_label(ctx: int) -> str:
    return f"{ctx // 1024}K" if ctx % 1024 == 0 else str(ctx)


if __name__ == "__main__":
    sys.exit(main())
