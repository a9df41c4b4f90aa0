"""Sampling a decode step's batch: the batched device sampler vs drawing row by row.

`Sampler.sample` filters every sampled row of a step together ([n, V] with per-row temperature,
min-p, top-k and top-p) and draws each by inverse CDF, with no read per row. Before, each row was
filtered on its own and drawn with `torch.multinomial`, its token read back at once. This times
both, side by side in one run, for a batch of rows that all sample with the same settings, at a real
vocabulary size (SmolLM2's 49,152 by default), on the CPU or a GPU. The row-by-row path is kept here
as the reference. Writes JSON and a plot.

    python bench/sampler_speed.py --out bench/results/sampler_speed_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, bar_pair_plot, header, write_json  # noqa: E402

from hisa import SamplingParams  # noqa: E402
from hisa.engine.sampler import Sampler  # noqa: E402
from hisa.engine.sequence import Sequence  # noqa: E402

SETTINGS = {
    "temperature 0.8": dict(temperature=0.8),
    "top-k 50 + top-p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
}


def row_by_row(logits: torch.Tensor, seqs: list[Sequence], gen: torch.Generator) -> list[int]:
    """The previous sampler: each row filtered alone, drawn with multinomial, read back at once."""
    out = []
    for i, seq in enumerate(seqs):
        p = seq.params
        row = (logits[i].float() - logits[i].max()) / p.temperature
        if p.min_p > 0.0:
            probs = row.softmax(-1)
            row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_k and p.top_k < row.shape[-1]:
            row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1.0:
            sorted_row, order = torch.sort(row, descending=True)
            probs = sorted_row.softmax(-1)
            sorted_row = sorted_row.masked_fill(probs.cumsum(-1) - probs >= p.top_p, float("-inf"))
            row = torch.empty_like(row).scatter_(0, order, sorted_row)
        out.append(int(torch.multinomial(row.softmax(-1), 1, generator=gen)[0]))
    return out


def timed(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--git-commit", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/sampler_speed_cpu.json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    logits = torch.randn(a.batch, a.vocab, generator=torch.Generator().manual_seed(0)).mul_(4).to(dev)
    rows = []
    print(f"{'setting':24s} {'row by row ms':>14s} {'batched ms':>11s} {'speedup':>8s}")
    for name, kw in SETTINGS.items():
        seqs = [Sequence(request_id=str(i), prompt_token_ids=[1], params=SamplingParams(**kw)) for i in range(a.batch)]
        sampler = Sampler(dev, seed=0)
        gen = torch.Generator(device=dev).manual_seed(0)
        old = timed(lambda: row_by_row(logits, seqs, gen), dev, a.reps)
        new = timed(lambda: sampler.sample(logits, seqs), dev, a.reps)
        rows.append(dict(setting=name, params=kw, row_by_row_ms=old, batched_ms=new, speedup=old / new))
        print(f"{name:24s} {old:14.2f} {new:11.2f} {old / new:7.2f}x", flush=True)
    write_json(a.out, dict(**header(dev, a.git_commit), batch=a.batch, vocab=a.vocab, threads=a.threads,
                           reps=a.reps, rows=rows))
    plot(rows, a.out.with_suffix(".png"), f"{a.batch} rows x {a.vocab} tokens, {dev.type}")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    bar_pair_plot(path, [r["setting"] for r in rows], [r["row_by_row_ms"] for r in rows],
                  [r["batched_ms"] for r in rows], before_label="row by row, multinomial",
                  after_label="batched, inverse CDF", ylabel="ms per step's sampling",
                  title=f"Sampling a batch: {title}")


if __name__ == "__main__":
    sys.exit(main())
