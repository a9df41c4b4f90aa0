"""MLA decode attention (absorbed form, paged latent cache) and the DSA indexer's top-k at DeepSeek-V3.2's shapes.

For each (batch, context): the Triton kernel `mla_decode_attention` over the indexer's top-2048
(sparse, DSA's decode) and over every token (dense MLA), and `indexer_topk` (on CUDA the fused
score kernel over every cached indexer key, then torch.topk), all in bf16 with 128 heads, latent
512 + rope 64, indexer 64 heads x 128, pages of 64 tokens. Reports the median time of each (CUDA
events), the bytes each must read (latent rows 1,152 B each; indexer keys 256 B each) and the
bandwidth that makes, next to the HBM bound. A first pass sweeps the kernel's tiling (block_h, block_n, num_warps) on the sparse
batch-8 case and uses the best for the rest. Checks each kernel configuration against the torch
reference on one small batch. Writes JSON and a plot beside it.

Usage (H100/H200)::

    python bench/mla_decode_gpu.py --out bench/results/mla_decode_gpu.json
    python bench/mla_decode_gpu.py --device cpu --batches 1 --contexts 256 --heads 16 --latent 32 --rope 16 --topk 64 \\
        --index-heads 4 --index-dim 32 --page-size 16 --reps 1 --no-sweep --out /tmp/mla_smoke.json  # smoke (interpreter)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

from _common import REPO, header, write_json  # noqa: E402

from hisa.attention.dsa_indexer import indexer_topk  # noqa: E402
from hisa.attention.mla_decode import mla_decode_attention  # noqa: E402
from hisa.attention.mla_reference import mla_decode_attention_ref  # noqa: E402

HBM_GBPS = {"H200": 4200.0, "H100": 3000.0}  # measured-ish HBM bandwidth (docs: H200 ~4.2 TB/s)


def timed(fn, *, reps: int, device: torch.device) -> float:
    """Median milliseconds of `fn()` over `reps` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def make_inputs(a, batch: int, ctx: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A paged latent cache and indexer cache holding `batch` requests of `ctx` tokens (pages shuffled),
    absorbed queries, indexer queries/weights, and a random top-k selection per request."""
    gen = torch.Generator(device=device).manual_seed(seed)
    S, pages_per = a.page_size, -(-ctx // a.page_size)
    P = batch * pages_per
    latent = torch.randn(P, S, a.latent + a.rope, generator=gen, device=device, dtype=dtype)
    index = torch.randn(P, S, a.index_dim, generator=gen, device=device, dtype=dtype)
    table = torch.randperm(P, generator=gen, device=device).to(torch.int32).view(batch, pages_per)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, a.heads, a.latent + a.rope, generator=gen, device=device, dtype=dtype)
    iq = torch.randn(batch, a.index_heads, a.index_dim, generator=gen, device=device, dtype=dtype)
    iw = torch.randn(batch, a.index_heads, generator=gen, device=device)
    k = min(a.topk, ctx)
    sel = torch.stack([torch.randperm(ctx, generator=gen, device=device)[:k] for _ in range(batch)]).to(torch.int32)
    return latent, index, table, lens, q, iq, iw, sel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--latent", type=int, default=512)
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--index-heads", type=int, default=64)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-sweep", action="store_true", help="use the launcher's default tiling")
    p.add_argument("--sweep-batch", type=int, default=None,
                   help="batch of the tiling sweep (default 8 if among --batches, else the first)")
    p.add_argument("--dense-max-tokens", type=int, default=8 * 131072, help="skip dense MLA above batch x context")
    p.add_argument("--device", default="cuda")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/mla_decode_gpu.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = (128 + a.rope) ** -0.5 * 1.3689 ** 2  # DeepSeek-V3.2's softmax scale (YaRN x40)
    row_bytes = (a.latent + a.rope) * torch.empty((), dtype=dtype).element_size()
    key_bytes = a.index_dim * torch.empty((), dtype=dtype).element_size()
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    hbm = next((v for k, v in HBM_GBPS.items() if k in gpu_name), None)
    batches = [int(x) for x in a.batches.split(",")]
    contexts = [int(x) for x in a.contexts.split(",")]

    # 1. correctness of every tiling against the reference, and the sweep
    configs = [dict()]  # the launcher's default tiling (default_mla_tiling)
    if not a.no_sweep:
        configs = [dict(block_h=h, block_n=n, num_warps=w)
                   for h, n, w in itertools.product((16, 32, 64), (16, 32, 64), (4, 8))]
    small = make_inputs(a, 2, min(contexts[0], 4 * a.topk), device, dtype, seed=1)
    ref = mla_decode_attention_ref(small[4].float(), small[0].float(), small[2], small[3], scale=scale,
                                   kv_lora_rank=a.latent, indices=small[7])
    sweep, best = [], None
    sweep_batch = a.sweep_batch or (8 if 8 in batches else batches[0])
    latent, index, table, lens, q, iq, iw, sel = make_inputs(a, sweep_batch, contexts[0], device, dtype)
    for cfg in configs:
        try:
            out = mla_decode_attention(small[4], small[0], small[2], small[3], scale=scale, kv_lora_rank=a.latent,
                                       indices=small[7], use_triton=True, **cfg)
            err = (out.float() - ref).abs().max().item()
            ms = timed(lambda: mla_decode_attention(q, latent, table, lens, scale=scale, kv_lora_rank=a.latent,
                                                    indices=sel, use_triton=True, **cfg), reps=a.reps, device=device)
        except Exception as e:  # a tiling that does not compile (shared memory, registers) is recorded and skipped
            sweep.append(dict(**cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        sweep.append(dict(**cfg, ms=ms, max_abs_err_vs_reference=err))
        print(f"tiling {cfg}: {ms * 1e3:.1f} us, max |err| {err:.2e}", flush=True)
        if err < 5e-2 and (best is None or ms < best[1]):
            best = (cfg, ms)
    if best is None:
        raise SystemExit("no kernel tiling ran correctly; see the sweep above")
    cfg = best[0]
    print(f"best tiling: {cfg}", flush=True)
    del latent, index, table, lens, q, iq, iw, sel

    # 2. the grid
    rows = []
    for ctx, batch in itertools.product(contexts, batches):
        latent, index, table, lens, q, iq, iw, sel = make_inputs(a, batch, ctx, device, dtype)
        row = dict(context=ctx, batch=batch, topk=sel.shape[1])
        ms = timed(lambda: mla_decode_attention(q, latent, table, lens, scale=scale, kv_lora_rank=a.latent,
                                                indices=sel, use_triton=True, **cfg), reps=a.reps, device=device)
        nbytes = batch * sel.shape[1] * row_bytes
        row.update(sparse_mla_us=ms * 1e3, sparse_mla_bytes=nbytes, sparse_mla_gbps=nbytes / ms / 1e6)
        if batch * ctx <= a.dense_max_tokens:
            ms = timed(lambda: mla_decode_attention(q, latent, table, lens, scale=scale, kv_lora_rank=a.latent,
                                                    use_triton=True, **cfg), reps=a.reps, device=device)
            nbytes = batch * ctx * row_bytes
            row.update(dense_mla_us=ms * 1e3, dense_mla_bytes=nbytes, dense_mla_gbps=nbytes / ms / 1e6)
        ms = timed(lambda: indexer_topk(iq, iw, index, table, lens, topk=a.topk, scale=a.index_dim ** -0.5),
                   reps=a.reps, device=device)
        nbytes = batch * ctx * key_bytes
        row.update(indexer_topk_us=ms * 1e3, indexer_bytes=nbytes, indexer_gbps=nbytes / ms / 1e6)
        rows.append(row)
        print(f"ctx {ctx:>7} batch {batch:>3}: sparse MLA {row['sparse_mla_us']:8.1f} us "
              f"({row['sparse_mla_gbps']:7.1f} GB/s)  dense MLA {row.get('dense_mla_us', float('nan')):9.1f} us "
              f"({row.get('dense_mla_gbps', float('nan')):7.1f} GB/s)  indexer top-k {row['indexer_topk_us']:9.1f} us "
              f"({row['indexer_gbps']:7.1f} GB/s)", flush=True)
        del latent, index, table, lens, q, iq, iw, sel
        if device.type == "cuda":
            torch.cuda.empty_cache()

    shapes = dict(heads=a.heads, latent=a.latent, rope=a.rope, topk=a.topk, index_heads=a.index_heads,
                  index_dim=a.index_dim, page_size=a.page_size, dtype=str(dtype))
    write_json(a.out, dict(**header(device, a.git_commit), shapes=shapes, hbm_gbps_reference=hbm, tiling=cfg,
                           sweep=sweep, results=rows))
    _plot(rows, a.out.with_suffix(".png"), hbm)
    return 0


def _plot(rows: list[dict], path: Path, hbm: float | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for ctx in sorted({r["context"] for r in rows}):
        sub = [r for r in rows if r["context"] == ctx]
        b = [r["batch"] for r in sub]
        ax[0].plot(b, [r["sparse_mla_us"] for r in sub], "o-", label=f"sparse MLA top-k, ctx {ctx}")
        ax[0].plot(b, [r["indexer_topk_us"] for r in sub], "s--", label=f"indexer top-k, ctx {ctx}")
        ax[1].plot(b, [r["sparse_mla_gbps"] for r in sub], "o-", label=f"sparse MLA, ctx {ctx}")
        ax[1].plot(b, [r["indexer_gbps"] for r in sub], "s--", label=f"indexer, ctx {ctx}")
        dense = [r for r in sub if "dense_mla_gbps" in r]
        if dense:
            ax[1].plot([r["batch"] for r in dense], [r["dense_mla_gbps"] for r in dense], "^:",
                       label=f"dense MLA, ctx {ctx}")
    if hbm:
        ax[1].axhline(hbm, color="gray", lw=0.8, label="HBM")
    ax[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="us per layer", title="time per layer")
    ax[1].set(xscale="log", xlabel="batch", ylabel="GB/s of required bytes", title="bandwidth")
    for x in ax:
        x.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
