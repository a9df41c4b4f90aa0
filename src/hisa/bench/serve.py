"""Load generator for an OpenAI-compatible server (`hisa bench-serve`): latency and throughput under load.

`num_requests` streamed requests, at most `concurrency` in flight, each a random prompt of about
`input_len` words (from a fixed word list, so no tokenizer is needed on the client) or `input_len`
random token ids, asking for `output_len` tokens with `ignore_eos`. Streaming makes the time to
first token (TTFT) and the inter-token latency (ITL) measurable; TPOT is (E2E - TTFT) / (tokens - 1).

The run is bounded in count and in time (`max_duration_s`; each request by `request_timeout_s`), and
by default only loopback servers may be targeted (`allow_remote` to lift that).

Example::

    cfg = BenchConfig(base_url="http://127.0.0.1:8000", num_requests=64, concurrency=16)
    results = run_benchmark(cfg)
    print(format_table(results)); results["output_throughput"]   # tokens/s
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import platform
import random
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from hisa.errors import HisaError, check_number

WORDS = tuple("""
the of and to in is was for on that with as by at from his her they have this be not are one had
which you were all she there their been has when who will more no if out so said what up its about
into than them can only other new some could time these two may then do first any my now such like
our over man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another know while last
might us great old year off come since against go came right used take three small house city river
water light music garden window morning letter market paper silver forest ocean road number history
""".split())


@dataclass(slots=True)
class BenchConfig:
    """One load test. `endpoint`: "completions" or "chat"; `prompt_type`: "words" or "token-ids"."""

    base_url: str = "http://127.0.0.1:8000"
    num_requests: int = 64
    concurrency: int = 16
    input_len: int = 128
    output_len: int = 32
    seed: int = 0
    endpoint: str = "completions"
    prompt_type: str = "words"
    model: str | None = None  # default: the first model of GET /v1/models
    temperature: float = 0.0
    ignore_eos: bool = True
    request_timeout_s: float = 300.0
    max_duration_s: float = 1800.0
    allow_remote: bool = False
    api_key: str | None = None  # sent as "Authorization: Bearer ..."; never written to the results

    def __post_init__(self) -> None:
        for name in ("num_requests", "concurrency", "input_len", "output_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise HisaError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.endpoint not in ("completions", "chat"):
            raise HisaError(f"endpoint must be completions or chat, got {self.endpoint!r}")
        if self.prompt_type not in ("words", "token-ids"):
            raise HisaError(f"prompt-type must be words or token-ids, got {self.prompt_type!r}")
        if self.prompt_type == "token-ids" and self.endpoint == "chat":
            raise HisaError("the chat endpoint takes text: use --prompt-type words with --endpoint chat")
        for name in ("request_timeout_s", "max_duration_s"):   # (NaN passed a `<= 0` check)
            check_number(name.removesuffix("_s").replace("_", "-") + " (seconds)", getattr(self, name), low=0,
                         open_low=True)
        self.base_url = normalize_base_url(self.base_url)
        check_loopback(self.base_url, allow_remote=self.allow_remote)


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)


def normalize_base_url(url: str) -> str:
    """"http://host:port", "http://host:port/" and "http://host:port/v1" all mean the same server."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def check_loopback(base_url: str, *, allow_remote: bool) -> None:
    """Refuse a target that is not this machine, unless `allow_remote`. Raises HisaError."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HisaError(f"base-url must look like http://127.0.0.1:8000, got {base_url!r}")
    try:
        parts.port   # (urlsplit checks the port only when asked: 0-65535)
    except ValueError:
        raise HisaError(f"base-url {base_url!r} has a port outside 0-65535") from None
    if allow_remote:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, None)
    except socket.gaierror as e:
        raise HisaError(f"cannot resolve {parts.hostname!r}: {e.strerror}") from None
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if not addresses or not all(a.is_loopback for a in addresses):
        raise HisaError(f"{parts.hostname} is not a loopback address; bench-serve only loads this machine's "
                        "server unless --allow-remote is given")


def make_prompts(cfg: BenchConfig) -> list[str | list[int]]:
    """Deterministic random prompts: `input_len` words, or `input_len` token ids in [100, 1000)."""
    rng = random.Random(cfg.seed)
    if cfg.prompt_type == "token-ids":
        return [[rng.randrange(100, 1000) for _ in range(cfg.input_len)] for _ in range(cfg.num_requests)]
    return [" ".join(rng.choice(WORDS) for _ in range(cfg.input_len)) for _ in range(cfg.num_requests)]


def _payload(cfg: BenchConfig, model: str, prompt: str | list[int]) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": cfg.output_len, "temperature": cfg.temperature,
            "ignore_eos": cfg.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def _one_request(client: httpx.AsyncClient, cfg: BenchConfig, model: str,
                       prompt: str | list[int]) -> RequestResult:
    path, body = _payload(cfg, model, prompt)
    result = RequestResult()
    start = time.perf_counter()
    last = None
    num_chunks = 0
    usage = None
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message')}"
                    return result
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                text = ""
                if choices:
                    text = choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                num_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = usage["completion_tokens"] if usage else num_chunks
    result.prompt_tokens = usage["prompt_tokens"] if usage else 0
    result.ok = result.ttft_s is not None or result.output_tokens == 0
    if not result.ok:
        result.error = "the stream ended without any text"
    return result


async def _discover_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    if resp.status_code != 200:
        raise HisaError(f"GET /v1/models answered HTTP {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise HisaError("the server lists no models; pass --model")
    return data[0]["id"]


async def benchmark(cfg: BenchConfig) -> dict:
    """Run the load test (async). Returns the figures of `summarize`."""
    prompts = make_prompts(cfg)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    # trust_env=False: a proxy from the environment must never see (or reroute) loopback traffic.
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with httpx.AsyncClient(base_url=cfg.base_url, timeout=timeout, limits=limits, trust_env=False,
                                 headers=headers) as client:
        try:
            model = cfg.model or await _discover_model(client)
        except httpx.HTTPError as e:
            raise HisaError(f"cannot reach the server at {cfg.base_url}: {e}") from None
        results: list[RequestResult | None] = [None] * cfg.num_requests
        next_index = iter(range(cfg.num_requests))

        async def worker() -> None:
            for i in next_index:  # shared iterator: each index is taken by exactly one worker
                results[i] = await _one_request(client, cfg, model, prompts[i])

        start = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, cfg.num_requests))]
        done, pending = await asyncio.wait(workers, timeout=cfg.max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
        for task in done:
            task.result()  # a bug in the worker itself must not pass silently
    timed_out = RequestResult(error=f"not finished within max-duration {cfg.max_duration_s:g}s")
    return summarize(cfg, model, [r or timed_out for r in results], duration)


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run the load test from synchronous code."""
    return asyncio.run(benchmark(cfg))


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def summarize(cfg: BenchConfig, model: str, results: list[RequestResult], duration_s: float) -> dict:
    """The figures of one run (JSON-ready): counts, throughputs, and latency stats in milliseconds."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    return {
        "command": None,  # set by the CLI
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "client": {"host": platform.node(), "python": platform.python_version(), "machine": platform.machine()},
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "model": model,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": _stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _stats_ms([(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                              if r.ttft_s is not None and r.output_tokens > 1]),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": _stats_ms([r.e2e_s for r in ok]),
    }


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def format_table(res: dict) -> str:
    """A human-readable summary of `summarize`'s figures."""
    c = res["config"]

    def ms(d: dict, key: str) -> str:
        return "-" if d[key] is None else f"{d[key]:.1f}"

    lines = [
        f"bench-serve: {c['base_url']} model={res['model']} endpoint={c['endpoint']}",
        f"  requests {c['num_requests']} at concurrency {c['concurrency']}, input {c['input_len']} "
        f"{'words' if c['prompt_type'] == 'words' else 'token ids'}, output {c['output_len']} tokens",
        f"{'completed / failed':<28}{res['completed']} / {res['failed']}",
        f"{'duration (s)':<28}{res['duration_s']:.2f}",
        f"{'request throughput (req/s)':<28}{res['request_throughput']:.2f}",
        f"{'output throughput (tok/s)':<28}{res['output_throughput']:.1f}",
        f"{'total throughput (tok/s)':<28}{res['total_token_throughput']:.1f}",
        f"{'':<28}{'mean':>10}{'median':>10}{'p99':>10}",
    ]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2e_ms", "E2E latency (ms)")):
        d = res[key]
        lines.append(f"{label:<28}{ms(d, 'mean'):>10}{ms(d, 'median'):>10}{ms(d, 'p99'):>10}")
    for error, count in res["errors"].items():
        lines.append(f"  error x{count}: {error}")
    return "\n".join(lines)
