"""Grafana dashboards for infermesh, written as JSON next to this file.

    .venv/bin/python monitoring/dashboards/generate.py      # rewrites the *.json files here

Edit the dashboards here, not in Grafana's UI (or export from the UI and port the change back):
tests/test_dashboards.py checks that the JSON files are this script's output and that every
metric a query names exists on a running gateway's /metrics (or is recorded by the rules of
fleet/alerts.py, whose inputs exist). Import the JSON files into Grafana (Dashboards > Import)
with a Prometheus data source that scrapes every gateway pod (the PodMonitor the Pulumi program
creates) and loads the stack's rules (the PrometheusRule ``infermesh-alerts``).

- infermesh / SLO: availability and error budget remaining per tier over the time range (default:
  this month so far), burn rates against the alert thresholds, error and 5xx ratios, refusals,
  p95 TTFT against each tier's SLO;
- infermesh / Latency: TTFT and TTLT percentiles per model, per model and region, per pool; probes;
- infermesh / Providers: pool health, probes, ejections, upstream errors and 5xx by provider and
  region, and per endpoint the worker's queue, KV cache, GPU utilisation and memory;
- infermesh / Gateway: in flight, event-loop lag, shedding, rate limiting, degraded answers,
  ledger shipping lag, shared state, tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def _ratio_guard(expr: str, total: str) -> str:
    return f"({expr} or 0 * {total})"


def error_ratio(window: str, sel: str = 'tier=~"$tier"') -> str:
    """(5xx + shed as overloaded) / requests per tier, as the alerts count it."""
    total = f"sum by (tier) (increase(infermesh_requests_total{{{sel}}}[{window}]))"
    errors = _ratio_guard(f'sum by (tier) (increase(infermesh_requests_total{{{sel},status_class="5xx"}}[{window}]))',
                          total)
    shed = _ratio_guard(f"sum by (tier) (increase(infermesh_shed_total{{{sel}}}[{window}]))", total)
    return f"({errors} + {shed}) / {total}"


BUDGET = '(1 - tier:infermesh_slo_availability:ratio{tier=~"$tier"})'
REGION_OF_POOL = '(0 * max by (model, pool, region) (infermesh_pool_healthy_endpoints{region=~"$region"}) + 1)'
"""1 per (model, pool) with the pool's region as a label: joins a pool's series to its region."""


class Board:
    def __init__(self, uid: str, title: str, description: str, time_from: str = "now-6h") -> None:
        self.uid, self.title, self.description, self.time_from = uid, title, description, time_from
        self.panels: list[dict[str, Any]] = []
        self.variables: list[dict[str, Any]] = [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
        ]
        self._x = self._y = 0
        self._row_h = 0

    def variable(self, name: str, query: str) -> Board:
        self.variables.append({
            "name": name, "label": name, "type": "query", "datasource": DS,
            "definition": query, "query": {"query": query, "refId": f"var-{name}"},
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0,
        })
        return self

    def row(self, title: str) -> Board:
        if self._x:
            self._y += self._row_h
        self._x, self._row_h = 0, 0
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}})
        self._y += 1
        return self

    def panel(self, kind: str, title: str, targets: list[tuple[str, str]], unit: str = "short",
              description: str = "", width: int = 12, height: int = 8, thresholds: list[tuple[float, str]] = (),
              **extra: Any) -> Board:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in thresholds]
        p: dict[str, Any] = {
            "type": kind, "title": title, "description": description, "datasource": DS,
            "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
            "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i),
                         **({"instant": True} if kind == "stat" else {"range": True})}
                        for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": ({"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                         "colorMode": "background", "textMode": "value_and_name"} if kind == "stat" else
                        {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                         "tooltip": {"mode": "multi", "sort": "desc"}}),
        }
        if thresholds and kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {"thresholdsStyle": {"mode": "line"}}
        p.update(extra)
        self.panels.append(p)
        self._x += width
        self._row_h = max(self._row_h, height)
        return self

    def json(self) -> dict[str, Any]:
        for i, p in enumerate(self.panels, start=1):
            p["id"] = i
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["infermesh"], "timezone": "utc", "editable": True, "graphTooltip": 1,
            "schemaVersion": 39, "version": 1, "refresh": "1m",
            "time": {"from": self.time_from, "to": "now"},
            "templating": {"list": self.variables}, "annotations": {"list": []}, "links": [],
            "panels": self.panels,
        }


def slo() -> Board:
    b = Board("infermesh-slo", "infermesh / SLO",
              "Availability and error budget per tier as the alerts count them (5xx and requests shed as "
              "overloaded, per request). The SLA's own monthly figures (minutes, per customer) come from "
              "`infermesh slo report` and `infermesh slo credits`.", time_from="now/M")
    b.variable("tier", "label_values(infermesh_requests_total, tier)")
    b.row("Error budget (over the time range; default: this month so far)")
    b.panel("stat", "Availability (requests)", [(f"1 - {error_ratio('$__range')}", "{{tier}}")],
            unit="percentunit", width=8, decimals=3)
    b.panel("stat", "Error budget remaining",
            [(f"1 - ({error_ratio('$__range')}) / on (tier) {BUDGET}", "{{tier}}")],
            unit="percentunit", width=8, thresholds=[(-1e9, "red"), (0, "orange"), (0.25, "green")], decimals=1)
    b.panel("stat", "SLO (availability, p95 TTFT)",
            [('tier:infermesh_slo_availability:ratio{tier=~"$tier"}', "{{tier}} availability"),
             ('tier:infermesh_slo_ttft_p95:seconds{tier=~"$tier"}', "{{tier}} p95 TTFT (s)")],
            width=8, decimals=4)
    b.row("Burn")
    b.panel("timeseries", "Burn rate, 1 h (page above 14.4x with 5 min)",
            [(f'tier:infermesh_error_ratio:rate1h{{tier=~"$tier"}} / on (tier) {BUDGET}', "{{tier}} 1h"),
             (f'tier:infermesh_error_ratio:rate5m{{tier=~"$tier"}} / on (tier) {BUDGET}', "{{tier}} 5m")],
            thresholds=[(14.4, "red")])
    b.panel("timeseries", "Burn rate, 6 h (page above 6x with 30 min)",
            [(f'tier:infermesh_error_ratio:rate6h{{tier=~"$tier"}} / on (tier) {BUDGET}', "{{tier}} 6h"),
             (f'tier:infermesh_error_ratio:rate30m{{tier=~"$tier"}} / on (tier) {BUDGET}', "{{tier}} 30m")],
            thresholds=[(6, "red")])
    b.panel("timeseries", "Error ratio (5xx + shed), 5 min", [('tier:infermesh_error_ratio:rate5m{tier=~"$tier"}',
                                                               "{{tier}}")], unit="percentunit")
    b.panel("timeseries", "5xx ratio, 5 min (page above 2%)", [('tier:infermesh_5xx_ratio:rate5m{tier=~"$tier"}',
                                                                "{{tier}}")], unit="percentunit",
            thresholds=[(0.02, "red")])
    b.row("Traffic and latency")
    b.panel("timeseries", "Requests by status class",
            [(f'sum by (status_class) (rate(infermesh_requests_total{{tier=~"$tier"}}[{RI}]))', "{{status_class}}")],
            unit="reqps")
    b.panel("timeseries", "Refused: shed (overloaded) and own-quota 429s",
            [(f'sum by (tier) (rate(infermesh_shed_total{{tier=~"$tier"}}[{RI}]))', "{{tier}} shed"),
             (f'sum by (tier) (rate(infermesh_rate_limited_total{{tier=~"$tier"}}[{RI}]))', "{{tier}} rate limited")],
            unit="reqps")
    b.panel("timeseries", "p95 TTFT against the SLO",
            [('histogram_quantile(0.95, sum by (le, tier) (rate(infermesh_ttft_seconds_bucket{tier=~"$tier"}[5m])))',
              "{{tier}} p95"),
             ('tier:infermesh_slo_ttft_p95:seconds{tier=~"$tier"}', "{{tier}} SLO")], unit="s", width=24)
    return b


def latency() -> Board:
    b = Board("infermesh-latency", "infermesh / Latency",
              "Time to first token and to last token per model, region and pool (successful requests; "
              "regions from the pools' labels).")
    b.variable("model", "label_values(infermesh_requests_total, model)")
    b.variable("region", "label_values(infermesh_pool_healthy_endpoints, region)")
    sel = 'model=~"$model"'
    for metric, name in (("infermesh_ttft_seconds", "TTFT"), ("infermesh_ttlt_seconds", "TTLT")):
        b.row(name)
        b.panel("timeseries", f"{name} p50 / p95 / p99 per model",
                [(f"histogram_quantile({q}, sum by (le, model) (rate({metric}_bucket{{{sel}}}[5m])))",
                  f"{{{{model}}}} p{round(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s")
        b.panel("timeseries", f"{name} p95 per model and region",
                [(f"histogram_quantile(0.95, sum by (le, model, region) (rate({metric}_bucket{{{sel}}}[5m]) "
                  f"* on (model, pool) group_left (region) {REGION_OF_POOL}))",
                  "{{model}} {{region}}")], unit="s")
        b.panel("timeseries", f"{name} p95 per pool",
                [(f"histogram_quantile(0.95, sum by (le, model, pool) (rate({metric}_bucket{{{sel}}}[5m])))",
                  "{{model}} {{pool}}")], unit="s", width=24)
    b.row("Probes and output")
    b.panel("timeseries", "Synthetic probe TTFT p95 per pool",
            [("histogram_quantile(0.95, sum by (le, model, pool) "
              f"(rate(infermesh_probe_ttft_seconds_bucket{{{sel}}}[15m])))", "{{model}} {{pool}}")], unit="s")
    b.panel("timeseries", "Output tokens per second per model",
            [(f'sum by (model) (rate(infermesh_tokens_total{{direction="out",{sel}}}[{RI}]))', "{{model}}")],
            unit="short")
    return b


def providers() -> Board:
    b = Board("infermesh-providers", "infermesh / Providers",
              "Per provider, region, pool and endpoint: health, probes, ejections, upstream errors, and what "
              "the workers report (vLLM's queue and KV cache; GPU where the worker's /metrics has DCGM names).")
    b.variable("provider", "label_values(infermesh_pool_healthy_endpoints, provider)")
    b.variable("region", "label_values(infermesh_pool_healthy_endpoints, region)")
    pool_sel = 'provider=~"$provider",region=~"$region"'
    b.row("Pools")
    b.panel("timeseries", "Healthy endpoints per pool (max over gateways)",
            [(f"max by (pool, role) (infermesh_pool_healthy_endpoints{{{pool_sel}}})", "{{pool}} ({{role}})")])
    b.panel("timeseries", "Probe pass rate per pool (10 min; alert under 80%)",
            [("avg by (pool) (infermesh_probe_pass_rate * on (model, pool) group_left () "
              f"(0 * max by (model, pool) (infermesh_pool_healthy_endpoints{{{pool_sel}}}) + 1))", "{{pool}}")],
            unit="percentunit", thresholds=[(0.8, "red")])
    b.panel("timeseries", "Ejections per pool (15 min)",
            [(f"sum by (pool) (increase(infermesh_ejections_total{{{pool_sel}}}[15m]))", "{{pool}}")])
    b.panel("timeseries", "Upstream errors by provider and class",
            [(f"sum by (provider, error_class) (rate(infermesh_upstream_errors_total{{{pool_sel}}}[{RI}]))",
              "{{provider}} {{error_class}}")], unit="reqps")
    b.panel("timeseries", "Requests per provider and region",
            [(f"sum by (provider, region) (rate(infermesh_requests_total{{{pool_sel}}}[{RI}]))",
              "{{provider}} {{region}}")], unit="reqps")
    b.panel("timeseries", "5xx ratio per provider",
            [(f'sum by (provider) (rate(infermesh_requests_total{{{pool_sel},status_class="5xx"}}[5m])) '
              f"/ sum by (provider) (rate(infermesh_requests_total{{{pool_sel}}}[5m]))", "{{provider}}")],
            unit="percentunit")
    b.panel("timeseries", "Retries and fallbacks",
            [(f"sum by (model) (rate(infermesh_retries_total[{RI}]))", "{{model}} retried"),
             (f"sum by (model, fallback) (rate(infermesh_fallbacks_total[{RI}]))", "{{model}} -> {{fallback}}")],
            unit="reqps", width=24)
    ep_sel = pool_sel
    b.row("Endpoints (as the gateways' health checks read them)")
    b.panel("timeseries", "Requests waiting in vLLM (queue)",
            [(f"max by (pool, endpoint) (infermesh_endpoint_requests_waiting{{{ep_sel}}})", "{{endpoint}}")])
    b.panel("timeseries", "KV-cache usage (ejection pressure above 90%)",
            [(f"max by (pool, endpoint) (infermesh_endpoint_kv_cache_usage_ratio{{{ep_sel}}})", "{{endpoint}}")],
            unit="percentunit", thresholds=[(0.9, "red")])
    b.panel("timeseries", "Gateway wait before the first upstream attempt, p95 per pool",
            [(f"histogram_quantile(0.95, sum by (pool, le) (rate(infermesh_gateway_wait_seconds_bucket{{{ep_sel}}}"
              f"[{RI}])))", "{{pool}}")], unit="s")
    b.panel("timeseries", "Requests outstanding through the gateways",
            [(f"sum by (pool, endpoint) (infermesh_endpoint_outstanding{{{ep_sel}}})", "{{endpoint}}")])
    b.panel("timeseries", "Endpoints available (min over gateways)",
            [(f"min by (pool, endpoint) (infermesh_endpoint_available{{{ep_sel}}})", "{{endpoint}}")])
    b.panel("timeseries", "GPU utilisation (workers with DCGM metrics)",
            [(f"max by (pool, endpoint) (infermesh_endpoint_gpu_utilization_ratio{{{ep_sel}}})", "{{endpoint}}")],
            unit="percentunit")
    b.panel("timeseries", "GPU memory used (workers with DCGM metrics)",
            [(f"max by (pool, endpoint) (infermesh_endpoint_gpu_memory_used_bytes{{{ep_sel}}}) "
              f"/ max by (pool, endpoint) (infermesh_endpoint_gpu_memory_total_bytes{{{ep_sel}}})", "{{endpoint}}")],
            unit="percentunit")
    return b


def gateway() -> Board:
    b = Board("infermesh-gateway", "infermesh / Gateway",
              "The gateways themselves: load, overload shedding, limits, degraded answers, the usage ledger's "
              "shipping to PostgreSQL and the shared state backends.")
    b.row("Load")
    b.panel("timeseries", "Requests in flight per gateway", [("infermesh_in_flight", "{{instance}}")])
    b.panel("timeseries", "Event-loop lag per gateway (sheds above gateway.max_loop_lag_ms)",
            [("infermesh_event_loop_lag_seconds", "{{instance}}")], unit="s")
    b.panel("timeseries", "Shed (overloaded) per tier",
            [(f"sum by (tier) (rate(infermesh_shed_total[{RI}]))", "{{tier}}")], unit="reqps")
    b.panel("timeseries", "Failed requests per tenant and error (top 10)",
            [(f"topk(10, sum by (tenant, error) (rate(infermesh_tenant_errors_total[{RI}])))",
              "{{tenant}} {{error}}")], unit="reqps")
    b.panel("timeseries", "Rate limited (own quotas) per tier",
            [(f"sum by (tier) (rate(infermesh_rate_limited_total[{RI}]))", "{{tier}}")], unit="reqps")
    b.panel("timeseries", "max_tokens capped while an SLO is at risk",
            [(f"sum by (model, tier) (rate(infermesh_degraded_total[{RI}]))", "{{model}} {{tier}}")], unit="reqps")
    b.panel("timeseries", "Tokens per second by direction",
            [(f"sum by (direction) (rate(infermesh_tokens_total[{RI}]))", "{{direction}}")])
    b.row("Ledger and shared state")
    b.panel("timeseries", "Usage records not yet in PostgreSQL",
            [("infermesh_ledger_unshipped_rows", "{{instance}}")])
    b.panel("timeseries", "Oldest unshipped usage record (alert above 5 min)",
            [("infermesh_ledger_oldest_unshipped_age_seconds", "{{instance}}")], unit="s",
            thresholds=[(300, "red")])
    b.panel("timeseries", "Shared state up (1) per backend", [("min by (backend) (infermesh_shared_state_up)",
                                                               "{{backend}}")], width=24)
    return b


BOARDS = {"slo": slo, "latency": latency, "providers": providers, "gateway": gateway}


def dashboards() -> dict[str, str]:
    """File name -> JSON text."""
    return {f"infermesh-{name}.json": json.dumps(make().json(), indent=2, ensure_ascii=False) + "\n"
            for name, make in BOARDS.items()}


def main() -> None:
    for name, text in dashboards().items():
        (HERE / name).write_text(text)
        print(f"wrote monitoring/dashboards/{name}")


if __name__ == "__main__":
    main()
