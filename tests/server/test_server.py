"""`hisa serve` end to end: a real server process, the official `openai` client, errors, disconnects,
a bounded load test through `bench-serve`, and /metrics counters that add up to what was sent."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.serve_process import MODEL, serve

MAX_MODEL_LEN = 512


@dataclass
class Ledger:
    """What the tests sent, to check /metrics against: successes, their generated tokens, errors, aborts."""

    ok: int = 0
    completion_tokens: int = 0
    errors: int = 0
    aborted: int = 0

    def record(self, usage) -> None:
        self.ok += 1
        self.completion_tokens += usage.completion_tokens if hasattr(usage, "completion_tokens") \
            else usage["completion_tokens"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16", "--page-size", "16"]
    with serve(args, log_dir=tmp_path_factory.mktemp("serve")) as srv:
        srv.ledger = Ledger()
        yield srv


def _streamed_text(stream, ledger: Ledger, *, chat: bool) -> tuple[str, str | None]:
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append((choice.delta.content if chat else choice.text) or "")
            finish = choice.finish_reason or finish
    assert usage is not None
    ledger.record(usage)
    return "".join(pieces), finish


# -- API behaviour ---------------------------------------------------------------------------------
def test_models_lists_the_served_name(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}


def test_completion_streamed_equals_plain_under_greedy(server):
    client, prompt = server.client(), "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    server.ledger.record(plain.usage)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-") and plain.model == MODEL
    choice = plain.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("stop", "length") and choice.text
    assert plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, finish = _streamed_text(stream, server.ledger, chat=False)
    assert text == choice.text and finish == choice.finish_reason


def test_chat_streamed_equals_plain_under_greedy(server):
    client = server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a planet."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0)
    server.ledger.record(plain.usage)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    msg = plain.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert plain.usage.prompt_tokens > 10  # the chat template wraps the messages

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish = _streamed_text(stream, server.ledger, chat=True)
    assert text == msg.content and finish == plain.choices[0].finish_reason


def test_a_chat_turn_that_asks_for_keep_alive_leaves_its_pages_kept(server):
    """"keep_alive": true (an agent session's turn): once it finishes its full pages stay cached ahead
    of other cached pages (--keep-alive, 300 s by default), counted by /metrics; a non-boolean is a 400."""
    client = server.client()
    before = server.metrics().get("hisa_prefix_cache_pages_kept", 0)
    turn = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, extra_body={"keep_alive": True},
        messages=[{"role": "user", "content": "List three colours of the rainbow, then name a fruit of each. " * 4}])
    server.ledger.record(turn.usage)
    assert server.metrics()["hisa_prefix_cache_pages_kept"] > before
    with server.http() as http:
        bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "keep_alive": "5m"})
    assert bad.status_code == 400
    server.ledger.errors += 1


def test_include_usage_sends_a_final_usage_chunk(server):
    chunks = list(server.client().completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + 6
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    assert content[-1].choices[0].finish_reason == "length"
    server.ledger.record(last.usage)
    # without include_usage: no usage anywhere
    chunks = list(server.client().completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks)
    server.ledger.ok += 1
    server.ledger.completion_tokens += 6


def test_stop_string_cuts_streamed_and_plain_text_alike(server):
    client, prompt = server.client(), "Once upon a time"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    server.ledger.record(full.usage)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]  # three characters that likely span a token boundary
    expected = text[: text.find(stop)]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    server.ledger.record(plain.usage)
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    streamed, finish = _streamed_text(stream, server.ledger, chat=False)
    assert streamed == expected and finish == "stop"


def test_prompt_as_token_ids(server):
    ids = [504, 3575, 282, 4649, 314]
    out = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    server.ledger.record(out.usage)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens >= 1


# -- errors ----------------------------------------------------------------------------------------
LONG_PROMPT = "word " * (MAX_MODEL_LEN + 50)

BAD_REQUESTS = [
    # (path, raw body, status, param, code)
    ("/v1/completions", '{"prompt": "hi", "max_tokens": ', 400, None, "invalid_json"),
    ("/v1/completions", json.dumps({"model": MODEL, "max_tokens": 4}), 400, "prompt", None),
    ("/v1/chat/completions", json.dumps({"model": MODEL}), 400, "messages", None),
    ("/v1/completions", json.dumps({"model": "gpt-5", "prompt": "hi"}), 404, "model", "model_not_found"),
    ("/v1/chat/completions", json.dumps({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}),
     404, "model", "model_not_found"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN * 4}), 400, None, None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 4}), 400, None, None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 4, "stream": True}),
     400, None, None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "temperature": -0.5}), 400, "temperature", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "top_p": 1.5}), 400, "top_p", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "top_p": 0}), 400, "top_p", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "n": 2}), 400, "n", None),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}),
     400, "n", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}), 400, "prompt", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 2, 10**9]}), 400, None, None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 0}), 400, "max_tokens", None),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
     400, "messages.0.role", None),
    # JSON types as OpenAI takes them: no "5" or true for an integer, no "true" for a boolean
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "5"}), 400, "max_tokens", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": True}), 400, "max_tokens", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "stream": "true"}), 400, "stream", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [True, 2]}), 400, "prompt", None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": None}), 400, "prompt", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS,
                         ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, path, body, status, param, code):
    with server.http() as http:
        resp = http.post(path, content=body, headers={"Content-Type": "application/json"})
        server.ledger.errors += 1
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param and error["code"] == code
        assert http.get("/health").status_code == 200
    out = server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    server.ledger.record(out.usage)


def test_openai_client_raises_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert e.value.param == "temperature"
    server.ledger.errors += 2


# -- disconnects -----------------------------------------------------------------------------------
def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_stream_disconnect_aborts_and_frees_pages(server):
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = 0
        for line in resp.iter_lines():
            lines += line.startswith("data: ")
            if lines == 3:
                m = server.metrics()  # still connected and generating
                assert m["hisa_kv_pages_used"] > 0 and m["hisa_requests_running"] == 1
                break  # leaving the `with` closes the connection mid-stream
    server.ledger.aborted += 1
    assert _wait_for(lambda: server.metrics()["hisa_kv_pages_used"] == 0)
    m = server.metrics()
    assert m["hisa_requests_running"] == 0 and m["hisa_requests_total{finish_reason=abort}"] >= 1


def test_non_streaming_disconnect_aborts_and_frees_pages(server):
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True}
    with server.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    server.ledger.aborted += 1
    assert _wait_for(lambda: server.metrics()["hisa_requests_total{finish_reason=abort}"] == server.ledger.aborted)
    assert _wait_for(lambda: server.metrics()["hisa_kv_pages_used"] == 0)


# -- load ------------------------------------------------------------------------------------------
def test_bench_serve_load_completes_and_metrics_match(server, tmp_path, capsys):
    from hisa.server.cli import add_bench_serve_parser, run_bench_serve

    parser = argparse.ArgumentParser()
    add_bench_serve_parser(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench-serve", "--base-url", f"{server.url}/v1", "--num-requests", "64",
                              "--concurrency", "16", "--input-len", "12", "--output-len", "16", "--seed", "1",
                              "--max-duration", "150", "--out", str(out)])
    before = server.metrics()
    peak_running = []
    stop = threading.Event()

    def watch():  # sample the running gauge during the load: continuous batching means > 1 at once
        while not stop.is_set():
            peak_running.append(server.metrics()["hisa_requests_running"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code = run_bench_serve(args)
    finally:
        stop.set()
        watcher.join()
    table = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + table)
    res = json.loads(out.read_text())
    assert code == 0 and res["completed"] == 64 and res["failed"] == 0, res["errors"]
    assert res["total_output_tokens"] == 64 * 16  # ignore_eos: exactly output-len tokens each
    assert res["command"].startswith("hisa bench-serve") and "--num-requests 64" in res["command"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < res[key]["median"] <= res[key]["p99"], key
    assert res["ttft_ms"]["mean"] < res["e2e_ms"]["mean"]
    assert "TTFT (ms)" in table and "64 / 0" in table
    assert max(peak_running) > 1

    after = server.metrics()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["hisa_generation_tokens_total"] == res["total_output_tokens"]
    assert delta["hisa_prompt_tokens_total"] == res["total_input_tokens"]
    assert delta["hisa_requests_total{finish_reason=length}"] == 64
    assert delta["hisa_time_to_first_token_seconds_count"] == 64
    assert delta["hisa_e2e_request_latency_seconds_count"] == 64
    assert delta["hisa_time_per_output_token_seconds_count"] == 64 * 15
    assert after["hisa_requests_running"] == 0 and after["hisa_requests_waiting"] == 0
    server.ledger.ok += 64
    server.ledger.completion_tokens += res["total_output_tokens"]


def test_metrics_add_up_to_what_the_tests_sent(server):
    """Runs last in this module: every request made above is accounted for."""
    m = server.metrics()
    led = server.ledger
    finished = {k: v for k, v in m.items() if k.startswith("hisa_requests_total{")}
    assert sum(v for k, v in finished.items() if "abort" not in k) == led.ok
    assert m.get("hisa_requests_total{finish_reason=abort}", 0) == led.aborted
    assert sum(v for k, v in m.items() if k.startswith("hisa_request_errors_total{")) == led.errors
    assert m["hisa_e2e_request_latency_seconds_count"] == led.ok
    # aborted requests generated tokens too, which no usage block reported
    assert m["hisa_generation_tokens_total"] >= led.completion_tokens + led.aborted
    assert m["hisa_kv_pages_used"] == 0 and m["hisa_kv_pages_total"] > 0
    assert m["hisa_requests_running"] == 0 and m["hisa_requests_waiting"] == 0
    # the pool's prefix cache is on by default: requests above were looked up in it
    assert m["hisa_prefix_cache_lookups"] > 0 and m["hisa_prefix_cache_pages_cached"] >= 0


# -- broken device (in process) ---------------------------------------------------------------------
def test_broken_device_fails_pending_requests_and_health(smollm2):
    """A step failure after which the device no longer works stops the engine: pending requests get 500,
    /health turns 503 with the reason, later requests fail at once, nothing hangs, on_dead is told."""
    from hisa.config import EngineConfig
    from hisa.engine.llm_engine import LLMEngine
    from hisa.server.app import create_app

    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32", max_model_len=256, max_num_seqs=4,
                                    progress=False), loaded=smollm2)

    def broken_run(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    engine.runner.run = broken_run
    engine.device_is_healthy = lambda: False
    dead = []
    app = create_app(engine, served_model_name=MODEL, on_engine_dead=dead.append)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/health")).status_code == 200
            resp = await http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
            assert resp.status_code == 500
            assert resp.json()["error"]["code"] == "engine_dead"
            assert "illegal memory access" in resp.json()["error"]["message"]
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"
            assert "DeviceError" in health.json()["error"] and "stopped working" in health.json()["error"]
            again = await http.post("/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
            assert again.status_code == 500
            metrics = (await http.get("/metrics")).text
            assert 'hisa_request_errors_total{code="500"} 2.0' in metrics

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    deadline = time.monotonic() + 30  # the engine thread closes the engine (a collection) before on_dead
    while not dead and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(dead) == 1 and "illegal memory access" in repr(dead[0])
    assert engine.closed  # the dead engine gave its memory back
    app.state.async_engine.shutdown()


# -- sparse-cache hook (unit) ----------------------------------------------------------------------
def test_sparse_stats_become_gauges():
    """Whatever numeric figures the engine's sparse cache reports show up as hisa_sparse_* gauges."""
    from hisa.server.async_engine import EngineStats, read_sparse_stats
    from hisa.server.metrics import ServerMetrics

    class Coordinator:
        def summary(self):
            return {"algorithm": "quest", "hit_rate": 0.75, "bytes_h2d": 4096, "misses_per_layer": [1, 2]}

    class Dense:
        sparse = None

    class WithSparse:
        sparse = Coordinator()

    class WithHook:
        def sparse_stats(self):
            return {"host_pool_used": 3, "ok": True}

    assert read_sparse_stats(Dense()) is None and read_sparse_stats(object()) is None
    assert read_sparse_stats(WithSparse()) == {"hit_rate": 0.75, "bytes_h2d": 4096.0}
    assert read_sparse_stats(WithHook()) == {"host_pool_used": 3.0}

    metrics = ServerMetrics()
    metrics.refresh(EngineStats(kv_pages_used=2, kv_pages_total=8, sparse=read_sparse_stats(WithSparse())))
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples["hisa_sparse_hit_rate"] == 0.75 and samples["hisa_sparse_bytes_h2d"] == 4096
    assert samples["hisa_kv_pages_used"] == 2 and samples["hisa_kv_pages_total"] == 8
