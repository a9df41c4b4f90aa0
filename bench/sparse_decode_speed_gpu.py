"""Decode speed, side by side in one process: dense vs sparse eager vs sparse with CUDA graphs.

A random-weight model of Llama-3.1-8B's shape (bf16) decodes `--steps` tokens after `batch`
prompts of `ctx` random tokens, for each batch size:
  * dense / dense graphs: the whole KV in the paged device cache, eager / decode steps replayed
    from CUDA graphs;
  * <algorithm> eager / graphs: the hierarchical sparse cache, the same two ways.
It reports the median ms per decode step and tokens/s of each, the ratio to dense (graphs when
that row ran), and whether each graph run generated exactly its eager run's tokens. Writes JSON
(and a plot beside it). `--no-eager` runs only the graph rows.

Usage (H100)::

    python bench/sparse_decode_speed_gpu.py --contexts 32768 --batches 1,4,8 --out bench/results/sparse_decode_speed_gpu.json
    python bench/sparse_decode_speed_gpu.py --preset tiny-llama --contexts 2048 --batches 1,2 --device cpu --steps 4  # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, write_json  # noqa: E402
from sparse_memory_gpu import run_one  # noqa: E402

from hisa.models.factory import load_model  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3.1-8b", help="random-weight model shape (random:<preset>)")
    p.add_argument("--contexts", default="32768")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--dense-max-batch", type=int, default=8, help="skip dense runs above this batch")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--algorithm", default="quest")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-eager", action="store_true", help="skip the eager rows")
    p.add_argument("--no-sparse-eager", action="store_true", help="skip the sparse eager rows only")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/sparse_decode_speed_gpu.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    t = time.perf_counter()
    loaded = load_model(f"random:{a.preset}", device=device, dtype=getattr(torch, dtype), progress=False)
    print(f"loaded random:{a.preset} ({dtype}) in {time.perf_counter() - t:.1f} s", flush=True)
    mc = loaded.config
    token_bytes = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    limit = mc.max_position_embeddings - a.steps - a.page_size
    runs = []
    for ctx in (min(int(c), limit) for c in a.contexts.split(",")):
        for batch in (int(b) for b in a.batches.split(",")):
            common = dict(device=device, dtype=dtype, ctx=ctx, steps=a.steps, batch=batch, page_size=a.page_size,
                          chunk=a.chunk, seed=0)
            rows = []
            for graphs in ([False] if not a.no_eager else []) + [True]:
                if batch > a.dense_max_batch:
                    break
                label = "dense graphs" if graphs else "dense"
                print(f"{label} ctx={ctx} batch={batch} ...", flush=True)
                try:
                    rows.append((label, run_one(loaded, sparse=None, cuda_graphs=graphs, **common)))
                except torch.OutOfMemoryError:
                    print("  out of memory", flush=True)
                    rows.append((label, dict(mode=label, context=ctx, batch=batch, oom=True)))
                    torch.cuda.empty_cache()
            pool_gb = batch * (ctx + a.steps + 2 * a.page_size) * token_bytes * 1.02 / 2**30 + 0.25
            cfg = SparseConfig(algorithm=a.algorithm, token_budget=a.budget, min_prompt_len=1024,
                               host_pool_gb=pool_gb, max_sparse_requests=batch)
            for graphs in ([False] if not (a.no_eager or a.no_sparse_eager) else []) + [True]:
                label = f"{a.algorithm} {'graphs' if graphs else 'eager'}"
                print(f"{label} ctx={ctx} batch={batch} ...", flush=True)
                try:
                    rows.append((label, run_one(loaded, sparse=cfg, cuda_graphs=graphs, **common)))
                except Exception as e:  # recorded, so one failing row does not lose the others
                    print(f"  failed: {type(e).__name__}: {e}", flush=True)
                    rows.append((label, dict(mode=label, context=ctx, batch=batch, error=f"{type(e).__name__}: {e}")))
                    torch.cuda.empty_cache() if device.type == "cuda" else None
            by = dict(rows)
            ref = by.get("dense graphs") if "decode_ms_per_step" in by.get("dense graphs", {}) else by.get("dense", {})
            for label, r in rows:
                r["row"] = label
                if "decode_ms_per_step" in r and "decode_ms_per_step" in ref:
                    r["speedup_vs_dense"] = ref["decode_ms_per_step"] / r["decode_ms_per_step"]
                    r["dense_reference"] = ref["row"] if "row" in ref else "dense"
            for eager_label, graph_label in (("dense", "dense graphs"),
                                             (f"{a.algorithm} eager", f"{a.algorithm} graphs")):
                eager, graph = by.get(eager_label), by.get(graph_label)
                if eager and graph and "tokens" in eager and "tokens" in graph:
                    graph["same_tokens_as_eager"] = graph["tokens"] == eager["tokens"]
                    graph["speedup_vs_eager"] = eager["decode_ms_per_step"] / graph["decode_ms_per_step"]
            runs += [r for _, r in rows]
    print(f"\n{'row':16s} {'context':>8s} {'batch':>5s} {'ms/step':>8s} {'tok/s':>8s} {'x dense':>8s} "
          f"{'x eager':>8s} {'tokens = eager':>14s}")
    for r in runs:
        if r.get("oom") or r.get("error"):
            print(f"{r['row']:16s} {r['context']:8d} {r['batch']:5d} {'OOM' if r.get('oom') else 'error':>8s}")
            continue
        print(f"{r['row']:16s} {r['context']:8d} {r['batch']:5d} {r['decode_ms_per_step']:8.2f} "
              f"{r['tokens_per_s']:8.1f} {r.get('speedup_vs_dense', float('nan')):8.2f} "
              f"{r.get('speedup_vs_eager', float('nan')):8.2f} {str(r.get('same_tokens_as_eager', '')):>14s}")
    for r in runs:
        r.pop("tokens", None)
    write_json(a.out, dict(**header(device, a.git_commit), model=f"random:{a.preset}", dtype=dtype,
                           page_size=a.page_size, budget_tokens=a.budget, algorithm=a.algorithm, steps=a.steps,
                           runs=runs))
    _plot(runs, a.out.with_suffix(".png"))
    return 0


def _plot(runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["row"] for r in runs):
        pts = [(r["batch"], r["tokens_per_s"]) for r in runs if r["row"] == label and "tokens_per_s" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("batch (requests decoding together)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput at {runs[0]['context']} tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
