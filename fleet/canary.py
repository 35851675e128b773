"""Canary decisions: pure functions from two pools' SLIs to promote, rollback or wait, with reasons.

Inputs are the gateway's per-pool SLIs over a window (gateway/sli.py, ``GET /admin/sli``): the
canary pool (``<pool>-canary``) against its baseline (the base pool, serving the old image).

The rules, in order (defaults in ``Thresholds``):

1. **Error rate**, one-sided test of H0 "canary error rate <= baseline error rate" against H1
   "canary is worse". Errors are per upstream attempt (retried failures included, see
   gateway/sli.py). With all expected cell counts >= 5 the two-proportion z-test (pooled
   variance) gives the p-value; with smaller counts Fisher's exact test (hypergeometric upper
   tail) does, since the normal approximation is then unreliable. Rollback when p < ``alpha``
   (0.01) *and* the observed difference exceeds ``error_margin`` (0.2 percentage points: a
   significant but negligible difference is not a regression worth a rollback).
   A canary may be rolled back on errors *before* it has the minimum sample when the evidence
   is already overwhelming: ``early_min_attempts`` (20) canary attempts and p < ``early_alpha``
   (0.0001). A broken canary is mostly ejected by the gateway and would otherwise take a long
   time to reach the minimum sample.
2. **Samples**: both sides need ``min_samples`` (100) attempts and ``min_latency_samples``
   (default: half of min_samples) successful first-attempt requests; else **wait**, never promote.
3. **Latency**: rollback when canary p95 TTFT > ``ttft_ratio`` (1.2) x baseline p95 TTFT, or
   canary p95 TTLT > ``ttlt_ratio`` (1.2) x baseline p95 TTLT, and the difference is more than
   ``latency_slack_ms`` (5 ms; a ratio of two tiny latencies is noise).
4. **Probes** (when the gateway runs synthetic probes for both pools): rollback when the canary
   ran at least ``min_probes`` (5) probes and its pass rate is below the baseline's minus
   ``probe_margin`` (0.05). Without probe data the rule is skipped and says so.
5. Otherwise **promote**.

Exit codes of `infermesh canary evaluate`: 0 promote, 3 wait, 4 rollback (2: bad input).

**Fleet-wide SLIs.** With several gateway replicas each one knows only the attempts it made, so the
inputs come from every replica's ``/metrics`` (or from a Prometheus that scrapes them all), summed
before any rate or quantile is taken (``fleet_sides``). Per pool, from the gateway's counters:

- ``failed``: ``infermesh_upstream_errors_total`` except ``slow_ttft`` (a served request that was
  slow) and ``stream_*`` (a stream broken after its first byte): attempts that failed before the first
  byte, each of them retried elsewhere or the request's last attempt;
- ``stream``: ``infermesh_upstream_errors_total{error_class=~"stream_.*"}``;
- ``served``: ``infermesh_requests_total`` (requests the pool finally answered), ``served_5xx`` of them
  with a 5xx. A 5xx that is not a broken stream is a request whose retries ran out: its last failed
  attempt is already in ``failed``;
- ``attempts = served - max(0, served_5xx - stream) + failed``; ``errors = failed + stream``: the same
  definitions as gateway/sli.py's per-pool SLIs, which read the ledger and one process's attempt log;
- p95 TTFT and TTLT from the summed ``infermesh_ttft_seconds`` / ``infermesh_ttlt_seconds`` buckets
  (linear within a bucket, as Prometheus' ``histogram_quantile``); ``latency_samples`` their count.

One difference from /admin/sli, small: the latency histograms also hold requests that were
retried (their TTFT includes the failed attempt: what the customer waited). A stream the worker
ends with an error event is ``stream_error_event`` in ``infermesh_upstream_errors_total``, so it is
an attempt and an error here as there (tests/test_gateway_relay.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

EXIT = {"promote": 0, "wait": 3, "rollback": 4}


@dataclass(frozen=True)
class Thresholds:
    min_samples: int = 100
    min_latency_samples: int | None = None        # None: min_samples // 2
    alpha: float = 0.01
    error_margin: float = 0.002
    early_min_attempts: int = 20
    early_alpha: float = 0.0001
    ttft_ratio: float = 1.2
    ttlt_ratio: float = 1.2
    latency_slack_ms: float = 5.0
    min_probes: int = 5
    probe_margin: float = 0.05

    @property
    def latency_samples(self) -> int:
        return self.min_latency_samples if self.min_latency_samples is not None else max(1, self.min_samples // 2)


@dataclass(frozen=True)
class Side:
    pool: str
    attempts: int = 0
    errors: int = 0
    latency_samples: int = 0
    ttft_p95_ms: float | None = None
    ttlt_p95_ms: float | None = None
    probes: int | None = None
    probe_pass_rate: float | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.attempts if self.attempts else None

    @classmethod
    def from_sli(cls, pool: str, sli: dict[str, Any] | None) -> Side:
        s = sli or {}
        return cls(pool=pool, attempts=int(s.get("attempts") or 0), errors=int(s.get("errors") or 0),
                   latency_samples=int(s.get("latency_samples") or 0), ttft_p95_ms=s.get("ttft_p95_ms"),
                   ttlt_p95_ms=s.get("ttlt_p95_ms"), probes=s.get("probes"),
                   probe_pass_rate=s.get("probe_pass_rate"))


@dataclass
class Decision:
    action: str                                  # promote | rollback | wait
    reason: str                                  # one line
    canary: Side
    baseline: Side
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT[self.action]

    def line(self) -> str:
        return f"{self.action}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            return {**asdict(s), "error_rate": None if s.error_rate is None else round(s.error_rate, 6)}
        return {"decision": self.action, "reason": self.reason, "exit_code": self.exit_code,
                "canary": side(self.canary), "baseline": side(self.baseline), "checks": self.checks}


# ---- statistics ----------------------------------------------------------------------------------

def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def z_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """One-sided two-proportion z-test (pooled), H1: p1 > p2. Returns (z, p-value)."""
    if n1 <= 0 or n2 <= 0:
        return 0.0, 1.0
    p = (x1 + x2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0 if x1 / n1 <= x2 / n2 else 0.0
    z = (x1 / n1 - x2 / n2) / se
    return z, normal_sf(z)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(x1: int, n1: int, x2: int, n2: int) -> float:
    """One-sided Fisher's exact test, H1: p1 > p2: P(X >= x1) for X ~ Hypergeometric(N=n1+n2,
    K=x1+x2 errors, n=n1 draws)."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    big_n, k = n1 + n2, x1 + x2
    lo, hi = max(x1, k - n2), min(k, n1)
    if lo > hi:
        return 0.0
    denom = _log_comb(big_n, n1)
    return min(1.0, sum(math.exp(_log_comb(k, i) + _log_comb(big_n - k, n1 - i) - denom) for i in range(lo, hi + 1)))


def error_test(x1: int, n1: int, x2: int, n2: int) -> tuple[str, float, float | None]:
    """(method, one-sided p-value, z or None): z-test when every expected cell count is >= 5,
    Fisher's exact test otherwise."""
    if n1 <= 0 or n2 <= 0:
        return "none", 1.0, None
    p = (x1 + x2) / (n1 + n2)
    expected = (n1 * p, n1 * (1 - p), n2 * p, n2 * (1 - p))
    if min(expected) >= 5:
        z, pv = z_test(x1, n1, x2, n2)
        return "z-test", pv, z
    return "fisher", fisher_greater(x1, n1, x2, n2), None


# ---- the decision --------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return "p<0.0001" if p < 0.0001 else f"p={p:.4f}"


def evaluate(canary: Side, baseline: Side, t: Thresholds = Thresholds()) -> Decision:
    checks: list[dict[str, Any]] = []
    rollback: list[str] = []
    waits: list[str] = []

    # 1. errors
    method, pv, z = error_test(canary.errors, canary.attempts, baseline.errors, baseline.attempts)
    diff = (canary.error_rate or 0.0) - (baseline.error_rate or 0.0)
    enough = canary.attempts >= t.min_samples and baseline.attempts >= t.min_samples
    early = (canary.attempts >= t.early_min_attempts and baseline.attempts >= t.early_min_attempts
             and pv < t.early_alpha)
    worse = diff > t.error_margin and ((enough and pv < t.alpha) or early)
    err_text = (f"error rate {_pct(canary.error_rate)} vs {_pct(baseline.error_rate)} "
                f"({canary.errors}/{canary.attempts} vs {baseline.errors}/{baseline.attempts}, {method} {_p(pv)}"
                + (f", z={z:.2f}" if z is not None else "") + ")")
    checks.append({"check": "error_rate", "method": method, "p_value": pv, "z": z, "difference": diff,
                   "alpha": t.alpha if not early else t.early_alpha, "margin": t.error_margin,
                   "result": "fail" if worse else ("pass" if enough else "wait"), "detail": err_text})
    if worse:
        rollback.append(err_text)

    # 2. samples
    if not enough:
        waits.append(f"too few samples: canary {canary.attempts}, baseline {baseline.attempts} attempts "
                     f"(need {t.min_samples} each)")
    elif canary.latency_samples < t.latency_samples or baseline.latency_samples < t.latency_samples:
        waits.append(f"too few successful requests for latency: canary {canary.latency_samples}, "
                     f"baseline {baseline.latency_samples} (need {t.latency_samples} each)")
    checks.append({"check": "samples", "canary": canary.attempts, "baseline": baseline.attempts,
                   "min": t.min_samples, "result": "pass" if not waits else "wait"})

    # 3. latency (only with enough samples)
    for name, c, b, ratio in (("ttft_p95", canary.ttft_p95_ms, baseline.ttft_p95_ms, t.ttft_ratio),
                              ("ttlt_p95", canary.ttlt_p95_ms, baseline.ttlt_p95_ms, t.ttlt_ratio)):
        label = name.replace("_", " ").replace("ttft", "TTFT").replace("ttlt", "TTLT")
        if waits or c is None or b is None or b <= 0:
            checks.append({"check": name, "result": "wait", "canary_ms": c, "baseline_ms": b, "max_ratio": ratio})
            continue
        r = c / b
        bad = r > ratio and c - b > t.latency_slack_ms
        text = f"{label} {c:.0f} ms vs {b:.0f} ms ({r:.2f}x, limit {ratio:g}x)"
        checks.append({"check": name, "result": "fail" if bad else "pass", "canary_ms": c, "baseline_ms": b,
                       "ratio": round(r, 4), "max_ratio": ratio, "detail": text})
        if bad:
            rollback.append(text)

    # 4. probes
    cp, bp = canary.probe_pass_rate, baseline.probe_pass_rate
    if cp is None or bp is None:
        checks.append({"check": "probes", "result": "skipped", "detail": "no probe data"})
    elif (canary.probes or 0) < t.min_probes:
        checks.append({"check": "probes", "result": "wait", "canary_probes": canary.probes, "min": t.min_probes})
    else:
        bad = cp < bp - t.probe_margin
        text = f"probe pass rate {_pct(cp)} vs {_pct(bp)} (margin {_pct(t.probe_margin)})"
        checks.append({"check": "probes", "result": "fail" if bad else "pass", "canary": cp, "baseline": bp,
                       "detail": text})
        if bad:
            rollback.append(text)

    if rollback:
        return Decision("rollback", "; ".join(rollback), canary, baseline, checks)
    if waits:
        return Decision("wait", "; ".join(waits), canary, baseline, checks)
    summary = (f"canary matches baseline over {canary.attempts}+{baseline.attempts} attempts: "
               f"{err_text}")
    for check in checks:
        if check["check"] in ("ttft_p95", "ttlt_p95") and check["result"] == "pass":
            summary += f"; {check['detail']}"
    return Decision("promote", summary, canary, baseline, checks)


def decide(sli: dict[str, Any], pool: str, t: Thresholds = Thresholds()) -> Decision:
    """The decision for base pool `pool` from a ``GET /admin/sli`` answer."""
    pools = sli.get("pools") or {}
    name = f"{pool}-canary"
    return evaluate(Side.from_sli(name, pools.get(name)), Side.from_sli(pool, pools.get(pool)), t)


# ---- fleet-wide SLIs from the gateways' /metrics ------------------------------------------------------

Series = tuple[str, tuple[tuple[str, str], ...]]     # sample name, sorted labels
_METRICS = ("infermesh_requests_total", "infermesh_upstream_errors_total", "infermesh_ttft_seconds_bucket",
            "infermesh_ttlt_seconds_bucket")
NOT_ATTEMPT_FAILURES = {"slow_ttft"}


def parse_metrics(text: str) -> dict[Series, float]:
    """The samples a canary decision needs from one gateway's ``/metrics`` (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in _METRICS:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def increase(now: dict[Series, float], before: dict[Series, float] | None) -> dict[Series, float]:
    """Per-series increase of one replica's counters since ``before`` (a restart resets a counter:
    then the whole current value counts, as Prometheus' ``increase`` does)."""
    if before is None:
        return dict(now)
    out = {}
    for k, v in now.items():
        b = before.get(k, 0.0)
        out[k] = v - b if v >= b else v
    return out


def add(into: dict[Series, float], samples: dict[Series, float]) -> dict[Series, float]:
    for k, v in samples.items():
        into[k] = into.get(k, 0.0) + v
    return into


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative bucket counts (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for ub in bounds:
        count = buckets[ub]
        if count >= rank:
            if math.isinf(ub):
                return lower                              # in the +Inf bucket: the highest finite bound
            if count == below:
                return ub
            return lower + (ub - lower) * (rank - below) / (count - below)
        lower, below = ub, count
    return lower


def pool_totals(samples: dict[Series, float]) -> dict[str, dict[str, Any]]:
    acc: dict[str, dict[str, Any]] = {}

    def pool(name: str) -> dict[str, Any]:
        return acc.setdefault(name, {"served": 0.0, "served_5xx": 0.0, "failed": 0.0, "stream": 0.0,
                                     "ttft": {}, "ttlt": {}})

    for (name, labels), v in samples.items():
        lab = dict(labels)
        p = lab.get("pool")
        if not p:
            continue
        t = pool(p)
        if name == "infermesh_requests_total":
            t["served"] += v
            if lab.get("status_class") == "5xx":
                t["served_5xx"] += v
        elif name == "infermesh_upstream_errors_total":
            cls = lab.get("error_class", "")
            if cls.startswith("stream_"):
                t["stream"] += v
            elif cls not in NOT_ATTEMPT_FAILURES:
                t["failed"] += v
        else:
            key = "ttft" if name.startswith("infermesh_ttft") else "ttlt"
            le = float(lab.get("le", "inf").replace("+Inf", "inf"))
            t[key][le] = t[key].get(le, 0.0) + v
    return acc


def side_from_totals(pool: str, t: dict[str, Any] | None) -> Side:
    if not t:
        return Side(pool)
    attempts = t["served"] - max(0.0, t["served_5xx"] - t["stream"]) + t["failed"]
    errors = t["failed"] + t["stream"]

    def p95(key: str) -> float | None:
        q = histogram_quantile(0.95, t[key])
        return None if q is None else round(q * 1000, 3)

    samples = max(t["ttft"].values(), default=0.0)
    return Side(pool, attempts=round(attempts), errors=round(errors), latency_samples=round(samples),
                ttft_p95_ms=p95("ttft"), ttlt_p95_ms=p95("ttlt"))


def fleet_sides(samples: dict[Series, float], pool: str) -> tuple[Side, Side]:
    """(canary, baseline) for base pool ``pool`` from samples summed over every gateway replica."""
    totals = pool_totals(samples)
    name = f"{pool}-canary"
    return side_from_totals(name, totals.get(name)), side_from_totals(pool, totals.get(pool))


def unreachable(pool: str, detail: str) -> Decision:
    """Evaluation that cannot read the SLIs ends the canary: nobody can tell it is healthy."""
    reason = f"cannot read the canary's SLIs ({detail}); a canary nobody can measure is rolled back"
    return Decision("rollback", reason, Side(f"{pool}-canary"), Side(pool),
                    [{"check": "slis", "result": "fail", "detail": detail}])
