"""One bad request never takes `hisa serve` down, and a long prompt never holds the short ones.

A real server process (embedded SmolLM2, CPU) with the sparse cache on, an over-large --token-budget
(capped at the context at startup, not allocated), an API key from HISA_API_KEY, and a small per-step
token budget (--max-num-batched-tokens 64) so long prompts are prefilled in bounded steps.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import long_text
from tests.server.serve_process import MODEL, serve, wait_for

API_KEY = "sk-hisa-test-key"
MAX_MODEL_LEN = 512
STEP_TOKENS = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16", "--page-size", "16",
            "--max-num-batched-tokens", str(STEP_TOKENS), "--sparse", "quest", "--token-budget", "100000",
            "--sparse-min-prompt-len", "128", "--host-pool-gb", "0.1", "--max-sparse-requests", "4"]
    with serve(args, log_dir=tmp_path_factory.mktemp("serve"), env={"HISA_API_KEY": API_KEY},
               api_key=API_KEY) as srv:
        yield srv


def _pools_empty(m: dict[str, float]) -> bool:
    return (m["hisa_requests_running"] == 0 and m["hisa_requests_waiting"] == 0 and m["hisa_kv_pages_used"] == 0
            and m["hisa_sparse_host_bytes_in_use"] == 0 and m["hisa_sparse_device_buffer_bytes_in_use"] == 0)


def test_over_large_token_budget_is_capped_at_startup(server):
    log = server.log()
    assert "sparse cache is capped at the context of 512 tokens (token_budget 100000 -> 512" in log
    m = server.metrics()
    page_bytes = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2: layers x (K, V) x page x KV heads x head dim x fp32
    assert m["hisa_sparse_device_buffer_bytes"] == 4 * (MAX_MODEL_LEN // 16) * page_bytes  # 4 slots of one context


def test_the_openai_client_needs_the_key(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key="wrong-key").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    with httpx.Client(base_url=server.url, trust_env=False) as bare:
        assert bare.post("/v1/chat/completions", json={"messages": []}).status_code == 401
        assert bare.get("/health").status_code == 200
    out = server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2 or out.choices[0].finish_reason == "stop"


BAD = [  # (body, param) — every one a 400 naming its field
    ({"prompt": "Hi", "seed": 2**64}, "seed"),
    ({"prompt": "Hi", "temperature": 1e-40}, "temperature"),
    ({"prompt": "Hi", "temperature": 1e-40, "stream": True}, "temperature"),
    ({"prompt": "Hi", "max_tokens": 10**20}, None),  # an over-large budget for this request
    ({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2**64}, None),
    ({"prompt": "Hi", "logit_bias": {"10000000": 5}}, None),
    ({"prompt": "Hi", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "Hi", "top_p": float("nan")}, "top_p"),
    ({"prompt": "Hi", "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"prompt": "Hi", "min_p": -0.5}, "min_p"),
    ({"prompt": "Hi", "stop_token_ids": [-3]}, None),
    ({"prompt": "a" * 50_000}, None),  # refused before it is tokenized: no 512-token context holds it
]


def _post(http: httpx.Client, body: dict) -> httpx.Response:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return http.post(path, content=json.dumps({"model": MODEL, **body}), headers={"Content-Type": "application/json"})


def test_bad_values_among_normal_traffic_get_400_and_the_rest_completes(server):
    normal = [{"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
              for p in ("The capital of France is", "1, 2, 3,", long_text(200, seed=3))]  # the last one runs sparse
    normal.append({"messages": [{"role": "user", "content": "Name a planet."}], "max_tokens": 8, "temperature": 0})
    with server.http() as http:
        alone = [_post(http, b).json()["choices"][0] for b in normal]
        bodies = [b for _, b in sorted(enumerate(normal * 3 + [b for b, _ in BAD] * 2), key=lambda x: x[0] % 7)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda b: (b, _post(http, b)), bodies))
        for body, resp in results:
            bad = [param for b, param in BAD if b == body]
            if bad:
                assert resp.status_code == 400, (body, resp.text)
                error = resp.json()["error"]
                assert error["type"] == "invalid_request_error" and error["param"] == bad[0] and error["message"]
            else:
                assert resp.status_code == 200, resp.text
                assert resp.json()["choices"][0] == alone[normal.index(body)]  # same text, same finish
        assert http.get("/health").json() == {"status": "ok"}
        assert wait_for(lambda: _pools_empty(server.metrics(http)))
        m = server.metrics(http)
    assert m["hisa_request_errors_total{code=400}"] >= 2 * len(BAD)
    assert m["hisa_sparse_decode_steps"] > 0  # the long prompt really ran sparse


def test_a_long_prefill_does_not_hold_short_requests(server):
    """While a 434-token prompt is prefilled in 64-token steps, a decoding stream keeps getting a token
    every step and a short request gets its first token long before the long prompt does."""
    long_prompt = long_text(400, seed=11)  # 434 tokens: 7 steps of 64
    events: dict[str, list[float]] = {"long": [], "decode": [], "short": []}

    def stream(name: str, body: dict) -> None:
        with server.http() as http, http.stream("POST", "/v1/completions", json={"model": MODEL, "stream": True,
                                                                                 **body}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    events[name].append(time.monotonic())

    decoding = threading.Thread(target=stream, args=("decode", {"prompt": "Count: 1, 2,", "max_tokens": 40,
                                                                  "temperature": 0, "ignore_eos": True}))
    decoding.start()
    assert wait_for(lambda: len(events["decode"]) >= 2, timeout=60)
    long = threading.Thread(target=stream, args=("long", {"prompt": long_prompt, "max_tokens": 2, "temperature": 0,
                                                           "ignore_eos": True}))
    long.start()
    assert wait_for(lambda: server.metrics()["hisa_requests_running"] == 2, timeout=30)  # the long one runs
    sent = time.monotonic()
    stream("short", {"prompt": "Hi", "max_tokens": 1, "temperature": 0})
    long.join(120)
    decoding.join(120)
    short_ttft, long_first = events["short"][0] - sent, events["long"][0]
    assert events["short"][0] < long_first, "the short request waited for the whole long prefill"
    during = [t for t in events["decode"] if sent <= t <= long_first]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert len(during) >= 3  # the decoding stream kept going while the long prompt was prefilled
    print(f"\nshort TTFT {short_ttft * 1e3:.0f} ms; decode steps during the long prefill: {len(during)}, "
          f"max gap {max(gaps) * 1e3:.0f} ms")
    assert short_ttft <= 3 * max(gaps) + 1.0  # its own step plus at most the one in flight (generous on a busy CPU)


def test_bench_serve_sends_the_key_and_never_records_it(server, tmp_path, monkeypatch, capsys):
    from hisa.server.cli import main as server_cli

    monkeypatch.delenv("HISA_API_KEY", raising=False)
    args = ["bench-serve", "--base-url", server.url, "--num-requests", "8", "--concurrency", "8", "--input-len", "8",
            "--output-len", "3"]
    assert server_cli(args) == 2  # without the key: GET /v1/models answers 401, one line, no traceback
    assert "HTTP 401" in capsys.readouterr().err
    out = tmp_path / "bench.json"
    assert server_cli([*args, "--api-key", API_KEY, "--out", str(out)]) == 0
    text = out.read_text()
    assert json.loads(text)["completed"] == 8 and API_KEY not in text
