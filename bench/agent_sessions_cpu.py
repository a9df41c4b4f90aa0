"""Multi-turn sessions that return after others ran: time to first token without reuse, with the pool's
prefix cache, and with the pool's prefix cache over an L3 directory, on the CPU.

The embedded SmolLM2-135M (fp32, dense, page 16). `--sessions` sessions each open with their own
document of `--doc-tokens` tokens and a question; every turn appends the previous answer and a new
question (`--question-tokens`), and generates `--answer-tokens` tokens (greedy). Turns go round-robin:
turn 1 of every session, then turn 2 of every session, ... so each session returns after all others
ran. The KV pool holds about `--pool-sessions` sessions' contexts, so the pool alone forgets the
oldest ones while the others run; L3 (a directory) keeps every prompt and answer. Modes, side by side
in one process over the same requests (each request runs in every mode before the next one, in
rotating order):

  none        --no-prefix-cache, no L3: every turn prefills its whole conversation;
  pool        the pool's prefix cache (pages shared or kept after requests, evicted LRU);
  pool+l3     the same with --l3 file:DIR (prompts stored after prefill, answers when a request ends);
  pool+keep   the pool's prefix cache, the sessions' requests sent with keep_alive (their pages are
              evicted only after every other cached page: `--keep-alive`, SamplingParams.keep_alive).

`--noise N` sends N one-shot requests (fresh documents of --doc-tokens, no keep_alive) after every
turn, in every mode: traffic that is not a session and competes for the same pool. Their time to
first token is reported apart (`noise_ttft_sum_s`).

With `--sparse-host` the sessions are host-backed sparse requests (quest, `--token-budget`): their KV
lives in the host pool, which is then the pool of `--pool-sessions` sessions (the device pool holds
their LRU buffers), and `pool` is the host pool's prefix cache (L2).

Per mode: the sum and median of time to first token over all turns, the time its requests took,
tokens reused (pool and L3 counters), and whether every answer equals mode `none`'s; and the
capacity side: the KV of all sessions' conversations at the end and what L3 holds, against the
pool that serves them.
Writes JSON (command, date, commit, machine) and a bar plot beside it.

    python bench/agent_sessions_cpu.py --out bench/results/agent_sessions_cpu.json
    python bench/agent_sessions_cpu.py --sessions 2 --turns 2 --doc-tokens 200 --out /tmp/agents.json  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, header, write_json  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.conftest import long_text  # noqa: E402

from hisa import LLM, SamplingParams  # noqa: E402
from hisa.kvcache.paged_cache import PagedKVCache  # noqa: E402
from hisa.models.factory import load_model  # noqa: E402

PAGE = 16


def conversations(tok, a) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Per session: its opening (document + first question) and the questions of later turns."""
    docs = [tok.encode(long_text(a.doc_tokens, seed=100 + s))[: a.doc_tokens] for s in range(a.sessions)]
    questions = [[tok.encode(long_text(a.question_tokens, seed=1000 + 37 * s + t))[: a.question_tokens]
                  for t in range(a.turns)] for s in range(a.sessions)]
    return [d + q[0] for d, q in zip(docs, questions)], [q[1:] for q in questions]


class Mode:
    """One engine of a mode and its sessions' histories; `turn(s, t)` serves session s's turn t."""

    def __init__(self, loaded, mode: str, a, openings, later, l3_dir: Path):
        mc = loaded.config
        page_bytes = PagedKVCache.page_bytes(num_layers=mc.num_layers, page_size=PAGE, num_kv_heads=mc.num_kv_heads,
                                             head_dim=mc.head_dim, dtype=torch.float32)
        longest = a.doc_tokens + a.turns * (a.question_tokens + a.answer_tokens) + PAGE
        self.num_pages = int(a.pool_sessions * -(-longest // PAGE))
        self.pool_gib = round(self.num_pages * page_bytes / 2**30, 3)
        self.mode, self.later = mode, later
        pools = dict(num_kv_pages=self.num_pages)
        if a.sparse_host:   # the host pool is the pool the sessions compete for; the device holds buffers
            from hisa.sparse.config import SparseConfig

            pools = dict(sparse=SparseConfig(algorithm="quest", token_budget=a.token_budget, min_prompt_len=256,
                                              residency="host", host_pool_gb=self.num_pages * page_bytes / 2**30),
                         num_kv_pages=-(-longest // PAGE) + 2 * -(-a.token_budget // PAGE) + 4)   # + a buffer
        self.llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=PAGE, max_num_seqs=1,
                       max_model_len=longest + PAGE, max_num_batched_tokens=a.chunk, prefix_cache=mode != "none",
                       l3=f"file:{l3_dir}" if mode == "pool+l3" else None, **pools)
        self.params = SamplingParams(max_tokens=a.answer_tokens, ignore_eos=True, keep_alive=mode == "pool+keep")
        self.noise_params = SamplingParams(max_tokens=a.answer_tokens, ignore_eos=True)
        self.history = [list(o) for o in openings]
        self.answers, self.ttfts, self.busy_s, self.noise_ttfts = [], [], 0.0, []

    def noise(self, prompt: list[int]) -> None:
        out = self.llm.generate([prompt], self.noise_params, use_tqdm=False)[0]
        self.noise_ttfts.append(out.first_token_time - out.arrival_time)

    def turn(self, s: int, t: int) -> None:
        if t:
            self.history[s] += self.later[s][t - 1]
        t0 = time.perf_counter()
        out = self.llm.generate([self.history[s]], self.params, use_tqdm=False)[0]
        self.busy_s += time.perf_counter() - t0
        self.ttfts.append(out.first_token_time - out.arrival_time)
        self.answers.append(out.token_ids)
        self.history[s] += out.token_ids

    def row(self) -> dict:
        engine = self.llm.engine
        cache = engine.host_prefix_cache if engine.host_prefix_cache is not None else engine.prefix_cache
        pool = cache.metrics() if cache is not None else {}
        l3 = engine.l3_prefix.metrics() if engine.l3_prefix is not None else {}
        return dict(mode=self.mode, ttft_sum_s=round(sum(self.ttfts), 3),
                    ttft_median_s=round(statistics.median(self.ttfts), 3), ttft_s=[round(t, 3) for t in self.ttfts],
                    busy_s=round(self.busy_s, 2), tokens_reused=pool.get("tokens_hit", 0) + l3.get("tokens_loaded", 0),
                    noise_requests=len(self.noise_ttfts), noise_ttft_sum_s=round(sum(self.noise_ttfts), 3),
                    pool=pool, l3=l3, answers=self.answers, pool_pages=self.num_pages, pool_gib=self.pool_gib)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=1500)
    p.add_argument("--question-tokens", type=int, default=24)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--pool-sessions", type=float, default=2.5, help="pool size in sessions' longest contexts")
    p.add_argument("--chunk", type=int, default=2048, help="--max-num-batched-tokens")
    p.add_argument("--modes", default="none,pool,pool+l3", help="of none, pool, pool+l3, pool+keep")
    p.add_argument("--noise", type=int, default=0, help="one-shot requests after every turn (default 0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sparse-host", action="store_true",
                   help="host-backed sparse sessions (quest): the host pool is the pool, `pool` its prefix cache (L2)")
    p.add_argument("--token-budget", type=int, default=256, help="with --sparse-host (default 256)")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/agent_sessions_cpu.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    loaded = load_model(None, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    openings, later = conversations(loaded.tokenizer, a)
    warm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, prefix_cache=False)
    warm.generate([openings[0][:128]], SamplingParams(max_tokens=2), use_tqdm=False)  # first-call overheads
    warm.close()
    names = a.modes.split(",")
    if unknown := set(names) - {"none", "pool", "pool+l3", "pool+keep"}:
        p.error(f"unknown mode(s) {sorted(unknown)}: choose from none, pool, pool+l3, pool+keep")
    with tempfile.TemporaryDirectory(prefix="hisa-agents-") as tmp:
        modes = [Mode(loaded, m, a, openings, later, Path(tmp) / "l3") for m in names]
        i = 0
        for t in range(a.turns):
            for s in range(a.sessions):
                order = modes[i % len(modes):] + modes[: i % len(modes)]  # rotate: no mode always runs first
                for m in order:
                    m.turn(s, t)
                for k in range(a.noise):
                    doc = loaded.tokenizer.encode(long_text(a.doc_tokens, seed=5000 + 97 * i + k))[: a.doc_tokens]
                    for m in order:
                        m.noise(doc)
                print(f"turn {t + 1} session {s + 1} ({len(modes[0].history[s])} tokens): "
                      + "  ".join(f"{m.mode} {m.ttfts[-1]:.2f} s" for m in modes), flush=True)
                i += 1
        for m in modes:
            if m.llm.engine.l3_prefix is not None:
                m.llm.engine.l3_prefix.drain()   # queued L3 writes land before the directory is measured
        rows = [m.row() for m in modes]
        for m in modes:
            m.llm.close()
        kv_token = PagedKVCache.page_bytes(num_layers=loaded.config.num_layers, page_size=1,
                                           num_kv_heads=loaded.config.num_kv_heads, head_dim=loaded.config.head_dim,
                                           dtype=torch.float32)
        sessions_gib = sum(len(h) for h in modes[0].history) * kv_token / 2**30
        l3_gib = sum(f.stat().st_size for f in (Path(tmp) / "l3").rglob("*") if f.is_file()) / 2**30
        for r in rows:   # capacity: the KV of every session's conversation against the pool that serves them
            r["sessions_kv_gib"] = round(sessions_gib, 3)
            r["sessions_kv_vs_pool"] = round(sessions_gib / r["pool_gib"], 2)
            if r["mode"] == "pool+l3":
                r["l3_gib"] = round(l3_gib, 3)
                r["l3_vs_pool"] = round(l3_gib / r["pool_gib"], 2)
    base = rows[0]
    print(f"\n{a.sessions} sessions x {a.turns} turns, documents of {a.doc_tokens} tokens, pool of "
          f"{rows[0]['pool_pages']} pages ({rows[0]['pool_gib']} GiB, ~{a.pool_sessions} sessions), "
          f"{torch.get_num_threads()} threads; the sessions' KV at the end {base['sessions_kv_gib']} GiB "
          f"({base['sessions_kv_vs_pool']}x the pool)"
          + "".join(f", L3 holds {r['l3_gib']} GiB ({r['l3_vs_pool']}x the pool)" for r in rows if "l3_gib" in r))
    print(f"{'mode':10s}{'TTFT sum s':>12s}{'median s':>10s}{'vs ' + base['mode']:>10s}{'busy s':>9s}"
          f"{'reused tok':>12s}  same answers")
    for r in rows:
        r["ttft_speedup_vs_first"] = round(base["ttft_sum_s"] / r["ttft_sum_s"], 2)
        r["same_answers_as_first"] = r["answers"] == base["answers"]
        print(f"{r['mode']:10s}{r['ttft_sum_s']:12.2f}{r['ttft_median_s']:10.2f}{r['ttft_speedup_vs_first']:9.2f}x"
              f"{r['busy_s']:9.1f}{r['tokens_reused']:12d}  {r['same_answers_as_first']}")
    payload = dict(**header(torch.device("cpu"), a.git_commit),
                   config=dict(sessions=a.sessions, turns=a.turns, doc_tokens=a.doc_tokens,
                               question_tokens=a.question_tokens, answer_tokens=a.answer_tokens,
                               pool_sessions=a.pool_sessions, chunk=a.chunk, page_size=PAGE, noise=a.noise,
                               threads=torch.get_num_threads(), model="SmolLM2-135M-Instruct (embedded GGUF), fp32",
                               kv=f"host-backed sparse quest, budget {a.token_budget} (the pool: the host pool)"
                               if a.sparse_host else "dense (the pool: the device pool)"),
                   rows=[{k: v for k, v in r.items() if k != "answers"} for r in rows])
    write_json(a.out, payload)
    _plot(rows, a.out.with_suffix(".png"))
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["mode"] for r in rows], [r["ttft_sum_s"] for r in rows], color=["#888", "#37a", "#3a7"][: len(rows)])
    ax.set_ylabel("sum of time to first token (s)")
    ax.set_title("multi-turn sessions returning after others ran (CPU, SmolLM2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
