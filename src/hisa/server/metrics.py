"""Prometheus metrics of one server, in its own CollectorRegistry (never the global one).

Counters and histograms are updated on the engine thread through the `RequestObserver` callbacks;
gauges are set from the engine thread's latest `EngineStats` snapshot when /metrics is scraped.

| metric | type | meaning |
|---|---|---|
| hisa_requests_running / hisa_requests_waiting | gauge | requests in the running batch / in the queue |
| hisa_kv_pages_used / hisa_kv_pages_total | gauge | dense KV pages in use / in the pool |
| hisa_prompt_tokens_total | counter | prompt tokens of requests that reached their first token |
| hisa_generation_tokens_total | counter | tokens generated (aborted requests included) |
| hisa_requests_total{finish_reason} | counter | finished requests: stop, length, abort (client gone), error |
| hisa_request_errors_total{code} | counter | error responses, by HTTP status |
| hisa_time_to_first_token_seconds | histogram | request arrival → first token |
| hisa_time_per_output_token_seconds | histogram | time between consecutive tokens of a request |
| hisa_e2e_request_latency_seconds | histogram | request arrival → last token |
| hisa_sparse_<name> | gauge | each numeric field of `engine.sparse_stats`, when present |
| hisa_prefix_cache_<name> | gauge | with --prefix-cache (the default): device prefix reuse (lookups, requests_hit, pages_hit, tokens_hit, pages_registered, pages_cached, pages_evicted, pages_kept: cached for a finished request that asked for keep_alive, kept_pages_evicted: of those, evicted before their time) |
| hisa_host_prefix_cache_<name> | gauge | with --prefix-cache and a sparse cache whose requests may be host-backed: the same counters for prefix reuse in the host pool (L2) |
| hisa_l3_<name> | gauge | with --l3: the prefix counters (lookups, requests_hit, pages_loaded, tokens_loaded, pages_stored, requests_parked, pages_parked, pages_dropped, loads_timed_out, loads_cut_short, loads_split: cut reads whose rest was read from the back while the front prefilled, pages_met: the pages those gave), the rates a slow read is cut short on (prefill_tokens_per_s, read_bytes_per_s), the L3 I/O thread's backlog (pending_lookups: requests waiting on a lookup; pending_calls: lookups and writes handed over, not ended; pending_write_bytes: the pages those writes hold) and the store's (store_hits, store_misses, store_corrupt, store_unavailable, store_failures, store_bytes_read, store_bytes_written, store_evictions, ...) |

Example::

    metrics = ServerMetrics()
    metrics.refresh(async_engine.stats)
    text = metrics.render()          # Prometheus text format
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hisa.server.async_engine import EngineStats, RequestObserver

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                300.0, 600.0)


class ServerMetrics(RequestObserver):
    """The server's metrics; also the engine thread's RequestObserver."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge("hisa_requests_running", "Requests in the running batch", registry=r)
        self.requests_waiting = Gauge("hisa_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_pages_used = Gauge("hisa_kv_pages_used", "Dense KV cache pages in use", registry=r)
        self.kv_pages_total = Gauge("hisa_kv_pages_total", "Dense KV cache pages in the pool", registry=r)
        self.prompt_tokens = Counter("hisa_prompt_tokens", "Prompt tokens of requests that reached their "
                                     "first token", registry=r)
        self.generation_tokens = Counter("hisa_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("hisa_requests", "Finished requests by finish reason (abort = client gone, error = failed by the engine)",
                                ["finish_reason"], registry=r)
        self.request_errors = Counter("hisa_request_errors", "Error responses by HTTP status code", ["code"],
                                      registry=r)
        self.ttft = Histogram("hisa_time_to_first_token_seconds", "Request arrival to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hisa_time_per_output_token_seconds", "Time between consecutive output tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("hisa_e2e_request_latency_seconds", "Request arrival to last token",
                             buckets=_E2E_BUCKETS, registry=r)
        self._sparse: dict[str, Gauge] = {}

    # -- RequestObserver (engine thread) -----------------------------------------------------
    def on_first_token(self, *, num_prompt_tokens: int, ttft_s: float) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.ttft.observe(ttft_s)

    def on_token(self, *, inter_token_s: float | None) -> None:
        self.generation_tokens.inc()
        if inter_token_s is not None:
            self.itl.observe(inter_token_s)

    def on_finish(self, *, finish_reason: str, e2e_s: float) -> None:
        self.requests.labels(finish_reason=finish_reason).inc()
        if finish_reason != "abort":
            self.e2e.observe(e2e_s)

    # -- HTTP side ---------------------------------------------------------------------------
    def count_error(self, status_code: int) -> None:
        self.request_errors.labels(code=str(status_code)).inc()

    def refresh(self, stats: EngineStats) -> None:
        """Set the gauges from the engine thread's latest snapshot (call before rendering)."""
        self.requests_running.set(stats.num_running)
        self.requests_waiting.set(stats.num_waiting)
        self.kv_pages_used.set(stats.kv_pages_used)
        self.kv_pages_total.set(stats.kv_pages_total)
        for name, value in (stats.sparse or {}).items():
            self._sparse_gauge(name).set(value)
        for name, value in (stats.prefix or {}).items():
            self._sparse_gauge(name, prefix="hisa_prefix_cache_", what="device prefix reuse",
                               source="engine.prefix_cache.metrics()").set(value)
        for name, value in (stats.host_prefix or {}).items():
            self._sparse_gauge(name, prefix="hisa_host_prefix_cache_", what="host pool (L2) prefix reuse",
                               source="engine.host_prefix_cache.metrics()").set(value)
        for name, value in (stats.l3 or {}).items():
            self._sparse_gauge(name, prefix="hisa_l3_", what="L3 prefix reuse", source="engine.l3_prefix.metrics()"
                               ).set(value)

    def _sparse_gauge(self, name: str, *, prefix: str = "hisa_sparse_", what: str = "Sparse KV cache",
                      source: str = "engine.sparse_stats") -> Gauge:
        metric = prefix + re.sub(r"[^a-zA-Z0-9_]", "_", name)
        gauge = self._sparse.get(metric)
        if gauge is None:
            gauge = Gauge(metric, f"{what}: {name} (from {source})", registry=self.registry)
            self._sparse[metric] = gauge
        return gauge

    def render(self) -> bytes:
        return generate_latest(self.registry)
