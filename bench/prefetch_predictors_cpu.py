"""Can a host-backed request's misses be loaded ahead? Predictors replayed on a real model's selections.

A host-backed sparse request keeps `buffer_ratio x budget` pages per layer on the device (an LRU)
and loads the pages its selection picks that the buffer lacks: on the layer's critical path. A
miss loaded *ahead* (on a side stream, while other work runs) would not stall it, if it can be
predicted. This runs SmolLM2-135M-Instruct (the embedded GGUF, CPU, fp32) on the eval suite's
real-text prompts with Quest over resident rows (`residency="device"`: the selections are the
same, nothing moves), records every decode step's page scores and picks per layer, then replays
them through an LRU buffer of the engine's size per (request, layer), side by side:

  * `lru`: no prediction (what the engine does by default);
  * `next-layer`: each layer's picks also loaded into the next layer's buffer before that layer
    selects (`SparseConfig.prefetch`; the guess that adjacent layers pick alike);
  * `near-cut m`: after each step, the m best-scored pages just below the cut loaded into the
    layer's buffer for the next step (the guess that the pages a step almost picked come next).

Reported per predictor: the demand hit rate (the misses left on the critical path), the pages
loaded ahead, and the loads per step in all. The demand set of a step is its picks plus the sink
page and the recent pages, as the engine composes it. (Loading a step's *previous* picks for the
same layer is no predictor: they are in the buffer already.)

    python bench/prefetch_predictors_cpu.py --out bench/results/prefetch_predictors_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, bar_pair_plot, header, write_json  # noqa: E402
from decode_real_gpu import make_prompts  # noqa: E402

import hisa.sparse.quest as quest  # noqa: E402
from hisa import LLM, SamplingParams  # noqa: E402
from hisa.sparse.config import SparseConfig  # noqa: E402


def record(args) -> tuple[dict[int, list], dict]:
    """Decode with Quest and keep, per layer, each step's (scores [R, P], picks [R, K], sparse slots [R])."""
    rec: dict[int, list] = {}
    orig = quest.QuestAlgorithm.retrieve_topk

    def spy(self, layer, q, rows):
        picks = orig(self, layer, q, rows)
        scores = quest.page_scores(q, self.kmin[layer], self.kmax[layer], rows.sparse_slots, rows.lo, rows.hi,
                                   scale=self.scale)
        # copies: on the CPU .cpu() would return the engine's own buffers, which later steps overwrite
        rec.setdefault(layer, []).append(tuple(x.to("cpu", copy=True) for x in (scores, picks, rows.sparse_slots)))
        return picks

    sparse = SparseConfig(algorithm="quest", token_budget=args.budget, residency="device", min_prompt_len=1024,
                          max_sparse_requests=args.batch, buffer_ratio=args.buffer_ratio)
    llm = LLM(model=args.model, device="cpu", dtype="float32", page_size=args.page_size, progress=True,
              max_num_seqs=args.batch, prefix_cache=False, max_model_len=args.tokens + args.steps + 256,
              max_num_batched_tokens=8192, sparse=sparse)
    prompts = make_prompts(llm.tokenizer, batch=args.batch, tokens=args.tokens, seed=args.seed)
    quest.QuestAlgorithm.retrieve_topk = spy
    try:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=args.steps, ignore_eos=True))
        run_s = time.perf_counter() - t
    finally:
        quest.QuestAlgorithm.retrieve_topk = orig
    e = llm.engine
    info = dict(prompt_tokens=[len(p) for p in prompts], run_s=run_s, layers=len(rec),
                budget_pages=sparse.budget_pages(args.page_size),
                buffer_slots=sparse.buffer_slots(args.page_size), sink_pages=sparse.sink_pages,
                recent_pages=sparse.recent_pages, model=str(e.loaded.source.path), config=e.loaded.config.name)
    llm.close()
    return rec, info


def replay(rec: dict[int, list], *, capacity: int, sinks: int, recent: int, next_layer: bool = False,
           near_cut: int = 0) -> dict:
    """Replay the recorded picks through per-(request, layer) LRU buffers of `capacity` pages."""
    layers = sorted(rec)
    steps = min(len(rec[layer]) for layer in layers)
    bufs: dict[tuple[int, int], dict[int, float]] = {}
    demand_total = misses = ahead = cold = 0

    def insert(buf: dict[int, float], pages, clock: float) -> int:
        new = 0
        for p in pages:
            if p not in buf:
                new += 1
            buf[p] = max(buf.get(p, clock), clock)
        return new

    def trim(buf: dict[int, float], keep: set[int]) -> None:
        while len(buf) > capacity:
            victim = min((p for p in buf if p not in keep), key=buf.get)
            del buf[victim]

    for t in range(steps):
        for li, layer in enumerate(layers):
            scores, picks, slots = rec[layer][t]
            for r in range(scores.shape[0]):
                valid = torch.isfinite(scores[r])
                if not valid.any():
                    continue
                s = int(slots[r])
                first = (s, layer) not in bufs
                buf = bufs.setdefault((s, layer), {})
                chosen = [int(p) for p in picks[r] if p >= 0]
                hi = int(valid.nonzero().max()) + 1  # the middle range ends where the recent pages start
                demand = set(chosen) | set(range(sinks)) | set(range(hi, hi + recent))
                demand_total += len(demand)
                missed = sum(1 for p in demand if p not in buf)
                misses += missed
                cold += missed if first else 0  # a request's first decode step in the layer: an empty buffer
                insert(buf, demand, t + 1.0)
                trim(buf, demand)
                if next_layer and li + 1 < len(layers):  # loaded into the next layer's buffer before it selects
                    nbuf = bufs.setdefault((s, layers[li + 1]), {})
                    ahead += insert(nbuf, demand, t + 0.75)
                    trim(nbuf, set())
                if near_cut:
                    order = torch.argsort(scores[r], descending=True)[: len(chosen) + near_cut]
                    extra = [int(p) for p in order if valid[p] and int(p) not in demand][:near_cut]
                    ahead += insert(buf, extra, t + 0.5)
                    trim(buf, demand)
    rows = sum(1 for layer in layers[:1] for sc, _, _ in rec[layer][:steps] for r in range(sc.shape[0]))
    return dict(demand_hit_rate=1 - misses / demand_total, demand_misses=misses, cold_misses=cold,
                warm_hit_rate=1 - (misses - cold) / demand_total, loaded_ahead=ahead,
                loads=misses + ahead, demand_pages=demand_total, request_steps=rows,
                loads_per_request_layer_step=(misses + ahead) / max(1, rows * len(layers)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF/HF path; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=6400)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--budget", type=int, default=784, help="token budget (784: 1/8 of the prompts, as decode_real_gpu)")
    p.add_argument("--buffer-ratio", type=float, default=2.0)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--near-cut", default="4,8,16,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/prefetch_predictors_cpu.json")
    args = p.parse_args(argv)
    rec, info = record(args)
    cap, sinks, recent = info["buffer_slots"], info["sink_pages"], info["recent_pages"]
    rows = [dict(predictor="lru", **replay(rec, capacity=cap, sinks=sinks, recent=recent)),
            dict(predictor="next-layer", **replay(rec, capacity=cap, sinks=sinks, recent=recent, next_layer=True))]
    rows += [dict(predictor=f"near-cut {m}", **replay(rec, capacity=cap, sinks=sinks, recent=recent, near_cut=m))
             for m in (int(x) for x in args.near_cut.split(",") if x)]
    base = rows[0]["loads"]
    print(f"{'predictor':12s} {'demand hit':>10s} {'warm hit':>9s} {'misses':>8s} {'ahead':>8s} {'loads vs lru':>12s}")
    for r in rows:
        r["loads_vs_lru"] = r["loads"] / base
        print(f"{r['predictor']:12s} {r['demand_hit_rate']:10.4f} {r['warm_hit_rate']:9.4f} {r['demand_misses']:8d} "
              f"{r['loaded_ahead']:8d} "
              f"{r['loads_vs_lru']:12.2f}")
    write_json(args.out, dict(**header(torch.device("cpu"), args.git_commit), batch=args.batch, tokens=args.tokens,
                              steps=args.steps, budget_tokens=args.budget, page_size=args.page_size, **info, rows=rows))
    bar_pair_plot(args.out.with_suffix(".png"), [r["predictor"] for r in rows],
                  [1 - r["demand_hit_rate"] for r in rows], [r["loaded_ahead"] / max(1, r["demand_pages"]) for r in rows],
                  before_label="demand misses / pages picked", after_label="pages loaded ahead / pages picked",
                  ylabel="fraction of the pages picked", title="SmolLM2, Quest, host-backed buffer replayed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
