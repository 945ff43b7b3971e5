"""Every Prometheus metric of the sidecar (docs/reference/metrics.md), registered on an injected registry.

Labels are bounded by construction: status class, a fixed set of methods, a fixed set of
failure reasons. Never a key, a path, a client address or free text. Hot-path children are
resolved once and kept in dicts so a request pays a dict lookup, not ``.labels()``.

The registry also carries the client library's process (``process_*``: CPU, resident memory,
open files) and Python garbage-collector (``python_gc_*``) collectors: argon2id is memory-hard,
so memory is worth watching next to the request metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sidecar import __version__

if TYPE_CHECKING:
    from sidecar.http.client import UpstreamPool

PREFIX = "toolio_sidecar_"
METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Whole requests, from the head read to the last byte of the answer: a JSON-RPC answer in
# milliseconds, a tool call streamed as SSE for as long as the tool runs, and the 2025-era GET
# stream for its whole life (hence the long top buckets).
REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
AUTH_FAILURE_REASONS = ("missing", "malformed", "invalid", "disabled", "expired", "rate_limited",
                        "workspace",
                        # the queue in front of argon2 was full (503; docs/reference/metrics.md)
                        "queue_full",
                        # OAuth access tokens (oauth.mode = "validate"; docs/reference/metrics.md)
                        "token_invalid", "token_expired", "token_audience", "token_issuer", "token_keys_unavailable")
# Who a request came from (docs/reference/metrics.md): a key, a signed-in user, a pass-through
# token for the upstream to check, or nobody known (refused before authentication succeeded).
CALLER_KINDS = ("key", "user", "passthrough", "none")


class _HotCounters(Collector):
    """The per-request counters as plain ints, turned into samples only when scraped: a labelled
    prometheus Counter costs ~2 µs per ``inc`` (a lock and a child lookup), these a dict add."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {
            (cls, method): 0 for cls in STATUS_CLASSES for method in (*METHODS, "OTHER")}
        self.by_kind: dict[tuple[str, str], int] = {
            (kind, cls): 0 for kind in CALLER_KINDS for cls in STATUS_CLASSES}
        self.cache_hits = 0
        # method -> per-bucket counts (not cumulative; the last one is +Inf) and their sum.
        self.durations: dict[str, list[int]] = {}
        self.duration_sums: dict[str, float] = {}

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(PREFIX + "requests", "Proxied requests by response status class and method.",
                                       labels=("status_class", "method"))
        for (cls, method), count in self.requests.items():
            requests.add_metric((cls, method), count)
        yield requests
        by_kind = CounterMetricFamily(PREFIX + "requests_by_kind", "Proxied requests by caller kind and status class.",
                                      labels=("kind", "status_class"))
        for (kind, cls), count in self.by_kind.items():
            by_kind.add_metric((kind, cls), count)
        yield by_kind
        yield CounterMetricFamily(PREFIX + "cache_hits", "Verified-key cache hits.", value=self.cache_hits)
        durations = HistogramMetricFamily(
            PREFIX + "request_duration_seconds",
            "Proxied requests from the request head to the last byte of the answer, by method.", labels=("method",))
        for method, counts in sorted(self.durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*REQUEST_SECONDS_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_bound_text(bound), cumulative))
            durations.add_metric((method,), buckets, self.duration_sums[method])
        yield durations


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.hot = _HotCounters()
        registry.register(self.hot)
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        self.auth_failures = Counter(
            PREFIX + "auth_failures", "Failed authentications by reason.", ("reason",), registry=registry)
        self.cache_misses = Counter(PREFIX + "cache_misses", "Verified-key cache misses.", registry=registry)
        self.cache_evictions = Counter(
            PREFIX + "cache_evictions", "Verified keys evicted by the LRU bound.", registry=registry)
        self.cache_size = Gauge(PREFIX + "cache_size", "Verified keys in the cache.", registry=registry)
        self.cache_trusted = Gauge(
            PREFIX + "key_cache_trusted",
            "1 while every key change is known to be applied here (always with SQLite); 0 while the "
            "shared store's change feed is stale and keys are re-checked in the store per request.",
            registry=registry)
        self.cache_trusted.set(1)
        self.store_unavailable = Counter(
            PREFIX + "store_unavailable", "Requests answered 503 because the key store could not be read.",
            registry=registry)
        self.argon2_seconds = Histogram(
            PREFIX + "argon2_verify_seconds", "Duration of argon2id verifications.", registry=registry,
            buckets=(0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5))
        # The queue in front of the argon2 slots (auth.max_queued_verifications): keys not in the
        # cache wait here, behind their failure budgets' held units and the busy slots.
        self.verification_queue = Gauge(
            PREFIX + "verification_queue_depth",
            "Key verifications waiting for an argon2 slot (auth.max_queued_verifications).", registry=registry)
        self.verification_wait_seconds = Histogram(
            PREFIX + "verification_queue_wait_seconds",
            "Time a key verification waited in the queue before its argon2 run.", registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.upstream_head_seconds = Histogram(
            PREFIX + "upstream_response_head_seconds",
            "Time from sending a request upstream to its response head.", registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.open_streams = Gauge(
            PREFIX + "open_streams", "Responses currently streaming to clients.", registry=registry)
        self.keys = Gauge(PREFIX + "keys", "Keys in the store by status.", ("status",), registry=registry)
        # Read at scrape time from the pool (see watch_pool): nothing on the request path.
        self.upstream_connections = Gauge(
            PREFIX + "upstream_connections", "Upstream connections by state (busy: carrying a request).",
            ("state",), registry=registry)
        self.upstream_pool_waiting = Gauge(
            PREFIX + "upstream_pool_waiting", "Requests waiting for a free upstream connection.",
            registry=registry)
        self.audit_write_failures = Counter(
            PREFIX + "audit_write_failures", "Audit events that could not be written to the store.",
            registry=registry)
        self.audit_events_dropped = Counter(
            PREFIX + "audit_events_dropped",
            "Audit events dropped unwritten because the in-memory queue was full.", registry=registry)
        self.upstream_errors = Counter(
            PREFIX + "upstream_errors", "Upstream failures by kind.", ("kind",), registry=registry)
        self.tool_calls = Counter(
            PREFIX + "tool_calls", "MCP tools/call requests by tool policy outcome (allowed, denied).",
            ("outcome",), registry=registry)
        self.tool_lists_filtered = Counter(
            PREFIX + "tool_lists_filtered", "tools/list results filtered for a key's tool policy.",
            registry=registry)
        self.limited_requests = Counter(
            PREFIX + "limited_requests",
            "Requests refused with 429 by a per-key limit, by reason (rate, concurrency).",
            ("reason",), registry=registry)
        self.limits_backend_errors = Counter(
            PREFIX + "limits_backend_errors",
            "Rate-limit checks Redis could not answer, by what happened to the request "
            "(allowed: limits.redis_failure = open; refused: closed).", ("outcome",), registry=registry)
        self.limits_check_seconds = Histogram(
            PREFIX + "limits_check_seconds", "Duration of shared (Redis) rate-limit checks.", registry=registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.build_info = Info(PREFIX + "build", "Build information.", registry=registry)
        self.build_info.info({"version": __version__})

        self._failure_children = {r: self.auth_failures.labels(r) for r in AUTH_FAILURE_REASONS}
        self.tool_call_outcomes = {o: self.tool_calls.labels(o) for o in ("allowed", "denied")}
        self.limited = {r: self.limited_requests.labels(r) for r in ("rate", "concurrency")}
        for outcome in ("allowed", "refused"):
            self.limits_backend_errors.labels(outcome)
        for kind in ("unreachable", "timeout", "reset", "pool_exhausted", "body_too_large", "unfilterable"):
            self.upstream_errors.labels(kind)
        for status in ("enabled", "disabled"):
            self.keys.labels(status)

    def watch_pool(self, pool: UpstreamPool) -> None:
        self.upstream_connections.labels("busy").set_function(
            lambda: pool.open_connections - pool.idle_connections)
        self.upstream_connections.labels("idle").set_function(lambda: pool.idle_connections)
        self.upstream_pool_waiting.set_function(lambda: pool.waiting)

    def count_request(self, status: int, method: str, kind: str = "none") -> None:
        cls = STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
        counts = self.hot.requests
        key = (cls, method)
        if key not in counts:
            key = (cls, "OTHER")
        counts[key] += 1
        by_kind = (kind, cls)
        if by_kind in self.hot.by_kind:
            self.hot.by_kind[by_kind] += 1

    def observe_request(self, method: str, seconds: float) -> None:
        """One proxied request's whole duration (``toolio_sidecar_request_duration_seconds``)."""
        if method not in METHODS:
            method = "OTHER"
        counts = self.hot.durations.get(method)
        if counts is None:
            counts = self.hot.durations[method] = [0] * (len(REQUEST_SECONDS_BUCKETS) + 1)
            self.hot.duration_sums[method] = 0.0
        counts[bisect_left(REQUEST_SECONDS_BUCKETS, seconds)] += 1
        self.hot.duration_sums[method] += seconds

    def count_cache_hit(self) -> None:
        self.hot.cache_hits += 1

    def count_auth_failure(self, reason: str) -> None:
        self._failure_children.get(reason, self._failure_children["invalid"]).inc()
