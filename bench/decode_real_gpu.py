"""Decode throughput of a real model, dense vs sparse, side by side in one run (issue 10's real-model row).

SmolLM2-135M-Instruct (the embedded GGUF, or `--model PATH`) decodes after `--batch` real-text prompts
of about `--tokens` tokens each: the eval suite's tasks (haystacks of English sentences with needles,
word lists, variable chains) wrapped in the chat template, as `hisa eval` sends them. Every engine
runs the same prompts; each timed step records the batch it really ran and the tokens it produced.
Sparse rows attend to `--budget-frac` of the context (sinks + selected pages + recent window) and
report the device-buffer hit rate and bytes moved host-to-device per step.

Usage (GPU)::

    python bench/decode_real_gpu.py --out bench/results/decode_real_gpu.json
    python bench/decode_real_gpu.py --device cpu --batch 2 --tokens 1500 --steps 4 --out /tmp/smoke.json  # smoke
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
from _common import REPO, checked_step, header, write_json  # noqa: E402

from hisa import LLM, SamplingParams  # noqa: E402
from hisa.eval.runner import prompt_ids  # noqa: E402
from hisa.eval.tasks import TASKS, generate_suite  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_prompts(tokenizer, *, batch: int, tokens: int, seed: int) -> list[list[int]]:
    """`batch` prompts of about `tokens` tokens, cycling through the suite's tasks."""
    tasks = sorted(TASKS)
    per_task = -(-batch // len(tasks))
    suite = generate_suite(tokenizer, tasks=tasks, lengths=[tokens], samples_per_task=per_task, seed=seed)
    # interleave tasks so a small batch still mixes them
    # (generate_suite lists each task's samples together: the i-th sample is number i % per_task of its task)
    suite = [s for _, s in sorted(enumerate(suite), key=lambda e: (e[0] % per_task, e[1].task))]
    return [prompt_ids(tokenizer, s) for s in suite[:batch]]


def run_engine(loaded, prompts, *, device, name, sparse, steps, chunk, util, page_size) -> dict:
    longest = max(len(p) for p in prompts)
    llm = LLM(loaded=loaded, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
              page_size=page_size, progress=False, max_model_len=longest + steps + 4 * len(prompts) + page_size,
              max_num_batched_tokens=chunk, max_num_seqs=len(prompts), sparse=sparse, gpu_memory_utilization=util,
              prefix_cache=False)  # prompts of one task share a prefix: dense must not share pages here
    e = llm.engine
    spare = len(prompts) * -(-longest // chunk) + 4  # steps early requests decode while later ones prefill
    rids = [e.add_request(p, SamplingParams(max_tokens=steps + spare, ignore_eos=True)) for p in prompts]
    t0 = time.perf_counter()
    while any(s.num_computed < s.num_prompt for s in e.scheduler.running) or e.scheduler.waiting:
        checked_step(e)
    sync(device)
    prefill_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        running = len(e.scheduler.running)
        sync(device)
        t = time.perf_counter()
        produced = len(checked_step(e))
        sync(device)
        times.append((time.perf_counter() - t, produced, running))
    warm = times[2:]
    total = sum(s for s, _, _ in warm)
    row = dict(row=name, prompts=len(prompts), prompt_tokens_mean=statistics.mean(len(p) for p in prompts),
               prefill_s=prefill_s, steps_timed=len(warm), tokens_produced=sum(n for _, n, _ in warm),
               tokens_per_s=sum(n for _, n, _ in warm) / total,
               ms_per_step=statistics.median(s * 1e3 for s, _, _ in warm),
               running_batch_per_step=[r for _, _, r in warm], warmup_ms=[round(s * 1e3, 2) for s, _, _ in times[:2]])
    if e.sparse is not None:
        st = e.sparse.summary()
        row.update(hit_rate=st["hit_rate"], bytes_h2d_per_step=st["bytes_h2d_per_step"], misses=st["misses"],
                   prefetched_pages=st["prefetched_pages"], prefetch=sparse.prefetch, warm_start=sparse.warm_start,
                   resident_requests=st["resident_requests"], host_backed_requests=st["host_backed_requests"],
                   budget_tokens=sparse.token_budget, residency=sparse.residency)
    for rid in rids:
        e.abort_request(rid)
    llm.close()
    del llm, e
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF/HF path; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=6400, help="target prompt length (the chat template adds ~30)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--algorithms", default="quest,lowbit", help="comma-separated sparse rows beside dense")
    p.add_argument("--residencies", default="auto,host",
                   help="sparse residencies to run (auto: HBM first); a '+prefetch' suffix (e.g. host+prefetch) "
                        "also loads each global layer's picks into the next layer's buffer ahead (SparseConfig.prefetch), "
                        "'+cold' starts decode from empty device buffers (SparseConfig.warm_start off)")
    p.add_argument("--budget-frac", type=float, default=1 / 8)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--util", type=float, default=0.5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/decode_real_gpu.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    loaded = load_model(a.model, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                        progress=False)
    tok = loaded.tokenizer
    if tok is None:
        raise SystemExit("this benchmark needs a real model with a tokenizer (not a random: preset)")
    prompts = make_prompts(tok, batch=a.batch, tokens=a.tokens, seed=a.seed)
    ctx = statistics.mean(len(x) for x in prompts)
    budget = int(ctx * a.budget_frac) // a.page_size * a.page_size
    print(f"{len(prompts)} prompts, {ctx:.0f} tokens on average; sparse budget {budget} tokens", flush=True)
    specs = [("dense", None)]
    for alg in (x for x in a.algorithms.split(",") if x):
        for res in (x for x in a.residencies.split(",") if x):
            where, *extra = res.split("+")
            if set(extra) - {"prefetch", "cold"}:
                raise SystemExit(f"unknown residency suffix in {res!r} (only '+prefetch', '+cold')")
            specs.append((f"{alg} {res}", SparseConfig(algorithm=alg, token_budget=budget, residency=where,
                                                       min_prompt_len=1024, max_sparse_requests=len(prompts),
                                                       prefetch="prefetch" in extra, warm_start="cold" not in extra)))
    rows = []
    def payload(partial):
        return dict(**header(device, a.git_commit), model=str(loaded.source.path), config=loaded.config.name,
                    dtype="bfloat16" if device.type == "cuda" else "float32", page_size=a.page_size,
                    budget_frac=a.budget_frac, budget_tokens=budget, steps=a.steps, partial=partial, rows=rows,
                    note="hit rate and H2D bytes are totals since the engine started (prefill included)")
    for name, sp in specs:
        try:
            r = run_engine(loaded, prompts, device=device, name=name, sparse=sp, steps=a.steps, chunk=a.chunk,
                           util=a.util, page_size=a.page_size)
        except Exception as exc:  # noqa: BLE001 — one failed row must not lose the others
            r = dict(row=name, error=f"{type(exc).__name__}: {exc}")
        if "error" not in r and rows and "tokens_per_s" in rows[0]:
            r["speedup_vs_dense"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        rows.append(r)
        print(r if "error" in r else f"{name:14s} {max(r['running_batch_per_step']):3d} reqs  "
              f"{r['ms_per_step']:7.2f} ms/step  {r['tokens_per_s']:8.1f} tok/s  "
              f"x dense {r.get('speedup_vs_dense', 1.0):5.2f}  hit {r.get('hit_rate', float('nan')):.3f}  "
              f"H2D {r.get('bytes_h2d_per_step', 0) / 2**20:6.2f} MiB/step", flush=True)
        write_json(a.out, payload(True))
    write_json(a.out, payload(False))
    _plot(rows, a.out.with_suffix(".png"))
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["row"] for r in ok], [r["tokens_per_s"] for r in ok], color=["#777"] + ["#2a7"] * (len(ok) - 1))
    for i, r in enumerate(ok):
        ax.text(i, r["tokens_per_s"], f"{r['ms_per_step']:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens produced / s")
    ax.set_title(f"decode, {ok[0]['prompts'] if ok else 0} real-text prompts of ~{ok[0]['prompt_tokens_mean']:.0f} tokens"
                 if ok else "decode")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
