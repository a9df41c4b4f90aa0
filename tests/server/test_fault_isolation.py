"""Fault isolation in the engine loop, in process: a real engine and app, with one fault injected.

A failure attributable to one request fails that request alone (500, its pages freed, counted in
/metrics) and the requests batched with it get exactly the text they get without the fault; a failed
step fails that step's requests and the server keeps serving; an API key guards /v1 before anything
else is read.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

MODEL = "hisa-test"
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "The sky is"]
POISON_SEED = 666  # requests carrying this seed are the ones the injected fault hits


@pytest.fixture
def engine(smollm2):
    from hisa.config import EngineConfig
    from hisa.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8, progress=False),
                     loaded=smollm2)


def _serve(engine, scenario, **app_kwargs):
    """Run `scenario(http)` against create_app(engine) in process; shut the engine thread down after."""
    from hisa.server.app import create_app

    app = create_app(engine, served_model_name=MODEL, **app_kwargs)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            return await scenario(http)

    try:
        return asyncio.run(asyncio.wait_for(main(), timeout=300))
    finally:
        app.state.async_engine.shutdown()


def _metrics(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _body(prompt: str, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **extra}


async def _stream_error(http, body) -> dict:
    """POST a streamed request and return the error event it carries (the stream itself is a 200)."""
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["error"]


def test_a_request_failing_in_the_sampler_fails_alone(engine):
    real_sample = engine.sampler.sample

    def sample(logits, seqs):  # one row's failure, as a NaN logit would cause
        out = real_sample(logits, seqs)
        return [RuntimeError("simulated bad row") if s.params.seed == POISON_SEED else t for s, t in zip(seqs, out)]

    engine.sampler.sample = sample

    async def scenario(http):
        alone = [(await http.post("/v1/completions", json=_body(p))).json()["choices"][0]["text"] for p in PROMPTS]
        poisoned = _body("Hello", temperature=0.7, seed=POISON_SEED)
        results = await asyncio.gather(*[http.post("/v1/completions", json=_body(p)) for p in PROMPTS],
                                       http.post("/v1/completions", json=poisoned), _stream_error(http, poisoned))
        *normal, failed, streamed = results
        assert [r.json()["choices"][0]["text"] for r in normal] == alone  # batched with the fault, unchanged
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "request_failed" and "simulated bad row" in failed.text
        assert streamed["code"] == "request_failed"
        after = await http.post("/v1/completions", json=_body(PROMPTS[0]))
        assert after.json()["choices"][0]["text"] == alone[0]
        assert (await http.get("/health")).status_code == 200
        return _metrics((await http.get("/metrics")).text)

    m = _serve(engine, scenario)
    assert m["hisa_requests_total{finish_reason=error}"] == 2
    assert m['hisa_request_errors_total{code=500}'] == 2
    assert m["hisa_requests_total{finish_reason=length}"] == 2 * len(PROMPTS) + 1
    assert m["hisa_time_to_first_token_seconds_count"] == 2 * len(PROMPTS) + 1  # a failed request had no token
    assert m["hisa_kv_pages_used"] == 0 and m["hisa_requests_running"] == 0 and m["hisa_requests_waiting"] == 0


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(engine):
    real_run = engine.runner.run

    def run(batch):  # the step fails whenever the poisoned request is in it (e.g. out of memory)
        if any(s.params.seed == POISON_SEED for s in batch.seqs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real_run(batch)

    engine.runner.run = run

    async def scenario(http):
        alone = [(await http.post("/v1/completions", json=_body(p))).json()["choices"][0]["text"] for p in PROMPTS]
        results = await asyncio.gather(*[http.post("/v1/completions", json=_body(p)) for p in PROMPTS],
                                       http.post("/v1/completions", json=_body("Hi", seed=POISON_SEED)))
        *normal, failed = results
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "step_failed"
        assert "out of memory" in failed.json()["error"]["message"]
        for resp, text in zip(normal, alone):  # shared the failed step (500), or ran in another one, unchanged
            if resp.status_code == 200:
                assert resp.json()["choices"][0]["text"] == text
            else:
                assert resp.status_code == 500 and resp.json()["error"]["code"] == "step_failed"
        later = await asyncio.gather(*[http.post("/v1/completions", json=_body(p)) for p in PROMPTS])
        assert [r.json()["choices"][0]["text"] for r in later] == alone
        assert (await http.get("/health")).status_code == 200
        return _metrics((await http.get("/metrics")).text)

    m = _serve(engine, scenario)
    assert m["hisa_requests_total{finish_reason=error}"] == m["hisa_request_errors_total{code=500}"] >= 1
    assert m["hisa_kv_pages_used"] == 0 and m["hisa_requests_running"] == 0


def test_api_key_is_checked_before_anything_else(engine):
    async def scenario(http):
        bad_json = await http.post("/v1/completions", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 401 and bad_json.json()["error"]["code"] == "invalid_api_key"
        assert bad_json.headers["www-authenticate"] == "Bearer"
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await http.post("/v1/completions", json=_body("Hi"), headers={"Authorization": "Bearer sk-test"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
        assert (await http.get("/health")).status_code == 200  # probes and scrapers need no key
        return _metrics((await http.get("/metrics")).text)

    m = _serve(engine, scenario, api_key="sk-test")
    assert m["hisa_request_errors_total{code=401}"] == 2


def test_metrics_are_fresh_while_a_step_runs(engine):
    """/metrics reflects the step being run (running, pages), not the state before it, while the model runs."""
    import threading

    real_run = engine.runner.run
    in_step, release = threading.Event(), threading.Event()

    def run(batch):  # a long prefill step: held until the test has read /metrics
        in_step.set()
        release.wait(60)
        return real_run(batch)

    engine.runner.run = run

    async def scenario(http):
        task = asyncio.create_task(http.post("/v1/completions", json=_body("The capital of France is")))
        while not in_step.is_set():
            await asyncio.sleep(0.01)
        during = _metrics((await http.get("/metrics")).text)
        release.set()
        assert (await task).status_code == 200
        return during

    during = _serve(engine, scenario)
    assert during["hisa_requests_running"] == 1 and during["hisa_requests_waiting"] == 0
    assert during["hisa_kv_pages_used"] == 1


def test_a_large_body_is_parsed_off_the_event_loop_with_the_same_answers(engine, monkeypatch):
    """A long prompt sent as token ids is megabytes of JSON: parsed on a worker thread (FastAPI parsed it
    on the event loop, ~0.6 s for 9 MB, a pause in every other stream); small bodies stay on the loop.
    The answers and errors are those of FastAPI's own parsing."""
    import threading

    from hisa.server import app as server_app

    threads = []
    real = server_app._validated_body

    def recording(*args):
        threads.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(server_app, "_validated_body", recording)
    ids = list(range(100, 300))

    async def scenario(http):
        loop_thread = threading.get_ident()
        small = await http.post("/v1/completions", json=_body(ids))
        padded = json.dumps(_body(ids)) + " " * (server_app.LARGE_BODY_BYTES + 1)   # valid JSON, 256 KiB+
        large = await http.post("/v1/completions", content=padded, headers={"Content-Type": "application/json"})
        bad = await http.post("/v1/completions", content=b"[" * 150_000 + b"]" * 150_000,
                              headers={"Content-Type": "application/json"})
        return loop_thread, small, large, bad

    loop_thread, small, large, bad = _serve(engine, scenario)
    assert small.status_code == large.status_code == 200
    assert large.json()["choices"][0]["text"] == small.json()["choices"][0]["text"]
    assert threads[0] == loop_thread and threads[1] != loop_thread and threads[2] != loop_thread
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
