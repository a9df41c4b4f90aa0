"""A real `hisa serve` subprocess on a free loopback port, for the end-to-end server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

MODEL = "hisa-test"


@dataclass
class ServerProcess:
    port: int
    proc: subprocess.Popen
    log_path: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None, **kwargs) -> openai.OpenAI:
        # max_retries=0: a retried request would be counted twice by the server.
        kwargs.setdefault("timeout", 120)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key or "x", max_retries=0,
                             **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), trust_env=False,
                            headers=headers, **kwargs)

    def metrics(self, http: httpx.Client | None = None) -> dict[str, float]:
        """Every sample of /metrics as {"name{label=value,...}": value}."""
        with contextlib.nullcontext(http) if http is not None else self.http() as h:
            resp = h.get("/metrics")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(args: list[str], *, log_dir: Path, env: dict[str, str] | None = None, api_key: str | None = None,
          startup_timeout: float = 240) -> Iterator[ServerProcess]:
    """Start `python -m hisa.server.cli serve --port P --device cpu --served-model-name hisa-test ARGS`,
    wait until /health answers 200, yield it, and stop it. Fails the test if it exits early or logs a
    traceback."""
    port = free_port()
    log_path = log_dir / "server.log"
    cmd = [sys.executable, "-m", "hisa.server.cli", "serve", "--port", str(port), "--device", "cpu",
           "--served-model-name", MODEL, "--disable-access-log", "--log-level", "warning", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    srv = ServerProcess(port=port, proc=proc, log_path=log_path, api_key=api_key)
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"hisa serve exited with {proc.returncode}:\n{srv.log()[-4000:]}")
            try:
                with srv.http() as http:
                    if http.get("/health").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"hisa serve did not become healthy:\n{srv.log()[-4000:]}")
            time.sleep(0.25)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in srv.log(), srv.log()[-4000:]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
