"""Prometheus alerting rules, rendered from the stack: a pure function of the spec.

The thresholds come from each tier's SLO (``tiers[].slo``), so a stack that tightens an SLO
tightens its alerts in the same commit. ``rule_groups(spec)`` returns the rule groups; the
shipped files (monitoring/alerts/<stack>.rules.yml, `infermesh alerts render --stack S
--write`) and the Kubernetes PrometheusRule (fleet/components/monitoring.py) are that value.

Inputs are the gateway's own metrics (gateway/metrics.py), summed over its replicas:

- error ratio per tier = (5xx + requests shed with code ``overloaded``) / requests, from
  ``infermesh_requests_total{status_class,tier}`` and ``infermesh_shed_total{tier}`` (a shed
  request is also counted in ``infermesh_requests_total`` as a 4xx, so it is in the denominator).
  A customer's own quota 429s (``infermesh_rate_limited_total``) are not errors;
- multi-window, multi-burn-rate budget alerts (Google SRE workbook, "Alerting on SLOs", table
  5): *fast*, 14.4x the budget over 1 h and over 5 min (2% of a 30-day budget in an hour);
  *slow*, 6x over 6 h and over 30 min (5% in six hours). Both page: a slow burn left alone
  spends the month's budget in five days. The short window makes an alert stop soon after
  the burn stops. The budget is ``1 - slo.availability / 100`` as a share of requests; the
  SLA's own monthly figure (minutes) is `infermesh slo report`'s, which these alerts protect;
- p95 TTFT per tier and model over the tier's ``slo.ttft_p95_ms`` (5-minute window) for 5 minutes;
- the 5xx ratio per tier above 10x its monthly 5xx target (``slo.max_5xx_pct``, the seeds' 0.2%)
  for 5 minutes, with at least 5 such answers in the window (one error among a trickle of
  requests is not an incident);
- synthetic probes (``infermesh_probe_pass_rate``, a pool's pass share over 10 minutes) under
  80% for 5 minutes, in pools that are routed (drained or removed pools keep their last value);
- endpoints ejected by outlier detection: 3 or more ejections in a pool within 15 minutes;
- lease deaths: a pool with no healthy endpoint on any gateway for 5 minutes
  (``infermesh_pool_healthy_endpoints``);
- with a PostgreSQL ledger only: the oldest usage record not yet shipped older than 5 minutes.

Every alert carries ``severity`` (``page``: someone acts now; ``ticket``: the next working
hours), a ``summary`` and a ``runbook_url`` to its section of docs/runbook.md, whose heading is
the alert's name (the anchor is the name in lower case).
"""

from __future__ import annotations

from typing import Any

import yaml

from fleet.spec import Spec, Tier

RUNBOOK = "docs/runbook.md"
"""Where runbook_url points (``--runbook-url`` / the ``infermesh:runbook-url`` config override it,
e.g. with the repository's web address of that file)."""

WINDOWS = ("5m", "30m", "1h", "6h")
BURNS = (
    # name, long window, short window, burn rate, severity
    ("Fast", "1h", "5m", 14.4, "page"),
    ("Slow", "6h", "30m", 6.0, "page"),
)
FIVE_XX_ALERT_FACTOR = 10         # alert above 10x the tier's monthly 5xx target, over 5 minutes, for 5 minutes
FIVE_XX_MIN_COUNT = 5             # ... with at least this many 5xx answers in the window
PROBE_PASS_MIN = 0.8
EJECTIONS_MAX = 3                 # ejections in a pool within EJECTIONS_WINDOW
EJECTIONS_WINDOW = "15m"
LEDGER_LAG_MAX_S = 300
POOL_LABELS = "model, pool, provider, region"


def anchor(alert: str) -> str:
    """The runbook section of an alert: its heading is the alert's name (GitHub's anchor: lower case)."""
    return alert.lower()


def _num(x: float) -> str:
    """A threshold as PromQL reads it: short, no float noise (0.0144, not 0.014400000000000012)."""
    return f"{round(x, 12):.6g}"


def _pct(x: float) -> str:
    return f"{round(x * 100, 6):g}%"


def budget(tier: Tier) -> float:
    """The tier's error budget as a share of requests (99.9 -> 0.001)."""
    return round(1 - tier.slo.availability / 100, 12)


def _alert(name: str, expr: str, severity: str, summary: str, description: str, runbook: str,
           for_: str | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {"summary": summary, "description": description,
                           "runbook_url": f"{runbook}#{anchor(name)}"}
    return rule


def _recording(spec: Spec) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for w in WINDOWS:
        total = f"sum by (tier) (rate(infermesh_requests_total[{w}]))"
        zero = f"0 * {total}"                  # a tier with no 5xx (or no shed) series counts 0, not nothing
        rules.append({"record": f"tier:infermesh_requests:rate{w}", "expr": total})
        rules.append({"record": f"tier:infermesh_error_ratio:rate{w}", "expr": (
            f"(\n  (sum by (tier) (rate(infermesh_requests_total{{status_class=\"5xx\"}}[{w}])) or {zero})\n"
            f"  + (sum by (tier) (rate(infermesh_shed_total[{w}])) or {zero})\n)\n/ {total}\n")})
    rules.append({"record": "tier:infermesh_5xx_ratio:rate5m", "expr": (
        "sum by (tier) (rate(infermesh_requests_total{status_class=\"5xx\"}[5m]))\n"
        "/ sum by (tier) (rate(infermesh_requests_total[5m]))\n")})
    for t in spec.tiers:                        # the objectives, for dashboards (budget remaining)
        rules.append({"record": "tier:infermesh_slo_availability:ratio",
                      "expr": f"vector({_num(t.slo.availability / 100)})", "labels": {"tier": t.name}})
        rules.append({"record": "tier:infermesh_slo_ttft_p95:seconds",
                      "expr": f"vector({_num(t.slo.ttft_p95_ms / 1000)})", "labels": {"tier": t.name}})
    return rules


def _tier_alerts(t: Tier, runbook: str) -> list[dict[str, Any]]:
    b = budget(t)
    sel = f'{{tier="{t.name}"}}'
    out = []
    for name, long_w, short_w, factor, severity in BURNS:
        threshold = _num(factor * b)
        out.append(_alert(
            f"InfermeshErrorBudget{name}Burn",
            f"tier:infermesh_error_ratio:rate{long_w}{sel} > {threshold}\n"
            f"and\ntier:infermesh_error_ratio:rate{short_w}{sel} > {threshold}\n",
            severity,
            f"Tier {t.name}: error budget burning at {factor:g}x ({long_w} and {short_w})",
            f"Over the last {long_w} and the last {short_w}, more than {_pct(factor * b)} of tier {t.name}'s "
            f"requests failed (5xx or shed as overloaded): {factor:g} times the {_pct(b)} budget of its "
            f"{t.slo.availability:g}% SLO. At this rate the month's budget lasts {30 / factor:.1f} days.",
            runbook, labels={"tier": t.name}))
    ttft = t.slo.ttft_p95_ms / 1000
    out.append(_alert(
        "InfermeshTTFTOverSLO",
        f"histogram_quantile(0.95, sum by (le, model) (rate(infermesh_ttft_seconds_bucket{sel}[5m])))\n"
        f"> {_num(ttft)}\n",
        "page",
        f"Tier {t.name}: p95 TTFT of {{{{ $labels.model }}}} over its {_num(ttft)} s SLO for 5 minutes",
        f"The 95th percentile time to first token of tier {t.name}'s requests to {{{{ $labels.model }}}} has been "
        f"above the tier's SLO ({t.slo.ttft_p95_ms:g} ms) over 5-minute windows for 5 minutes.",
        runbook, for_="5m", labels={"tier": t.name}))
    target = t.slo.max_5xx_pct / 100
    ratio = min(1.0, target * FIVE_XX_ALERT_FACTOR)
    out.append(_alert(
        "InfermeshHigh5xxRate",
        f"tier:infermesh_5xx_ratio:rate5m{sel} > {_num(ratio)}\n"
        f"and\nsum by (tier) (increase(infermesh_requests_total{{tier=\"{t.name}\",status_class=\"5xx\"}}[5m]))"
        f" >= {FIVE_XX_MIN_COUNT}\n",
        "page",
        f"Tier {t.name}: 5xx above {_pct(ratio)} of requests for 5 minutes",
        f"More than {_pct(ratio)} of tier {t.name}'s requests got a 5xx over 5 minutes, for 5 minutes "
        f"({FIVE_XX_ALERT_FACTOR}x the tier's monthly 5xx target of {_pct(target)}).",
        runbook, for_="5m", labels={"tier": t.name}))
    return out


def _pool_alerts(spec: Spec, runbook: str) -> list[dict[str, Any]]:
    out = []
    for name, roles, severity, what in (
            ("", "primary|canary", "page", "serving"),
            ("Standby", "standby", "ticket", "standby")):
        routed = f'max by (model, pool) (infermesh_pool_healthy_endpoints{{role=~"{roles}"}})'
        out.append(_alert(
            f"Infermesh{name}ProbesFailing",
            f"avg by (model, pool) (infermesh_probe_pass_rate) < {_num(PROBE_PASS_MIN)}\n"
            f"and on (model, pool)\n{routed}\n",
            severity,
            f"Synthetic probes failing in {what} pool {{{{ $labels.pool }}}} ({{{{ $labels.model }}}})",
            f"Fewer than {PROBE_PASS_MIN:.0%} of the synthetic probes of pool {{{{ $labels.pool }}}} passed over "
            f"the last 10 minutes (an error, empty content, or TTFT/TTLT over the strictest SLO of the tiers "
            f"served), for 5 minutes.",
            runbook, for_="5m"))
        out.append(_alert(
            f"Infermesh{name}PoolDown",
            f'max by ({POOL_LABELS}, role) (infermesh_pool_healthy_endpoints{{role=~"{roles}"}}) == 0\n',
            severity,
            f"{what.capitalize()} pool {{{{ $labels.pool }}}} has no healthy endpoint (leases dead?)",
            "No gateway has seen a healthy endpoint in {{ $labels.role }} pool {{ $labels.pool }} "
            "({{ $labels.model }}, {{ $labels.provider }}, {{ $labels.region }}) for 5 minutes: "
            "its leases are dead, unreachable or failing their health checks.",
            runbook, for_="5m"))
    out.append(_alert(
        "InfermeshEndpointsEjected",
        f"sum by ({POOL_LABELS}) (increase(infermesh_ejections_total[{EJECTIONS_WINDOW}])) >= {EJECTIONS_MAX}\n",
        "ticket",
        "Endpoints of pool {{ $labels.pool }} ejected repeatedly",
        f"Outlier detection ejected endpoints of pool {{{{ $labels.pool }}}} ({{{{ $labels.provider }}}}, "
        f"{{{{ $labels.region }}}}) {EJECTIONS_MAX} times or more within {EJECTIONS_WINDOW} (errors, timeouts, "
        f"slow answers or failed probes).",
        runbook))
    if spec.gateway.state.ledger == "postgres":
        out.append(_alert(
            "InfermeshLedgerShippingLag",
            f"max(infermesh_ledger_oldest_unshipped_age_seconds) > {LEDGER_LAG_MAX_S}\n",
            "ticket",
            "Usage records not shipped to PostgreSQL for over 5 minutes",
            "A gateway's oldest usage record not yet in PostgreSQL is more than 5 minutes old: reports, "
            "credits and the status page read PostgreSQL, so they are behind (nothing is lost: the "
            "records wait in the replica's spool).",
            runbook, for_="5m"))
    return out


def rule_groups(spec: Spec, runbook: str = RUNBOOK) -> list[dict[str, Any]]:
    """The stack's Prometheus rule groups (recording rules, then alerts), as plain data."""
    prefix = f"infermesh-{spec.stack}"
    tiers = [r for t in spec.tiers for r in _tier_alerts(t, runbook)]
    return [
        {"name": f"{prefix}-sli", "rules": _recording(spec)},
        {"name": f"{prefix}-slo", "rules": tiers},
        {"name": f"{prefix}-pools", "rules": _pool_alerts(spec, runbook)},
    ]


def alert_names(spec: Spec) -> list[str]:
    """Each alert's name once, in rule order."""
    names: list[str] = []
    for g in rule_groups(spec):
        for r in g["rules"]:
            if "alert" in r and r["alert"] not in names:
                names.append(r["alert"])
    return names


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def to_yaml(spec: Spec, runbook: str = RUNBOOK) -> str:
    """The rules file (Prometheus' rule_files format) for the stack."""
    head = (f"# Prometheus rules for stack {spec.stack}, rendered from stacks/Pulumi.{spec.stack}.yaml by\n"
            f"# `infermesh alerts render --stack {spec.stack}` (fleet/alerts.py). Do not edit: render again.\n")
    return head + yaml.dump({"groups": rule_groups(spec, runbook)}, Dumper=_Dumper, sort_keys=False,
                            width=1000, allow_unicode=True)
