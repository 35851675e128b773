"""Prometheus metrics of the gateway (GET /metrics). One registry per app instance.

Besides the counters and histograms the request path updates, :class:`Signals` exports what an
on-call engineer diagnoses with, read when /metrics is scraped (so an endpoint or pool that
leaves the routing config leaves /metrics with it):

- per endpoint (labels model, pool, provider, region, endpoint: the routing config's endpoint id,
  never an address), from the router's state: ``infermesh_endpoint_available`` (1/0),
  ``infermesh_endpoint_outstanding`` (requests through this gateway), and what the worker's own
  ``/metrics`` said at the last health check: ``infermesh_endpoint_requests_waiting`` (vLLM's
  ``vllm:num_requests_waiting``), ``infermesh_endpoint_kv_cache_usage_ratio``
  (``vllm:gpu_cache_usage_perc`` / ``vllm:kv_cache_usage_perc``, 0-1) and, only where that page
  carries NVIDIA DCGM exporter names (vLLM's does not; a worker image that merges dcgm-exporter's
  page into it does), ``infermesh_endpoint_gpu_utilization_ratio`` (``DCGM_FI_DEV_GPU_UTIL`` / 100,
  mean over the worker's GPUs) and ``infermesh_endpoint_gpu_memory_used_bytes`` /
  ``infermesh_endpoint_gpu_memory_total_bytes`` (``DCGM_FI_DEV_FB_USED``, + ``_FB_FREE`` and
  ``_FB_RESERVED``, MiB summed over GPUs). External (OpenAI-compatible) upstreams have none of these;
- ledger shipping lag: ``infermesh_ledger_unshipped_rows`` and
  ``infermesh_ledger_oldest_unshipped_age_seconds`` (usage records in this replica's spool not yet
  in PostgreSQL, gateway/state/pg_ledger.py); 0 with the embedded SQLite ledger, which ships nothing.

The gateway connects them with ``metrics.watch(router, shipper)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# Every tier's TTFT SLO in the shipped stacks is a bound (1, 1.5, 2.5 s), so an alert on p95 > SLO is exact
# at the threshold (histogram_quantile interpolates inside a bucket; tests/test_alerts.py checks).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 5, 7.5, 10, 20, 30, 60, 120)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_REQ = ("route", "status_class", "model", "pool", "provider", "region", "tier")
_UP = ("model", "pool", "provider", "region")
_EP = _UP + ("endpoint",)


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
        # where the time goes before a worker sees a request: admission, limits, routing (per pool it went to)
        self.queue = Histogram("infermesh_gateway_wait_seconds", "Time from a request's arrival to its first "
                               "upstream attempt (the gateway's own queueing)", _UP, buckets=_WAIT_BUCKETS,
                               registry=r)
        # per tenant: who is failing and why (error codes are the gateway's own, a fixed set)
        self.tenant_errors = Counter("infermesh_tenant_errors", "Failed requests per tenant by error class",
                                     ("tenant", "tier", "status_class", "error"), registry=r)
        self.degraded = Counter("infermesh_degraded", "Requests whose max_tokens was capped while an SLO was "
                                "at risk", ("model", "tier"), registry=r)
        self.signals = Signals()
        r.register(self.signals)

    def watch(self, router: Any = None, shipper: Any = None) -> None:
        """Export the router's endpoints and the ledger shipper's lag (see the module's docstring)."""
        self.signals.router, self.signals.shipper = router, shipper


_ENDPOINT_GAUGES = (
    # name, help, value from a gateway.router.Endpoint (None: no sample)
    ("infermesh_endpoint_available", "1 while the endpoint takes requests (healthy, not ejected)", None),
    ("infermesh_endpoint_outstanding", "Requests in flight to the endpoint through this gateway",
     lambda ep: ep.outstanding),
    ("infermesh_endpoint_requests_waiting", "vLLM's num_requests_waiting at the endpoint's last health check",
     lambda ep: None if ep.external else ep.waiting),
    ("infermesh_endpoint_kv_cache_usage_ratio", "vLLM's KV-cache usage (0-1) at the endpoint's last health check",
     lambda ep: None if ep.external else ep.kv_usage),
    ("infermesh_endpoint_gpu_utilization_ratio", "GPU utilisation (0-1, mean over the worker's GPUs) where the "
     "worker's /metrics has DCGM_FI_DEV_GPU_UTIL", lambda ep: ep.gpu_util),
    ("infermesh_endpoint_gpu_memory_used_bytes", "GPU memory in use (all the worker's GPUs) where the worker's "
     "/metrics has DCGM_FI_DEV_FB_USED", lambda ep: ep.gpu_mem_used),
    ("infermesh_endpoint_gpu_memory_total_bytes", "GPU memory (used + free + reserved, all GPUs) where the "
     "worker's /metrics has DCGM_FI_DEV_FB_USED and _FB_FREE", lambda ep: ep.gpu_mem_total),
)


class Signals:
    """A collector read at scrape time: endpoint load and health from the router, ledger shipping lag."""

    def __init__(self) -> None:
        self.router: Any = None
        self.shipper: Any = None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield from self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        fams = [GaugeMetricFamily(name, help_, labels=_EP) for name, help_, _ in _ENDPOINT_GAUGES]
        fams.append(GaugeMetricFamily("infermesh_ledger_unshipped_rows", "Usage records in this replica's spool "
                                      "not yet in PostgreSQL (0 with the embedded ledger)"))
        fams.append(GaugeMetricFamily("infermesh_ledger_oldest_unshipped_age_seconds", "Age of the oldest usage "
                                      "record not yet in PostgreSQL (0 when none waits, and with the embedded ledger)"))
        return fams

    def collect(self) -> Iterable[GaugeMetricFamily]:
        fams = self._families()
        router = self.router
        if router is not None:
            now = time.monotonic()
            for ep in router.endpoints():
                p = ep.pool
                labels = [p.model, p.name, p.provider, p.region, ep.id]
                for fam, (_, _, value) in zip(fams, _ENDPOINT_GAUGES, strict=False):
                    v = (1.0 if ep.available(now) else 0.0) if value is None else value(ep)
                    if v is not None:
                        fam.add_metric(labels, float(v))
        rows, age = (0, 0.0)
        if self.shipper is not None:
            rows, age = self.shipper.lag()
        fams[-2].add_metric([], float(rows))
        fams[-1].add_metric([], float(age))
        return fams
