"""The SLO engine on hand-made ledgers, with figures checked by hand."""

from __future__ import annotations

from fleet import spec as spec_mod
from gateway import slo

SPEC = spec_mod.load("local")          # pro: availability 99.5, ttft p95 1500 ms, fee 200
T0 = 1_800_000_000 - 1_800_000_000 % 3600   # an hour boundary


def row(minute: int, status: int = 200, ttft: float = 100, tier: str = "pro", tenant: str = "t1",
        code: str | None = None) -> dict:
    return {"created_at": T0 + minute * 60 + 1, "status": status, "ttft_ms": ttft, "ttlt_ms": ttft + 50,
            "tier": tier, "tenant": tenant, "requested_model": "demo-chat", "region": "local", "error": code}


def pro(rep: dict) -> dict:
    return next(t for t in rep["tiers"] if t["tier"] == "pro")


def test_percentile_is_nearest_rank():
    assert slo.percentile([5, 1, 4, 2, 3], 50) == 3
    assert slo.percentile(list(range(1, 101)), 95) == 95
    assert slo.percentile(list(range(1, 101)), 99) == 99
    assert slo.percentile([], 95) is None


def test_interval_is_bad_on_5xx_or_slow_ttft_and_ignores_own_quota_429s():
    rows = [row(m) for m in range(200)]                          # 200 good minutes
    rows += [row(0, status=502)]                                  # minute 0 bad: a 5xx
    rows += [row(1, ttft=5000) for _ in range(3)]                 # minute 1 bad: p95 TTFT 5000 > 1500
    rows += [row(2, status=429, code="rate_limit_exceeded")]      # over own quota: not counted
    rows += [row(3, status=499)]                                  # client gone: not counted
    t = pro(slo.report(rows, SPEC, now=T0 + 200 * 60))
    assert t["intervals"] == 200 and t["good_intervals"] == 198
    assert t["requests_5xx"] == 1 and t["requests_shed"] == 0
    # the gateway's own load shedding is the service's refusal: it makes minute 4 bad
    shed = pro(slo.report(rows + [row(4, status=429, code="overloaded")], SPEC, now=T0 + 200 * 60))
    assert shed["good_intervals"] == 197 and shed["requests_shed"] == 1 and shed["requests_5xx"] == 1
    assert t["availability"] == 99.0
    # 0.5 % below 99.5 -> 5 steps of 0.1 % -> 25 %, the cap
    assert t["credit_percent"] == 25.0
    assert t["credits"] == {"t1": 50.0}                           # 25 % of the 200 fee
    # budget: allowed 0.5 % bad, spent 1 % -> -100 % left
    assert abs(t["error_budget_left"] - (-1.0)) < 1e-9


def test_credit_steps_and_ttft_breach():
    assert slo.credit_percent(99.45, 99.5, 0) == 0.0              # less than one full 0.1 % step
    assert slo.credit_percent(99.4, 99.5, 0) == 5.0
    assert slo.credit_percent(99.2, 99.5, 0) == 15.0
    assert slo.credit_percent(None, 99.5, 3) == 5.0
    assert slo.credit_percent(99.9, 99.5, 2) == 0.0
    assert slo.credit_percent(90.0, 99.5, 5) == 25.0


def test_three_consecutive_slow_hours_earn_the_ttft_credit():
    slow = [row(60 * h + m, ttft=3000) for h in range(3) for m in range(0, 60, 10)]
    t = pro(slo.report(slow, SPEC, now=T0 + 4 * 3600))
    assert t["ttft_breach_hours"] == 3
    gap = [r for r in slow if not (3600 <= r["created_at"] - T0 < 7200)] + \
          [row(60 + m, ttft=10) for m in range(0, 60, 10)]
    assert pro(slo.report(gap, SPEC, now=T0 + 4 * 3600))["ttft_breach_hours"] == 1


def test_burn_rate_windows():
    rows = [row(m) for m in range(360)] + [row(359, status=500)]
    t = pro(slo.report(rows, SPEC, now=T0 + 360 * 60))
    # 1h window: minutes 300..359 -> 60 intervals, 1 bad -> (1/60)/0.005
    assert abs(t["burn_rate"]["1h"] - (1 / 60) / 0.005) < 1e-9
    assert abs(t["burn_rate"]["6h"] - (1 / 360) / 0.005) < 1e-9
