"""Fuzz a real `hisa serve` with random request bodies (hypothesis); after every example the server
answers a fixed greedy request with the same text and every pool gauge is back at zero.

The server runs the sparse cache on a small context (96 tokens, page 8, a 32-token budget, prompts of
24+ tokens sparse: every chat request), so valid requests exercise the dense and the sparse paths and
generate few tokens. HISA_FUZZ_EXAMPLES sets the number of examples (default 200, ~130 s on the 2-core
CI machine; 500 took 214 s there); the long run is bench/fuzz_server.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.server.fuzz_strategies import REQUESTS, FuzzRequest, FuzzTally, send_and_check
from tests.server.serve_process import MODEL, serve, wait_for

FUZZ_EXAMPLES = int(os.environ.get("HISA_FUZZ_EXAMPLES", "200"))
FUZZ_SERVER_ARGS = ["--max-model-len", "96", "--page-size", "8", "--max-num-seqs", "8", "--sparse", "quest",
                    "--token-budget", "32", "--sparse-min-prompt-len", "24", "--host-pool-gb", "0.02",
                    "--max-sparse-requests", "4"]
CHECK = {"model": MODEL, "prompt": [504, 3575, 282, 4649, 314], "max_tokens": 1, "temperature": 0,
         "ignore_eos": True}
POOL_GAUGES = ("hisa_requests_running", "hisa_requests_waiting", "hisa_kv_pages_used",
               "hisa_sparse_host_bytes_in_use", "hisa_sparse_device_kv_bytes_in_use")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with serve(FUZZ_SERVER_ARGS, log_dir=tmp_path_factory.mktemp("fuzz")) as srv:
        yield srv


def check_server(srv, http, expected: str) -> None:
    """The server still answers the fixed greedy request with `expected`, healthy, with empty pools."""
    resp = http.post("/v1/completions", json=CHECK)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == expected
    assert http.get("/health").status_code == 200
    assert wait_for(lambda: all(srv.metrics(http)[g] == 0 for g in POOL_GAUGES), timeout=10), srv.metrics(http)


def test_fuzzed_requests_never_take_the_server_down(fuzz_server):
    tally = FuzzTally()
    with fuzz_server.http(timeout=60) as http:
        expected = http.post("/v1/completions", json=CHECK).json()["choices"][0]["text"]
        assert expected

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much, HealthCheck.large_base_example])
        @given(REQUESTS)
        def example(req: FuzzRequest):
            send_and_check(http, req, tally)
            check_server(fuzz_server, http, expected)

        example()
    print(f"\nfuzz: {tally.examples} examples, statuses {dict(sorted(tally.statuses.items()))}, "
          f"{tally.streams} streams, {tally.completion_tokens} tokens generated")
    assert tally.examples >= FUZZ_EXAMPLES
    assert tally.statuses.get("200", 0) >= FUZZ_EXAMPLES // 20  # valid requests were generated, not only junk
