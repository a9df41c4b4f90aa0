"""How much of the true attention each page selector captures, per layer, on real eval prompts.

For every decode step and every layer, the probe computes the exact attention of each query head
over the middle of the context (everything but the sink and recent pages, which are always read)
and asks each candidate selector for its pages at the same budget. A selector's *recall* for one
head is the share of that head's middle attention mass that falls in the pages it picked; the
table reports the mean over heads, steps and prompts, and the mean of the worst head per step
(a retrieval head that loses its needle is what breaks an answer).

Candidates, all at the same number of middle pages per step:
  oracle          exact page mass, one page list per request (summed over heads): what runs as "oracle"
  oracle/kvhead   exact page mass, one list per KV head (the bound for per-KV-head page tables)
  quest           hisa's quest: per-head upper bounds → softmax over pages → summed over heads
  quest/kvhead    the same bounds, softmax per head, summed over the heads of one KV group, a list per KV head
  quest/kvhead-max  the Quest paper's rule per KV head: the max over the group's query heads of the raw bound
  centroid        q·mean(k) of each page alone (softmax per head, summed)
  quest-mean      what runs as "quest-mean": softmax of the bound + softmax of q·mean(k), summed over heads
  int4 / int2     token-level scores from keys quantized per token and head (one group of head_dim
                  channels), each page's summed softmax mass: the study that led to lowbit
  lowbit          what runs as "lowbit" (hisa.sparse.lowbit: 4-bit keys, groups of 32 channels with
                  fp16 step/min, softmax per head, each page's summed softmax mass, mean over the GQA
                  group, summed over KV heads), scored by the shipped `lowbit_page_scores`
  lowbit-max      the same, the group's query heads pooled by max ("lowbit-max")
  lowbit-best     the same, each page's best token instead of its mass ("lowbit-best"; this row was
                  "lowbit" and the mass row "lowbit-mass" in the JSON files before 2026-12-02)
  lowbit-2bit     the same at 2 bits ("lowbit-2bit")

Besides recall and the attention-output error, it counts how often the heaviest page of each
"sharp" head (one page holding > 30% of its middle mass: retrieval-like heads) is among the picks.

The trajectory is driven by the oracle's pick (near dense), so every selector is scored on the same
queries. Prompts are the eval suite's (same generators and seeds as ``hisa eval``). Requests run
resident (every page on the device), one at a time.

Usage::

    python bench/selection_recall.py --lengths 2048 --samples 2 --budget 1/8 --page-sizes 16,8
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, write_json  # noqa: E402

from hisa.sparse.base import DecodeRows, register  # noqa: E402
from hisa.sparse.lowbit import LowBit2Algorithm, LowBitAlgorithm  # noqa: E402
from hisa.sparse.lowbit_scores import lowbit_page_scores  # noqa: E402
from hisa.sparse.quest import QuestMeanAlgorithm  # noqa: E402

CANDIDATES = ["oracle", "oracle/kvhead", "quest", "quest/kvhead", "quest/kvhead-max", "centroid", "quest-mean",
              "int4", "int2", "lowbit", "lowbit-max", "lowbit-best", "lowbit-2bit"]
_SUMS: dict = defaultdict(lambda: torch.zeros(7, dtype=torch.float64))  # (cand, layer) → sums, see retrieve_topk


@register("recall-probe")
class RecallProbe(QuestMeanAlgorithm):
    """quest-mean's and lowbit's representations + the exact attention; records every candidate's
    recall, returns oracle's pick."""

    coordinator = None  # the engine's SparseCoordinator (set by main): the probe reads the step's pages

    def __init__(self, **kw):
        super().__init__(**kw)
        self.lowbit4, self.lowbit2 = LowBitAlgorithm(**kw), LowBit2Algorithm(**kw)

    def construct_representations(self, layer, slot, first_page, keys):
        super().construct_representations(layer, slot, first_page, keys)
        for a in (self.lowbit4, self.lowbit2):
            a.construct_representations(layer, slot, first_page, keys)

    def update_representations(self, layer, rows, keys):
        super().update_representations(layer, rows, keys)
        for a in (self.lowbit4, self.lowbit2):
            a.update_representations(layer, rows, keys)

    def retrieve_topk(self, layer, q, rows: DecodeRows):
        r, s, kvh, d = q.shape[0], self.page_size, self.num_kv_heads, self.head_dim
        g = self.num_heads // kvh
        view, cache = self.coordinator._d, self.coordinator.cache
        if r != 1:
            raise ValueError("the probe runs one request at a time")
        t, lo, hi = int(rows.t[0]), int(rows.lo[0]), int(rows.hi[0])  # eager: a bench, not the hot path
        n = -(-t // s)
        pages = view.block_table[int(view.slot[0]), :n].long()  # resident: every page on the device
        keys = cache.keys(layer)[pages].float().reshape(1, n * s, kvh, d)
        vals = cache.values(layer)[pages].float().reshape(1, n * s, kvh, d)
        tok = torch.arange(n * s, device=q.device)
        tok_ok = tok[None, :] < t  # written tokens (this step's included)
        logits = torch.einsum("rkgd,rtkd->rkgt", q.float().view(r, kvh, g, d), keys) * self.scale
        logits = logits.masked_fill(~tok_ok[:, None, None, :], float("-inf"))
        page_of = tok // s
        always = ((page_of < lo) | (page_of >= hi))[None, :]  # sinks + recent window
        full_out = torch.einsum("rkgt,rtkd->rkgd", torch.softmax(logits, -1), vals)

        m = hi - lo
        mid = logits[..., lo * s:hi * s]
        mass = torch.softmax(mid, -1).nan_to_num(0.0).view(r, kvh, g, m, s).sum(-1)  # [R,KVH,G,M] per-head

        # the shipped scores, as [R, KVH, G, M]
        qg = q.float().view(r, 1, kvh, g, d)
        sl = rows.sparse_slots.long()
        kmin, kmax = (x[layer][sl, lo:hi].float()[:, :, :, None, :] for x in (self.kmin, self.kmax))
        bound = (torch.maximum(qg * kmin, qg * kmax).sum(-1) * self.scale).permute(0, 2, 3, 1)
        kmean = self.kmean[layer][sl, lo:hi].float()[:, :, :, None, :]
        centroid = ((qg * kmean).sum(-1) * self.scale).permute(0, 2, 3, 1)
        soft = torch.softmax(bound, -1).nan_to_num(0.0)
        kmid = keys[:, lo * s:hi * s].view(r, m, s, kvh, d)
        okm = tok_ok[:, lo * s:hi * s].view(r, m, s)

        def quantized_mass(bits):  # token-level scores from keys quantized per token and head (asymmetric)
            mn, mx = kmid.amin(-1, keepdim=True), kmid.amax(-1, keepdim=True)
            step = (mx - mn).clamp(min=1e-6) / (2 ** bits - 1)
            kq = ((kmid - mn) / step).round() * step + mn  # [R, M, S, KVH, D]
            lg = torch.einsum("rmskd,rkgd->rkgms", kq, q.float().view(r, kvh, g, d)) * self.scale
            lg = lg.masked_fill(~okm[:, None, None], float("-inf")).reshape(r, kvh, g, m * s)
            return torch.softmax(lg, -1).nan_to_num(0.0).view(r, kvh, g, m, s).sum(-1)

        def shipped_lowbit(algo, pool, page="mass"):  # [R, M]: the page scores the algorithm ranks by
            sc = lowbit_page_scores(q, algo.codes[layer], algo.scales[layer], rows.sparse_slots, rows.lo, rows.hi,
                                    scale=self.scale, page_size=s, bits=algo.bits, group_size=algo.group_size,
                                    pool=pool, page=page)
            return sc[:, lo:hi]

        k = min(rows.num_select, m)
        if k > 0:
            top_p, top_i = mass.max(-1)  # [R, KVH, G] each head's heaviest page
            sharp = top_p > 0.3  # a head that points at one page (retrieval-like)
            per_request = lambda x: x[:, None].expand(r, kvh, m)  # noqa: E731  one list shared by the KV heads
            scores = {
                "oracle": per_request(mass.sum((1, 2))),
                "oracle/kvhead": mass.sum(2),
                "quest": per_request(soft.sum((1, 2))),
                "quest/kvhead": soft.sum(2),
                "quest/kvhead-max": bound.amax(2),
                "centroid": per_request(torch.softmax(centroid, -1).nan_to_num(0.0).sum((1, 2))),
                "quest-mean": per_request((soft + torch.softmax(centroid, -1).nan_to_num(0.0)).sum((1, 2))),
                "int4": per_request(quantized_mass(4).sum((1, 2))),
                "int2": per_request(quantized_mass(2).sum((1, 2))),
                "lowbit": per_request(shipped_lowbit(self.lowbit4, "mean")),
                "lowbit-max": per_request(shipped_lowbit(self.lowbit4, "max")),
                "lowbit-best": per_request(shipped_lowbit(self.lowbit4, "mean", "max")),
                "lowbit-2bit": per_request(shipped_lowbit(self.lowbit2, "mean")),
            }
            for name, sc in scores.items():
                pick = sc.topk(k, -1).indices  # [R, KVH, k]
                got = mass.gather(3, pick[:, :, None, :].expand(r, kvh, g, k)).sum(-1).reshape(r, -1)  # [R, H]
                chosen = torch.zeros(r, kvh, m, dtype=torch.bool, device=q.device).scatter_(2, pick, True)
                sel_tok = torch.cat([torch.zeros(r, kvh, lo * s, dtype=torch.bool, device=q.device),
                                     chosen.repeat_interleave(s, 2),
                                     torch.zeros(r, kvh, (n - hi) * s, dtype=torch.bool, device=q.device)],
                                    2) | always[:, None, :]  # [R, KVH, T]
                out = torch.einsum("rkgt,rtkd->rkgd", torch.softmax(
                    logits.masked_fill(~sel_tok[:, :, None, :], float("-inf")), -1), vals)
                err = ((out - full_out).norm(dim=-1) / full_out.norm(dim=-1).clamp(min=1e-6)).reshape(r, -1)
                acc = _SUMS[(name, layer)]
                acc[0] += got.mean(1).sum().item()
                acc[1] += got.amin(1).sum().item()
                acc[2] += err.mean(1).sum().item()
                acc[3] += err.amax(1).sum().item()
                acc[4] += r
                hit = (pick[:, :, None, :] == top_i[..., None]).any(-1)
                acc[5] += (hit & sharp).sum().item()
                acc[6] += sharp.sum().item()
        scores = torch.full((r, self.max_pages), float("-inf"), device=q.device)
        scores[:, lo:hi] = mass.sum((1, 2))
        return self.topk_of(scores, rows.num_select)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path or alias (default: the embedded SmolLM2)")
    p.add_argument("--lengths", default="2048")
    p.add_argument("--tasks", default="niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,vt")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--budget", default="1/8", help="token count or fraction of the length (default 1/8)")
    p.add_argument("--page-sizes", default="16")
    p.add_argument("--max-tokens", type=int, default=16, help="decode steps per prompt (default 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "bench/results/selection_recall.json"))
    args = p.parse_args()

    from hisa.config import EngineConfig
    from hisa.engine.sampling_params import SamplingParams
    from hisa.eval.runner import EvalGrid, _round_items, parse_budget
    from hisa.llm import LLM
    from hisa.models.factory import load_model
    from hisa.sparse.config import SparseConfig

    cfg = EngineConfig(model=args.model, device=args.device)
    loaded = load_model(cfg.model, device=cfg.torch_device, dtype=cfg.torch_dtype, progress=True, seed=cfg.seed)
    lengths = [int(x) for x in args.lengths.split(",")]
    grid = EvalGrid(algorithms=["dense"], budgets=[], lengths=lengths, tasks=args.tasks.split(","),
                    samples=args.samples, max_tokens=args.max_tokens)
    items = _round_items(grid, loaded.tokenizer, range(args.samples), loaded.config.max_position_embeddings)
    budget = parse_budget(args.budget)
    result = dict(header(cfg.torch_device), budget=args.budget, tasks=grid.tasks, samples=args.samples,
                  decode_steps_per_prompt=args.max_tokens, model=cfg.model or "SmolLM2-135M-Instruct (embedded)",
                  runs=[])
    for page_size in [int(x) for x in args.page_sizes.split(",")]:
        for length in lengths:
            _SUMS.clear()
            sparse = SparseConfig(algorithm="recall-probe", token_budget=budget.resolve(length), min_prompt_len=1,
                                  max_sparse_requests=1, residency="device")
            llm = LLM(loaded=loaded, device=args.device, page_size=page_size, sparse=sparse, progress=False,
                      max_model_len=max(lengths) + 256)
            RecallProbe.coordinator = llm.engine.sparse
            for it in items[length]:
                llm.generate([it.ids], SamplingParams(max_tokens=args.max_tokens, temperature=0.0), use_tqdm=False)
            layers = loaded.config.num_layers
            run = dict(page_size=page_size, length=length, budget_tokens=budget.resolve(length), candidates={})
            names = ("recall", "recall_worst_head", "out_err", "out_err_worst_head")
            for c in CANDIDATES:
                tot = sum(_SUMS[(c, i)] for i in range(layers))
                print(f"{c:>18}: sharp heads' top page picked {tot[5] / max(tot[6], 1):.3f} of {int(tot[6])}")
            for c in CANDIDATES:
                rows = [_SUMS[(c, i)] for i in range(layers) if _SUMS[(c, i)][4]]
                tot = sum(rows)
                run["candidates"][c] = {
                    **{n: (tot[j] / tot[4]).item() for j, n in enumerate(names)},
                    "sharp_top_page_hit_rate": (tot[5] / max(tot[6], 1)).item(), "sharp_head_steps": int(tot[6]),
                    **{n + "_per_layer": [(_SUMS[(c, i)][j] / _SUMS[(c, i)][4]).item() if _SUMS[(c, i)][4] else None
                                          for i in range(layers)] for j, n in enumerate(names)}}
            print(f"\npage {page_size}, length {length}, budget {budget.resolve(length)} tokens. recall: share of "
                  f"middle attention mass in the picked pages; err: relative L2 error of the attention output "
                  f"(mean over heads / worst head)")
            print(f"{'layer':>5} " + " ".join(f"{c:>26}" for c in CANDIDATES))

            def cell(c, i=None):
                x = run["candidates"][c]
                get = (lambda n: x[n]) if i is None else (lambda n: x[n + "_per_layer"][i])
                return f"{get('recall'):.2f} {get('recall_worst_head'):.2f} {get('out_err'):.3f} {get('out_err_worst_head'):.2f}"

            for i in range(layers):
                print(f"{i:>5} " + " ".join(f"{cell(c, i):>26}" for c in CANDIDATES))
            print(f"{'all':>5} " + " ".join(f"{cell(c):>26}" for c in CANDIDATES))
            result["runs"].append(run)
            del llm
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
