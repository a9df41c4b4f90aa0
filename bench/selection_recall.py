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
  int4 / int2     token-level scores from keys quantized to 4 / 2 bits per channel (a finer index that
                  would cost 1/8 / 1/16 of the KV on the device at head_dim 64; not an algorithm yet)

Besides recall and the attention-output error, it counts how often the heaviest page of each
"sharp" head (one page holding > 30% of its middle mass: retrieval-like heads) is among the picks.

The trajectory is driven by the oracle's pick (near dense), so every selector is scored on the same
queries. Prompts are the eval suite's (same generators and seeds as ``hisa eval``).

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

from hisa.sparse.base import SelectionContext, register  # noqa: E402
from hisa.sparse.quest import QuestMeanAlgorithm  # noqa: E402

CANDIDATES = ["oracle", "oracle/kvhead", "quest", "quest/kvhead", "quest/kvhead-max", "centroid", "quest-mean", "int4", "int2"]
_SUMS: dict = defaultdict(lambda: torch.zeros(7, dtype=torch.float64))  # (cand, layer) → sums, see retrieve_topk


@register("recall-probe")
class RecallProbe(QuestMeanAlgorithm):
    """quest-mean's representations + the exact attention; records every candidate's recall, returns oracle's pick."""

    host = None  # the host pool (set by main): the probe reads values too, to measure output error

    def retrieve_topk(self, layer, q, ctx: SelectionContext):
        r, s, kvh, d = q.shape[0], self.page_size, self.num_kv_heads, self.head_dim
        g = self.num_heads // kvh
        p_all = ctx.host_table.shape[1]
        table = ctx.host_table.clamp(min=0).reshape(-1).to(self.host.data.device)
        pages = self.host.layer_pages(layer)[table].to(q.device).float()  # [R*P, 2, S, KVH, D]
        keys = pages[:, 0].reshape(r, p_all * s, kvh, d)
        vals = pages[:, 1].reshape(r, p_all * s, kvh, d)
        tok = torch.arange(p_all * s, device=q.device)
        # every token but the current one (not in the host pool yet), on pages that exist
        tok_ok = (tok[None, :] < ctx.num_valid_tokens[:, None] - 1) & (ctx.host_table >= 0).repeat_interleave(s, 1)
        logits = torch.einsum("rkgd,rtkd->rkgt", q.float().view(r, kvh, g, d), keys) * self.scale
        logits = logits.masked_fill(~tok_ok[:, None, None, :], float("-inf"))
        page_of = tok // s
        always = (page_of[None, :] < ctx.middle_start) | (page_of[None, :] >= ctx.middle_end[:, None])  # sinks+recent
        full_out = torch.einsum("rkgt,rtkd->rkgd", torch.softmax(logits, -1), vals)

        m = max(0, p_all - ctx.middle_start)
        hp, valid = self.middle_host_pages(ctx, m)
        mid = logits[..., ctx.middle_start * s:].masked_fill(~valid.repeat_interleave(s, 1)[:, None, None, :],
                                                             float("-inf"))
        mass = torch.softmax(mid, -1).nan_to_num(0.0).view(r, kvh, g, m, s).sum(-1)  # [R,KVH,G,M] per-head

        # the shipped scores (hisa.sparse.quest), as [R, KVH, G, M]
        invalid = ~valid[:, None, None, :]
        bound = self.page_logits(layer, q, hp).permute(0, 2, 3, 1).masked_fill(invalid, float("-inf"))
        centroid = self.mean_logits(layer, q, hp).permute(0, 2, 3, 1).masked_fill(invalid, float("-inf"))
        soft = torch.softmax(bound, -1).nan_to_num(0.0)
        kmid = keys[:, ctx.middle_start * s:].view(r, m, s, kvh, d)
        okm = tok_ok[:, ctx.middle_start * s:].view(r, m, s)

        def quantized_mass(bits):  # token-level scores from keys quantized per token and head (asymmetric)
            lo, hi = kmid.amin(-1, keepdim=True), kmid.amax(-1, keepdim=True)
            step = (hi - lo).clamp(min=1e-6) / (2 ** bits - 1)
            kq = ((kmid - lo) / step).round() * step + lo  # [R, M, S, KVH, D]
            lg = torch.einsum("rmskd,rkgd->rkgms", kq, q.float().view(r, kvh, g, d)) * self.scale
            lg = lg.masked_fill(~okm[:, None, None], float("-inf")).reshape(r, kvh, g, m * s)
            return torch.softmax(lg, -1).nan_to_num(0.0).view(r, kvh, g, m, s).sum(-1)

        k = min(ctx.num_select, int(valid.sum(1).min()))
        if k > 0:
            neg = ~valid[:, None, :]
            top_p, top_i = mass.max(-1)  # [R, KVH, G] each head's heaviest page
            sharp = top_p > 0.3  # a head that points at one page (retrieval-like)
            scores = {
                "oracle": mass.sum((1, 2))[:, None].expand(r, kvh, m),
                "oracle/kvhead": mass.sum(2),
                "quest": soft.sum((1, 2))[:, None].expand(r, kvh, m),
                "quest/kvhead": soft.sum(2),
                "quest/kvhead-max": bound.amax(2),
                "centroid": torch.softmax(centroid, -1).nan_to_num(0.0).sum((1, 2))[:, None].expand(r, kvh, m),
                "quest-mean": (soft + torch.softmax(centroid, -1).nan_to_num(0.0)).sum((1, 2))[:, None].expand(r, kvh, m),
                "int4": quantized_mass(4).sum((1, 2))[:, None].expand(r, kvh, m),
                "int2": quantized_mass(2).sum((1, 2))[:, None].expand(r, kvh, m),
            }
            for name, sc in scores.items():
                pick = sc.masked_fill(neg, float("-inf")).topk(k, -1).indices  # [R, KVH, k]
                got = mass.gather(3, pick[:, :, None, :].expand(r, kvh, g, k)).sum(-1).reshape(r, -1)  # [R, H]
                chosen = torch.zeros(r, kvh, m, dtype=torch.bool, device=q.device).scatter_(2, pick, True)
                sel_tok = torch.cat([torch.zeros(r, kvh, ctx.middle_start * s, dtype=torch.bool, device=q.device),
                                     chosen.repeat_interleave(s, 2)], 2) | always[:, None, :]  # [R, KVH, T]
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
        pages_score = mass.sum((1, 2)).masked_fill(~valid, float("-inf"))
        return self.topk_from_scores(pages_score, ctx)


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
                                  max_sparse_requests=1)
            llm = LLM(loaded=loaded, device=args.device, page_size=page_size, sparse=sparse, progress=False)
            RecallProbe.host = llm.engine.sparse.manager.host
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
