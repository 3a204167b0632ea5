"""Prometheus metrics of one app (its own CollectorRegistry, so several apps can live in one process).

Per-request series are labelled by adapter name (the base model is `BASE_LABEL`), never by
version or request, to keep cardinality bounded by the number of adapters. Request and token
counters also carry the API key's tenant (empty without keys, which Prometheus reads as no
label at all), never the key. Request counts by
HTTP status come from the routes; tokens, latency, TTFT and finish reasons from the engine's
completion callback, so generations cut short by a client that went away are counted too.
Engine and adapter-pool figures are read from `engine.stats()` / `registry.stats()` at scrape
time, so the engine needs no Prometheus dependency and the gauges are never stale.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.pool import PoolStats
from server.api_keys import current_tenant
from server.types import EngineStats, GenerationResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Parentheses are not allowed in adapter names, so these cannot collide with one.
BASE_LABEL = "(base)"
UNKNOWN_LABEL = "(unknown)"   # requests naming an adapter that does not exist
PREFIX = "adapter_server"

# Why server/images.py refused an image (413: bytes, pixels; the others 422).
IMAGE_FAILURE_REASONS = ("bytes", "pixels", "format", "mime_mismatch", "animated", "decode", "url",
                         "remote_disabled", "fetch", "count", "no_vision_model")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def adapter_label(adapter_ref: str | None) -> str:
    """'name@3' -> 'name'; 'a@3:0.5+b@1' -> 'a+b'; None (base model) -> BASE_LABEL."""
    if adapter_ref is None:
        return BASE_LABEL
    return "+".join(part.split("@", 1)[0].split(":", 1)[0] for part in adapter_ref.split("+"))


class _LiveStatsCollector(Collector):
    def __init__(self, engine_stats: Callable[[], EngineStats], pool_stats: Callable[[], PoolStats] | None,
                 kv_cache_write_failures: Callable[[], int] | None):
        self._engine_stats = engine_stats
        self._pool_stats = pool_stats
        self._kv_cache_write_failures = kv_cache_write_failures

    def collect(self) -> Iterable:
        s = self._engine_stats()
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a batch slot.", s.waiting)
        yield GaugeMetricFamily(f"{PREFIX}_running_requests", "Sequences in the running batch.", s.running)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_blocks_used", "KV-cache blocks held by running sequences.",
                                s.kv_blocks_used)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_blocks_cached",
                                "Idle KV-cache blocks kept for prefix-cache hits (reusable).", s.kv_blocks_cached)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_blocks_free", "KV-cache blocks neither used nor cached.",
                                s.kv_blocks_total - s.kv_blocks_used - s.kv_blocks_cached)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_blocks_total", "KV-cache blocks allocated.", s.kv_blocks_total)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by sequences.",
                                s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_bytes", "Bytes allocated for the KV cache.", s.kv_cache_bytes)
        yield CounterMetricFamily(f"{PREFIX}_preemptions", "Sequences preempted (blocks freed, recomputed later).",
                                  s.preemptions_total)
        queries = CounterMetricFamily(f"{PREFIX}_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in the prefix cache.", labels=["adapter"])
        hits = CounterMetricFamily(f"{PREFIX}_prefix_cache_hit_tokens",
                                   "Prompt tokens served by the prefix cache (hit rate = hit / queried).",
                                   labels=["adapter"])
        for name, n in s.prefix_cache_queries.items():
            queries.add_metric([adapter_label(name)], n)
            hits.add_metric([adapter_label(name)], s.prefix_cache_hits.get(name, 0))
        yield queries
        yield hits
        yield CounterMetricFamily(f"{PREFIX}_engine_steps", "Engine forward steps.", s.steps_total)
        yield CounterMetricFamily(f"{PREFIX}_image_feature_cache_hits", "Images whose vision features came "
                                  "from the feature cache (no tower forward).", s.image_feature_cache_hits)
        yield CounterMetricFamily(f"{PREFIX}_image_feature_cache_misses", "Images not in the feature cache "
                                  "(encoded by the vision tower, unless the image failed).",
                                  s.image_feature_cache_misses)
        yield CounterMetricFamily(f"{PREFIX}_images_encoded", "Images run through the vision tower.",
                                  s.images_encoded_total)
        yield CounterMetricFamily(f"{PREFIX}_image_encode_seconds", "Time spent preprocessing and encoding "
                                  "images (on the engine's stepping thread).", s.image_encode_seconds)
        if self._kv_cache_write_failures is not None:
            yield CounterMetricFamily(f"{PREFIX}_adapter_kv_cache_write_failures",
                                      "Adapter K/V cache files that could not be written (the upload "
                                      "still succeeded; the K/V is recomputed on the next load).",
                                      self._kv_cache_write_failures())
        if self._pool_stats is None:
            return
        p = self._pool_stats()
        yield GaugeMetricFamily(f"{PREFIX}_adapters_resident", "Adapter versions resident on the device.",
                                p.resident_count)
        yield GaugeMetricFamily(f"{PREFIX}_adapters_pinned", "Resident adapter versions in use by requests.",
                                p.pinned_count)
        yield GaugeMetricFamily(f"{PREFIX}_adapters_resident_bytes", "Device bytes held by resident adapters.",
                                p.resident_bytes)
        yield CounterMetricFamily(f"{PREFIX}_adapter_loads", "Adapter versions loaded onto the device.", p.loads)
        yield CounterMetricFamily(f"{PREFIX}_adapter_evictions", "Adapter versions evicted from the device.",
                                  p.evictions)
        yield CounterMetricFamily(f"{PREFIX}_adapter_hits", "Adapter acquisitions served by a resident copy.",
                                  p.hits)
        yield CounterMetricFamily(f"{PREFIX}_adapter_load_seconds", "Time spent loading adapters.",
                                  p.load_seconds_total)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], EngineStats], pool_stats: Callable[[], PoolStats] | None,
                 kv_cache_write_failures: Callable[[], int] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Finished HTTP generation requests.",
                                ["adapter", "endpoint", "status", "tenant"], registry=r)
        self.finish_reasons = Counter(f"{PREFIX}_finish_reasons", "Why generations ended.",
                                      ["adapter", "reason", "tenant"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Submit to last token.",
                                 ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Submit to first token.",
                              ["adapter"], buckets=_TTFT_BUCKETS, registry=r)
        self.queue = Histogram(f"{PREFIX}_queue_seconds", "Submit to admission into the running batch "
                               "(waiting for a row or KV-cache blocks); TTFT minus this is prompt processing.",
                               ["adapter"], buckets=_TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.",
                                     ["adapter", "tenant"], registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated.",
                                        ["adapter", "tenant"], registry=r)
        self.auth_rejected = Counter(f"{PREFIX}_auth_rejected_requests", "Inference requests refused by the "
                                     "API key check (401) or a key's limits (429).", ["tenant", "reason"],
                                     registry=r)
        for reason in ("missing_key", "invalid_key"):   # exposed at 0 from the start, for alerts
            self.auth_rejected.labels("", reason)
        self.image_failures = Counter(f"{PREFIX}_image_input_failures", "Image inputs refused before "
                                      "generation (server/images.py), by reason.", ["reason"], registry=r)
        for reason in IMAGE_FAILURE_REASONS:           # exposed at 0 from the start, for alerts
            self.image_failures.labels(reason)
        self.admin_operations = Counter(f"{PREFIX}_admin_operations", "Admin API calls.",
                                        ["operation", "status"], registry=r)
        r.register(_LiveStatsCollector(engine_stats, pool_stats, kv_cache_write_failures))

    def observe_request(self, endpoint: str, status: int, adapter: str) -> None:
        """Count one HTTP generation request; `adapter` is a label from `adapter_label`.

        `status` is the HTTP status, except 499 for a client that went away mid-request. The
        tenant is the caller of the request being served (called from its route).
        """
        self.requests.labels(adapter, endpoint, str(status), current_tenant() or "").inc()

    def observe_result(self, result: GenerationResult) -> None:
        """Engine completion callback: every finished generation, cancelled ones included."""
        adapter, tenant = adapter_label(result.adapter_ref), result.tenant or ""
        self.finish_reasons.labels(adapter, result.finish_reason, tenant).inc()
        self.prompt_tokens.labels(adapter, tenant).inc(result.prompt_tokens)
        self.generated_tokens.labels(adapter, tenant).inc(result.generated_tokens)
        if result.finish_reason != "cancelled":
            self.latency.labels(adapter).observe(result.latency_s)
        if result.generated_tokens:
            self.ttft.labels(adapter).observe(result.ttft_s)
            self.queue.labels(adapter).observe(result.queue_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
