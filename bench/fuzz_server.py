"""The long fuzz run: random request bodies against a real `hisa serve` (CPU, embedded SmolLM2).

The same strategies, server and checks as tests/server/test_fuzz.py (which runs 200 examples in CI),
for --examples (default 20,000) or until --max-minutes: after every example the server must answer a
fixed greedy request with the same text, be healthy, and have every pool gauge (running, waiting, KV
pages, sparse host and device bytes) back at zero; no answer may be a 5xx and the server log may hold
no traceback. Hypothesis runs in batches of --batch examples (each a fresh random run) so a long run
can stop on time. With --concurrency K, each hypothesis example is a group of K requests sent at once
(the engine batches them: valid and invalid requests side by side), and the checks run after every
group. Writes JSON with the command, date, git commit, machine and figures.

    python bench/fuzz_server.py --examples 20000 --out bench/results/fuzz_server_cpu.json
    python bench/fuzz_server.py --examples 20000 --concurrency 8 --threads 1   # a busy 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import REPO, header, write_json

sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.server.fuzz_strategies import REQUESTS, FuzzTally, send_and_check  # noqa: E402
from tests.server.serve_process import serve  # noqa: E402
from tests.server.test_fuzz import CHECK, FUZZ_SERVER_ARGS, check_server  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=20_000, help="examples to run (default: 20000)")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="stop after this long (default: 60)")
    ap.add_argument("--batch", type=int, default=500, help="requests per hypothesis run (default: 500)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="requests sent at once per example; the checks run after each group (default: 1)")
    ap.add_argument("--out", default=str(REPO / "bench/results/fuzz_server_cpu.json"))
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the server (default: torch's; 1 avoids oversubscription on a busy CPU)")
    ap.add_argument("--git-commit", default=None, help="record this commit (for a tree without .git)")
    args = ap.parse_args()

    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    tally = FuzzTally()
    failure = None
    batches, rss_start, rss_end, server_alive, final_metrics = 0, float("nan"), float("nan"), False, {}
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp, serve(FUZZ_SERVER_ARGS, log_dir=Path(tmp), env=env) as srv, \
                srv.http(timeout=60) as http:
            expected = http.post("/v1/completions", json=CHECK).json()["choices"][0]["text"]
            rss_start = rss_mib(srv.proc.pid)
            k = args.concurrency
            pool = ThreadPoolExecutor(k)
            while tally.examples < args.examples and time.monotonic() - t0 < args.max_minutes * 60:
                n = max(1, min(args.batch, args.examples - tally.examples) // k)

                @settings(max_examples=n, deadline=None, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
                @given(st.lists(REQUESTS, min_size=k, max_size=k))
                def example(reqs):
                    for f in [pool.submit(send_and_check, http, r, tally) for r in reqs]:
                        f.result()
                    check_server(srv, http, expected)

                try:
                    example()
                except Exception as e:  # noqa: BLE001 — recorded in the results, then the run stops
                    failure = f"{type(e).__name__}: {e}"[:4000]
                    break
                batches += 1
                elapsed = time.monotonic() - t0
                print(f"{tally.examples} examples in {elapsed:.0f} s ({tally.examples / elapsed:.1f}/s), statuses "
                      f"{dict(sorted(tally.statuses.items()))}", flush=True)
            rss_end = rss_mib(srv.proc.pid)
            server_alive = srv.proc.poll() is None
            final_metrics = srv.metrics(http)
    except AssertionError as e:  # the server did not start, or its log holds a traceback
        failure = failure or f"server: {e}"[:4000]
    duration = time.monotonic() - t0
    results = header(torch.device("cpu"), args.git_commit)
    results.update(
        server_args=FUZZ_SERVER_ARGS, server_env=env, check_request=CHECK, concurrency=args.concurrency, examples_asked=args.examples,
        max_minutes=args.max_minutes, examples_run=tally.examples, hypothesis_batches=batches,
        duration_s=round(duration, 1), examples_per_s=round(tally.examples / duration, 2),
        statuses=dict(sorted(tally.statuses.items())), streams=tally.streams,
        completion_tokens=tally.completion_tokens, failure=failure, server_alive_at_end=server_alive,
        server_rss_mib_start=round(rss_start, 1), server_rss_mib_end=round(rss_end, 1),
        requests_total={k: v for k, v in final_metrics.items() if k.startswith("hisa_requests_total")},
        request_errors_total={k: v for k, v in final_metrics.items() if k.startswith("hisa_request_errors_total")},
        pool_gauges_at_end={k: final_metrics.get(k) for k in (
            "hisa_requests_running", "hisa_requests_waiting", "hisa_kv_pages_used", "hisa_sparse_host_bytes_in_use",
            "hisa_sparse_device_kv_bytes_in_use")},
        stopped_on_time=failure is None and tally.examples < args.examples,
    )
    write_json(Path(args.out), results)
    print(f"{tally.examples} examples, {duration:.0f} s, statuses {results['statuses']}, failure: {failure}")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
