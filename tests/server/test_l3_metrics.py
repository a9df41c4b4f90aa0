"""/metrics shows the L3 counters (hits, bytes, faults) when --l3 is on, and nothing of L3 when it is off;
likewise the pools' prefix-cache counters (device, host)."""

from prometheus_client.parser import text_string_to_metric_families

from hisa.server.async_engine import EngineStats
from hisa.server.metrics import ServerMetrics


def _samples(metrics):
    return {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


def test_l3_counters_are_gauges():
    metrics = ServerMetrics()
    metrics.refresh(EngineStats(kv_pages_used=1, kv_pages_total=8))
    assert not [n for n in _samples(metrics) if n.startswith("hisa_l3_")]
    metrics.refresh(EngineStats(kv_pages_used=1, kv_pages_total=8,
                                l3=dict(pages_loaded=18, tokens_loaded=288, store_corrupt=1, store_failures=0,
                                        store_bytes_read=13_271_040, pending_lookups=2, pending_calls=3,
                                        pending_write_bytes=1_474_560)))
    samples = _samples(metrics)
    assert samples["hisa_l3_pages_loaded"] == 18 and samples["hisa_l3_store_corrupt"] == 1
    assert samples["hisa_l3_store_bytes_read"] == 13_271_040 and samples["hisa_l3_store_failures"] == 0
    assert samples["hisa_l3_pending_calls"] == 3 and samples["hisa_l3_pending_write_bytes"] == 1_474_560


def test_prefix_cache_counters_are_gauges():
    metrics = ServerMetrics()
    metrics.refresh(EngineStats(kv_pages_used=1, kv_pages_total=8))
    assert not [n for n in _samples(metrics) if n.startswith("hisa_prefix_cache_")]
    metrics.refresh(EngineStats(kv_pages_used=1, kv_pages_total=8,
                                prefix=dict(lookups=3, requests_hit=2, pages_hit=36, tokens_hit=576, pages_cached=5)))
    samples = _samples(metrics)
    assert samples["hisa_prefix_cache_tokens_hit"] == 576 and samples["hisa_prefix_cache_pages_cached"] == 5


def test_host_prefix_cache_counters_are_gauges_of_their_own():
    metrics = ServerMetrics()
    metrics.refresh(EngineStats(kv_pages_used=1, kv_pages_total=8,
                                prefix=dict(pages_hit=0), host_prefix=dict(requests_hit=2, pages_hit=36)))
    samples = _samples(metrics)
    assert samples["hisa_host_prefix_cache_pages_hit"] == 36 and samples["hisa_host_prefix_cache_requests_hit"] == 2
    assert samples["hisa_prefix_cache_pages_hit"] == 0
