"""`hisa bench-serve`: loopback-only targets, deterministic prompts, bounded concurrency and duration,
and the figures it reports (against a tiny scripted SSE server, so no model is needed)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from hisa.bench.serve import (
    BenchConfig, RequestResult, check_loopback, format_table, make_prompts, normalize_base_url, run_benchmark,
    summarize,
)
from hisa.errors import HisaError
from hisa.server.cli import main as server_cli_main


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/v1", "http://[::1]:9000",
                                 "https://127.0.0.2:443/"])
def test_loopback_targets_are_allowed(url):
    check_loopback(normalize_base_url(url), allow_remote=False)


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://8.8.8.8", "http://[2001:db8::1]:80"])
def test_remote_targets_need_allow_remote(url):
    with pytest.raises(HisaError, match="--allow-remote"):
        check_loopback(url, allow_remote=False)
    check_loopback(url, allow_remote=True)


def test_cli_refuses_remote_target_with_one_line_error(capsys):
    code = server_cli_main(["bench-serve", "--base-url", "http://10.1.2.3:8000", "--num-requests", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "not a loopback address" in err and "Traceback" not in err


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_url="ftp://127.0.0.1"), "base-url must look like"),
    (dict(num_requests=0), "num-requests must be a positive integer"),
    (dict(concurrency=-1), "concurrency must be a positive integer"),
    (dict(endpoint="embeddings"), "endpoint must be completions or chat"),
    (dict(endpoint="chat", prompt_type="token-ids"), "chat endpoint takes text"),
    (dict(max_duration_s=0), "must be a finite number > 0"),
    (dict(max_duration_s=float("nan")), "max-duration .* must be a finite number > 0, got nan"),
    (dict(request_timeout_s=float("nan")), "request-timeout .* must be a finite number > 0, got nan"),
    (dict(base_url="http://127.0.0.1:99999"), "port outside 0-65535"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(HisaError, match=message):
        BenchConfig(**kwargs)


def test_base_url_forms_are_the_same_server():
    assert {normalize_base_url(u) for u in ["http://127.0.0.1:8000", "http://127.0.0.1:8000/",
                                            "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/"]} \
        == {"http://127.0.0.1:8000"}


def test_prompts_are_deterministic_and_sized():
    cfg = BenchConfig(num_requests=5, input_len=37, seed=3)
    prompts = make_prompts(cfg)
    assert prompts == make_prompts(cfg) and len(prompts) == 5 and len(set(prompts)) == 5
    assert all(len(p.split()) == 37 for p in prompts)
    assert make_prompts(BenchConfig(num_requests=5, input_len=37, seed=4)) != prompts
    ids = make_prompts(BenchConfig(num_requests=2, input_len=9, prompt_type="token-ids"))
    assert all(len(p) == 9 and all(isinstance(t, int) for t in p) for p in ids)


def test_summary_figures():
    cfg = BenchConfig(num_requests=3)
    results = [
        RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1] * 4),
        RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft_s=0.3, e2e_s=0.7, itl_s=[0.1] * 4),
        RequestResult(error="HTTP 500: boom"),
    ]
    res = summarize(cfg, "m", results, duration_s=2.0)
    assert res["completed"] == 2 and res["failed"] == 1 and res["errors"] == {"HTTP 500: boom": 1}
    assert res["request_throughput"] == 1.0 and res["output_throughput"] == 5.0
    assert res["total_token_throughput"] == 15.0
    assert res["ttft_ms"]["mean"] == pytest.approx(200) and res["ttft_ms"]["median"] == pytest.approx(200)
    assert res["tpot_ms"]["mean"] == pytest.approx(100) and res["itl_ms"]["p99"] == pytest.approx(100)
    assert res["e2e_ms"]["p99"] == pytest.approx(698, abs=1)
    table = format_table(res)
    assert "2 / 1" in table and "TPOT (ms)" in table and "error x1: HTTP 500: boom" in table
    json.dumps(res)  # JSON-ready


# -- against a scripted server ---------------------------------------------------------------------
class ScriptedServer:
    """An OpenAI-style SSE server that streams `tokens` chunks `delay` s apart and counts concurrency."""

    def __init__(self, *, tokens: int = 4, delay: float = 0.01):
        self.tokens, self.delay = tokens, delay
        self.in_flight = self.peak = self.requests = 0
        self.bodies: list[dict] = []

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)
            return StreamingResponse(self._events(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/models", models),
                                Route("/v1/completions", completions, methods=["POST"])])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def _events(self):
        self.requests += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for _ in range(self.tokens):
                await asyncio.sleep(self.delay)
                yield f'data: {json.dumps({"choices": [{"index": 0, "text": " tok"}]})}\n\n'
            usage = {"prompt_tokens": 7, "completion_tokens": self.tokens, "total_tokens": 7 + self.tokens}
            yield f'data: {json.dumps({"choices": [], "usage": usage})}\n\n'
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "scripted server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_bounded_concurrency_and_figures():
    with ScriptedServer(tokens=4, delay=0.02) as srv:
        res = run_benchmark(BenchConfig(base_url=f"http://127.0.0.1:{srv.port}", num_requests=12, concurrency=3,
                                        input_len=5, output_len=4))
    assert res["completed"] == 12 and res["failed"] == 0 and srv.requests == 12
    assert srv.peak == 3  # never more than --concurrency in flight, and the bound is used
    assert res["model"] == "scripted" and res["total_output_tokens"] == 48 and res["total_input_tokens"] == 84
    body = srv.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 4 and body["ignore_eos"] is True and len(body["prompt"].split()) == 5
    assert 15 <= res["itl_ms"]["median"] < 200 and res["ttft_ms"]["median"] >= 15


def test_run_stops_at_max_duration():
    with ScriptedServer(tokens=50, delay=0.1) as srv:  # 5 s per request
        start = time.monotonic()
        res = run_benchmark(BenchConfig(base_url=f"http://127.0.0.1:{srv.port}", num_requests=6, concurrency=2,
                                        max_duration_s=1.0))
        elapsed = time.monotonic() - start
    assert elapsed < 4 and res["completed"] == 0 and res["failed"] == 6
    assert list(res["errors"]) == ["not finished within max-duration 1s"]


@pytest.mark.parametrize("out", ["{tmp}", "/proc/no-such-dir/bench.json"])
def test_an_out_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys, out):
    code = server_cli_main(["bench-serve", "--base-url", "http://127.0.0.1:9", "--num-requests", "1",
                            "--out", out.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and "Traceback" not in err and "connect" not in err.lower()


def test_serve_on_a_port_in_use_fails_before_loading_the_model(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.perf_counter()
        code = server_cli_main(["serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 5   # no model was loaded
