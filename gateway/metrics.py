"""Prometheus metrics of the gateway (GET /metrics). One registry per app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60, 120)
_REQ = ("route", "status_class", "model", "pool", "provider", "region", "tier")
_UP = ("model", "pool", "provider", "region")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("infermesh_requests", "Requests by outcome", _REQ, registry=r)
        self.ttft = Histogram("infermesh_ttft_seconds", "Time to first token", ("model", "pool", "tier"),
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.ttlt = Histogram("infermesh_ttlt_seconds", "Time to last token", ("model", "pool", "tier"),
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("infermesh_tokens", "Tokens metered", ("direction", "model", "tier"), registry=r)
        self.upstream_errors = Counter("infermesh_upstream_errors", "Upstream failures by class",
                                       _UP + ("error_class",), registry=r)
        self.retries = Counter("infermesh_retries", "Requests retried on another endpoint", ("model",), registry=r)
        self.ejections = Counter("infermesh_ejections", "Endpoints ejected by outlier detection", _UP, registry=r)
        self.fallbacks = Counter("infermesh_fallbacks", "Requests served by a fallback model",
                                 ("model", "fallback", "tier"), registry=r)
        self.shed = Counter("infermesh_shed", "Requests refused by load shedding", ("tier",), registry=r)
        self.rate_limited = Counter("infermesh_rate_limited", "Requests refused by tenant limits", ("tier",),
                                    registry=r)
        self.healthy = Gauge("infermesh_pool_healthy_endpoints", "Available endpoints per pool", _UP + ("role",),
                             registry=r)
        self.in_flight = Gauge("infermesh_in_flight", "Requests in flight", registry=r)
        self.loop_lag = Gauge("infermesh_event_loop_lag_seconds", "How late the event loop runs (smoothed); "
                              "admission sheds above gateway.max_loop_lag_ms", registry=r)
        self.probes = Counter("infermesh_probes", "Synthetic probes by result", ("model", "pool", "result"),
                              registry=r)
        self.probe_ttft = Histogram("infermesh_probe_ttft_seconds", "Synthetic probes' time to first token",
                                    ("model", "pool"), buckets=_LATENCY_BUCKETS, registry=r)
        self.probe_pass_rate = Gauge("infermesh_probe_pass_rate", "Share of passed synthetic probes per pool "
                                     "over the last 10 minutes", ("model", "pool"), registry=r)
        self.degraded = Counter("infermesh_degraded", "Requests whose max_tokens was capped while an SLO was "
                                "at risk", ("model", "tier"), registry=r)
