"""The CPU experiment behind docs/eval.md's "also tried" line: quest variants as throwaway algorithms.

Registers experimental selectors (not part of hisa) and runs `hisa.eval` on them at budget 1/8:
  quest-mix     softmax(Quest bound) + softmax(q·page mean), the mean computed from the host keys
                (what became `quest-mean`, which keeps the mean on the device instead)
  quest-geo     softmax of the average of the two logits
  centroid-exp  softmax(q·page mean) alone
  quest-sticky / mix-sticky   a page keeps max(score, 0.8 x its last score) (per layer, per host page)
The JSON files name the script by its working name then (`variants.py`, outputs under /tmp/exp);
the code is this file's. The centroid variants read every host key per step: accuracy experiments, not a serving path.

Usage (the runs recorded in bench/results/quest_variants_cpu_*.json)::

    python bench/quest_variants_cpu.py dense,quest,quest-mix,quest-geo,centroid-exp 2048 \
        niah_single_2,niah_single_3,niah_multiquery 3 bench/results/quest_variants_cpu_page16
    python bench/quest_variants_cpu.py dense,quest,quest-mix 2048 niah_single_2,niah_single_3,niah_multiquery 3 \
        bench/results/quest_variants_cpu_page8 8
    python bench/quest_variants_cpu.py dense,quest-sticky,mix-sticky 2048 \
        niah_single_2,niah_single_3,niah_multiquery 3 bench/results/quest_variants_cpu_sticky
"""

import sys

import torch

from hisa.sparse.base import register
from hisa.sparse.quest import QuestAlgorithm


def _centroid(self, layer, q, ctx):
    r, s, kvh, d = q.shape[0], self.page_size, self.num_kv_heads, self.head_dim
    g = self.num_heads // kvh
    m = max(0, ctx.host_table.shape[1] - ctx.middle_start)
    hp, valid = self.middle_host_pages(ctx, m)
    keys = ctx.host_keys[hp.reshape(-1)].to(q.device).float().view(r, m, s, kvh, d)
    tok = torch.arange(m * s, device=q.device).view(m, s) + ctx.middle_start * s
    ok = (tok[None] < ctx.num_valid_tokens[:, None, None] - 1) & valid[..., None]
    mean_k = (keys * ok[..., None, None]).sum(2) / ok.sum(2).clamp(min=1)[..., None, None]
    c = torch.einsum("rmkd,rkgd->rkgm", mean_k, q.float().view(r, kvh, g, d)) * self.scale
    return c.masked_fill(~valid[:, None, None, :], float("-inf")), hp, valid

def _bound(self, layer, q, hp, valid):
    r, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
    g = self.num_heads // kvh
    kmin, kmax = self.kmin[layer][hp].float(), self.kmax[layer][hp].float()
    qg = q.float().view(r, 1, kvh, g, d)
    b = torch.maximum(qg * kmin[:, :, :, None], qg * kmax[:, :, :, None]).sum(-1) * self.scale
    return b.permute(0, 2, 3, 1).masked_fill(~valid[:, None, None, :], float("-inf"))

@register("quest-mix")
class QuestMix(QuestAlgorithm):
    def retrieve_topk(self, layer, q, ctx):
        c, hp, valid = _centroid(self, layer, q, ctx)
        b = _bound(self, layer, q, hp, valid)
        sc = (torch.softmax(b, -1).nan_to_num(0) + torch.softmax(c, -1).nan_to_num(0)).sum((1, 2))
        return self.topk_from_scores(sc.masked_fill(~valid, float("-inf")), ctx)

@register("quest-geo")
class QuestGeo(QuestAlgorithm):
    def retrieve_topk(self, layer, q, ctx):
        c, hp, valid = _centroid(self, layer, q, ctx)
        b = _bound(self, layer, q, hp, valid)
        sc = torch.softmax((b + c) / 2, -1).nan_to_num(0).sum((1, 2))
        return self.topk_from_scores(sc.masked_fill(~valid, float("-inf")), ctx)

@register("centroid-exp")
class Centroid(QuestAlgorithm):
    def retrieve_topk(self, layer, q, ctx):
        c, hp, valid = _centroid(self, layer, q, ctx)
        sc = torch.softmax(c, -1).nan_to_num(0).sum((1, 2))
        return self.topk_from_scores(sc.masked_fill(~valid, float("-inf")), ctx)

GAMMA = 0.8

class _Sticky:
    """score_t(page) = max(score_t, GAMMA * score_{t-1}) per layer, keyed by host page."""
    def sticky(self, layer, sc, hp, valid):
        if not hasattr(self, "prev"):
            self.prev = torch.zeros(self.num_layers, self.num_host_pages, device=sc.device)
        prev = self.prev[layer][hp] * valid
        out = torch.maximum(sc, GAMMA * prev)
        self.prev[layer][hp[valid]] = out[valid]
        return out

    def construct_representations(self, layer, host_pages, keys):
        super().construct_representations(layer, host_pages, keys)
        if hasattr(self, "prev"):
            self.prev[layer, host_pages] = 0

@register("quest-sticky")
class QuestSticky(_Sticky, QuestAlgorithm):
    def retrieve_topk(self, layer, q, ctx):
        m = max(0, ctx.host_table.shape[1] - ctx.middle_start)
        hp, valid = self.middle_host_pages(ctx, m)
        b = _bound(self, layer, q, hp, valid)
        sc = torch.softmax(b, -1).nan_to_num(0).sum((1, 2))
        sc = self.sticky(layer, sc, hp, valid)
        return self.topk_from_scores(sc.masked_fill(~valid, float("-inf")), ctx)

@register("mix-sticky")
class MixSticky(_Sticky, QuestAlgorithm):
    def retrieve_topk(self, layer, q, ctx):
        c, hp, valid = _centroid(self, layer, q, ctx)
        b = _bound(self, layer, q, hp, valid)
        sc = (torch.softmax(b, -1).nan_to_num(0) + torch.softmax(c, -1).nan_to_num(0)).sum((1, 2))
        sc = self.sticky(layer, sc, hp, valid)
        return self.topk_from_scores(sc.masked_fill(~valid, float("-inf")), ctx)

if __name__ == "__main__":
    import json
    from hisa.eval.runner import EvalGrid, parse_budgets, run_eval
    algs = sys.argv[1].split(","); lengths=[int(x) for x in sys.argv[2].split(",")]
    tasks = sys.argv[3].split(","); samples = int(sys.argv[4]); out = sys.argv[5]
    page = int(sys.argv[6]) if len(sys.argv) > 6 else 16
    grid = EvalGrid(algorithms=algs, budgets=parse_budgets("1/8"), lengths=lengths, tasks=tasks, samples=samples)
    rep = run_eval(grid, engine_kwargs=dict(device="cpu", page_size=page), out=out, progress=False)
    for row in rep["rows"]:
        print({k: row[k] for k in row if k in ("row", "avg", "n", "delta", "by_length")})
