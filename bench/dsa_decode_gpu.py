"""DeepSeek-V3.2 decode in the engine, DSA with everything on the device ("dense mode" of a DSA model).

A random-weight model at DeepSeek-V3.2's attention shapes (`random:deepseek-v3.2-small`: 4 layers,
128 heads, latent 512 + rope 64, indexer 64 x 128, top-2048, a reduced MoE; bf16) decodes `--steps`
tokens after `batch` prompts of `ctx` random tokens, eagerly and with CUDA graphs. Reports per
(context, batch): prefill seconds, median ms per decode step and tokens/s, whether the graph run
generated the eager run's tokens, the device bytes each request holds (latent KV and indexer keys,
each), the bytes a decode step must read per layer (top-k latent rows + every indexer key), and the
largest batch the free device memory would hold at that context. This is the baseline that
hierarchical DSA (latent KV in host memory) is measured against. Writes JSON and a plot beside it.

Usage (H100/H200; 128K prompts take ~1 min each to prefill, the indexer's scores are fp32)::

    python bench/dsa_decode_gpu.py --contexts 32768 --batches 1,4,8 --out bench/results/dsa_decode_gpu.json
    python bench/dsa_decode_gpu.py --contexts 131072 --batches 1,2 --out bench/results/dsa_decode_gpu_128k.json
    python bench/dsa_decode_gpu.py --preset tiny-deepseek-v3.2 --device cpu --contexts 256 --batches 1,2 --steps 4 \\
        --page-size 16 --out /tmp/dsa_smoke.json  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, write_json  # noqa: E402

from hisa import LLM, SamplingParams  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(loaded, *, device, dtype: str, ctx: int, batch: int, steps: int, page_size: int, chunk: int,
            graphs: bool, seed: int = 0) -> dict:
    mc, d = loaded.config, loaded.config.dsa
    pages_per_request = -(-(ctx + steps + 1) // page_size)
    llm = LLM(loaded=loaded, device=device.type, dtype=dtype, page_size=page_size, progress=False,
              max_model_len=ctx + steps + page_size, max_num_batched_tokens=chunk, max_num_seqs=batch, seed=seed,
              num_kv_pages=batch * pages_per_request + 1, cuda_graphs=graphs)
    engine = llm.engine
    gen = torch.Generator().manual_seed(seed)
    rids = []
    for _ in range(batch):
        lo = min(1000, mc.vocab_size // 4)  # skip special tokens at the ends of the vocabulary
        ids = torch.randint(lo, mc.vocab_size - lo, (ctx,), generator=gen).tolist()
        rids.append(engine.add_request(ids, SamplingParams(max_tokens=steps, ignore_eos=True)))
    tokens, prefill_s, step_ms = {}, 0.0, []
    while engine.has_unfinished_requests():
        decoding = bool(engine.scheduler.running) and not engine.scheduler.waiting and \
            all(s.num_computed >= s.num_prompt for s in engine.scheduler.running)
        sync(device)
        t0 = time.perf_counter()
        for o in engine.step():
            if o.finished:
                tokens[o.request_id] = list(o.token_ids)
        sync(device)
        dt = time.perf_counter() - t0
        if decoding:
            step_ms.append(dt * 1e3)
        else:
            prefill_s += dt
    elt = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    slots = pages_per_request * page_size  # token slots a request holds at the end
    ms = statistics.median(step_ms[1:] or step_ms)
    out = dict(context=ctx, batch=batch, graphs=engine.runner.graphs is not None, prefill_s=prefill_s,
               decode_steps=len(step_ms), first_decode_ms=step_ms[0], decode_ms_per_step=ms,
               tokens_per_s=batch * 1e3 / ms,
               device_latent_bytes_per_request=slots * mc.num_layers * d.latent_dim * elt,
               device_indexer_bytes_per_request=slots * mc.num_layers * d.index_head_dim * elt,
               read_bytes_per_layer_per_request=min(d.index_topk, ctx) * d.latent_dim * elt + ctx * d.index_head_dim * elt,
               tokens=[tokens.get(r) for r in rids])
    if engine.runner.graphs is not None:
        out.update(graph_captures=engine.runner.graphs.captures, graph_replays=engine.runner.graphs.replays)
    del llm, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v3.2-small")
    p.add_argument("--contexts", default="32768")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens (prefill chunk)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-eager", action="store_true", help="only the CUDA-graph rows")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/dsa_decode_gpu.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    t = time.perf_counter()
    loaded = load_model(f"random:{a.preset}", device=device, dtype=getattr(torch, dtype), progress=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    print(f"loaded random:{a.preset} ({dtype}, {weight_bytes / 2**30:.1f} GiB) in {time.perf_counter() - t:.1f} s",
          flush=True)
    modes = [False, True] if device.type == "cuda" else [False]
    if a.no_eager and device.type == "cuda":
        modes = [True]
    rows = []
    for ctx in (int(x) for x in a.contexts.split(",")):
        for batch in (int(x) for x in a.batches.split(",")):
            by_mode = {}
            for graphs in modes:
                r = run_one(loaded, device=device, dtype=dtype, ctx=ctx, batch=batch, steps=a.steps,
                            page_size=a.page_size, chunk=a.chunk, graphs=graphs)
                by_mode[graphs] = r
                if device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(device)
                    per_request = r["device_latent_bytes_per_request"] + r["device_indexer_bytes_per_request"]
                    r["max_batch_fit"] = int((free * 0.85 - 2 * 2**30) // per_request)
                rows.append(r)
                print(f"ctx {ctx:>7} batch {batch:>3} {'graphs' if graphs else 'eager '}: prefill {r['prefill_s']:7.1f} s, "
                      f"decode {r['decode_ms_per_step']:7.2f} ms/step ({r['tokens_per_s']:7.1f} tok/s); per request "
                      f"latent {r['device_latent_bytes_per_request'] / 2**20:7.1f} MiB + indexer "
                      f"{r['device_indexer_bytes_per_request'] / 2**20:6.1f} MiB", flush=True)
            if len(by_mode) == 2:
                by_mode[True]["tokens_equal_eager"] = by_mode[True]["tokens"] == by_mode[False]["tokens"]
                print(f"  graph tokens == eager tokens: {by_mode[True]['tokens_equal_eager']}", flush=True)
    for r in rows:
        r.pop("tokens")
    write_json(a.out, dict(**header(device, a.git_commit), preset=a.preset, dtype=dtype, weight_bytes=weight_bytes,
                           page_size=a.page_size, steps=a.steps, results=rows))
    _plot(rows, a.out.with_suffix(".png"))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for ctx in sorted({r["context"] for r in rows}):
        for graphs in (False, True):
            sub = [r for r in rows if r["context"] == ctx and r["graphs"] == graphs]
            if sub:
                ax.plot([r["batch"] for r in sub], [r["tokens_per_s"] for r in sub], "o-" if graphs else "s--",
                        label=f"ctx {ctx}, {'graphs' if graphs else 'eager'}")
    ax.set(xlabel="batch", ylabel="decode tokens/s", title="DeepSeek-V3.2 shape, DSA all on device")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
