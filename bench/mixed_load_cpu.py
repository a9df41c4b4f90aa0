"""Latency under mixed load on the CPU: short requests while a ~6K-token prompt is prefilled.

For each per-step token budget (--budgets, `hisa serve --max-num-batched-tokens`), a real `hisa serve`
(embedded SmolLM2, dense, context 8192) is measured three ways:
  alone     a short request's time to first token on an idle server (its own prefill) and the
            inter-token time of a decoding stream alone (a decode step);
  mixed     a decoding stream runs; a long prompt is sent; once it is being prefilled, --shorts short
            requests are sent one after another: their time to first token, the decoding stream's
            inter-token times while the long prompt is prefilled (each is one step: its decode plus a
            chunk of the long prompt), and the long prompt's time to first token.
The claim checked: a short request's time to first token <= 2 steps under load + its own prefill
(`bound`, `ratio` = worst short TTFT / bound <= 1). Writes JSON with command, date, commit, machine.

    python bench/mixed_load_cpu.py --budgets 256 2048 --out bench/results/mixed_load_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import REPO, header, write_json

sys.path.insert(0, str(REPO))

from tests.conftest import long_text  # noqa: E402
from tests.server.serve_process import MODEL, serve, wait_for  # noqa: E402

SHORT = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}


def stream_times(http, body: dict, times: list[float], usage: dict | None = None) -> None:
    """Stream `body`; append the arrival time of every content chunk to `times`."""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                if '"usage":{' in line and usage is not None:
                    usage.update(json.loads(line[6:])["usage"])
                elif '"text"' in line:
                    times.append(time.monotonic())


def ttft(http, body: dict) -> float:
    times: list[float] = []
    t0 = time.monotonic()
    stream_times(http, body, times)
    return times[0] - t0


def measure(budget: int, args, log_dir: Path) -> dict:
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    server_args = ["--max-model-len", "8192", "--max-num-batched-tokens", str(budget), "--max-num-seqs", "16"]
    with serve(server_args, log_dir=log_dir, env=env) as srv, srv.http(timeout=3600) as http:
        ttft(http, SHORT)  # warm-up
        own_prefill = [ttft(http, SHORT) for _ in range(3)]
        alone: list[float] = []
        stream_times(http, {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 12, "temperature": 0,
                            "ignore_eos": True}, alone)
        decode_alone = [b - a for a, b in zip(alone, alone[1:])]

        decode_times: list[float] = []
        long_times: list[float] = []
        long_usage: dict = {}
        steps_needed = args.long_words * 11 // 10 // budget + 2 * args.shorts + 30
        decoding = threading.Thread(target=stream_times, args=(srv.http(timeout=3600), {
            "model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": min(steps_needed, 1500), "temperature": 0,
            "ignore_eos": True}, decode_times))
        decoding.start()
        assert wait_for(lambda: len(decode_times) >= 2, timeout=600)
        long_sent = time.monotonic()
        long = threading.Thread(target=stream_times, args=(srv.http(timeout=3600), {
            "model": MODEL, "prompt": long_text(args.long_words, seed=6), "max_tokens": 1, "temperature": 0},
            long_times, long_usage))
        long.start()
        assert wait_for(lambda: srv.metrics()["hisa_requests_running"] == 2, timeout=600, interval=0.02)
        shorts = []
        for _ in range(args.shorts):
            if long_times:
                break  # the long prompt's prefill is over: later shorts would not measure mixed load
            shorts.append(ttft(http, SHORT))
            time.sleep(args.gap)
        long.join()
        decoding.join()
        long_first = long_times[0]
        during = [t for t in decode_times if long_sent <= t <= long_first]
        steps = [b - a for a, b in zip(during, during[1:])]
    step_max = max(steps)
    bound = 2 * step_max + statistics.median(own_prefill)
    return dict(
        max_num_batched_tokens=budget,
        short_own_prefill_s=[round(x, 3) for x in own_prefill],
        decode_step_alone_s=dict(median=round(statistics.median(decode_alone), 3), max=round(max(decode_alone), 3)),
        long_prompt_tokens=long_usage.get("prompt_tokens"),
        long_ttft_s=round(long_first - long_sent, 2),
        long_prefill_tok_s=round((long_usage.get("prompt_tokens") or 0) / (long_first - long_sent), 1),
        steps_during_long_prefill=len(steps),
        step_under_load_s=dict(median=round(statistics.median(steps), 3), max=round(step_max, 3)),
        short_ttft_under_load_s=[round(x, 3) for x in shorts],
        bound_s=round(bound, 3),
        ratio=round(max(shorts) / bound, 3),
        holds=max(shorts) <= bound,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 2048], help="--max-num-batched-tokens values")
    ap.add_argument("--long-words", type=int, default=5540, help="words of the long prompt (~1.08 tokens each)")
    ap.add_argument("--shorts", type=int, default=4, help="short requests sent during the long prefill")
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between short requests")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--out", default=str(REPO / "bench/results/mixed_load_cpu.json"))
    ap.add_argument("--git-commit", default=None)
    args = ap.parse_args()
    runs = []
    for budget in args.budgets:
        with tempfile.TemporaryDirectory() as tmp:
            run = measure(budget, args, Path(tmp))
        runs.append(run)
        print(f"budget {budget}: long {run['long_prompt_tokens']} tokens in {run['long_ttft_s']} s; step under load "
              f"{run['step_under_load_s']}; short TTFT {run['short_ttft_under_load_s']} (alone "
              f"{run['short_own_prefill_s']}); bound {run['bound_s']} s, ratio {run['ratio']}", flush=True)
    results = header(torch.device("cpu"), args.git_commit)
    results.update(model="embedded SmolLM2-135M-Instruct (fp32)", threads=args.threads, runs=runs)
    write_json(Path(args.out), results)
    return 0 if all(r["holds"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
