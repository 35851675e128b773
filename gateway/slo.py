"""SLO truth, computed from the usage ledger (one record per request, written by the gateway).

Definitions (the SLA addendum's, stated once here and in the README):
- Requests are grouped into one-minute intervals per tier, model and region.
- An interval is *good* when it had no 5xx and its p95 TTFT is within the tier's TTFT SLO.
  429s for a tenant over its own limits (code rate_limit_exceeded) and requests the client
  abandoned (499) do not count against availability; other 4xx are the client's and do not count,
  except the gateway's own load shedding (429, code ``overloaded``): that refusal is the
  service's, so it makes an interval bad like a 5xx.
- Availability = good intervals / intervals with traffic, per tier.
- Error budget: the bad share the SLO allows (1 - availability SLO). Burn rate over a window =
  bad share in the window / allowed share (1.0 spends the budget exactly over the period).
- Credits per tier: 5% of the monthly fee per full 0.1% of availability below the SLA, capped at
  25%; plus 5% when p95 TTFT exceeded the SLO for three consecutive hours. The total is capped at 25%.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from fleet.spec import Spec, Tier

CREDIT_PER_STEP = 5.0        # percent of the monthly fee per 0.1% below the SLA
CREDIT_CAP = 25.0
TTFT_BREACH_CREDIT = 5.0
TTFT_BREACH_HOURS = 3


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation): the value a client could have observed."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def shed(row: dict[str, Any]) -> bool:
    return row["status"] == 429 and row.get("error") == "overloaded"


def counts_against(row: dict[str, Any]) -> bool:
    return row["status"] >= 500 or shed(row)


def ignored(row: dict[str, Any]) -> bool:
    """Rows that do not take part in availability at all."""
    return row["status"] == 499 or (400 <= row["status"] < 500 and not shed(row))


def intervals(rows: Iterable[dict[str, Any]], tier: Tier) -> dict[tuple[str, str, int], bool]:
    """(model, region, minute) -> good?, for one tier's rows."""
    grouped: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in rows:
        if r["tier"] != tier.name or ignored(r):
            continue
        grouped[(r["requested_model"], r["region"] or "", int(r["created_at"] // 60))].append(r)
    out = {}
    for key, rs in grouped.items():
        ttfts = [r["ttft_ms"] for r in rs if r["status"] == 200 and r["ttft_ms"] is not None]
        p95 = percentile(ttfts, 95)
        out[key] = not any(counts_against(r) for r in rs) and (p95 is None or p95 <= tier.slo.ttft_p95_ms)
    return out


def _burn(ivs: dict[tuple[str, str, int], bool], since_minute: int, allowed: float) -> float | None:
    window = [good for (_, _, minute), good in ivs.items() if minute >= since_minute]
    if not window or allowed <= 0:
        return None
    return (window.count(False) / len(window)) / allowed


def _ttft_breach_hours(rows: list[dict], tier: Tier) -> int:
    """The longest run of consecutive hours whose p95 TTFT exceeded the tier's SLO."""
    by_hour: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r["tier"] == tier.name and r["status"] == 200 and r["ttft_ms"] is not None:
            by_hour[int(r["created_at"] // 3600)].append(r["ttft_ms"])
    longest = run = 0
    prev = None
    for hour in sorted(by_hour):
        breached = percentile(by_hour[hour], 95) > tier.slo.ttft_p95_ms
        run = (run + 1 if prev == hour - 1 and run else 1) if breached else 0
        longest = max(longest, run)
        prev = hour
    return longest


def credit_percent(availability: float | None, slo_availability: float, ttft_breach_hours: int) -> float:
    credit = 0.0
    if availability is not None and availability < slo_availability:
        steps = math.floor(round((slo_availability - availability) / 0.1, 9))
        credit += min(CREDIT_CAP, steps * CREDIT_PER_STEP)
    if ttft_breach_hours >= TTFT_BREACH_HOURS:
        credit += TTFT_BREACH_CREDIT
    return min(CREDIT_CAP, credit)


def report(rows: list[dict[str, Any]], spec: Spec, now: float | None = None) -> dict[str, Any]:
    now = now or time.time()
    minute_now = int(now // 60)
    tiers = []
    for tier in spec.tiers:
        ivs = intervals(rows, tier)
        mine = [r for r in rows if r["tier"] == tier.name]
        ok = [r for r in mine if r["status"] == 200]
        ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
        ttlt = [r["ttlt_ms"] for r in ok if r["ttlt_ms"] is not None]
        good = sum(ivs.values())
        availability = 100.0 * good / len(ivs) if ivs else None
        allowed = 1 - tier.slo.availability / 100
        bad_share = (len(ivs) - good) / len(ivs) if ivs else 0.0
        breach = _ttft_breach_hours(rows, tier)
        credit = credit_percent(availability, tier.slo.availability, breach)
        tenants = sorted({r["tenant"] for r in mine})
        tiers.append({
            "tier": tier.name,
            "slo": tier.slo.model_dump(),
            "requests": len(mine),
            "requests_5xx": sum(1 for r in mine if r["status"] >= 500),
            "requests_shed": sum(1 for r in mine if shed(r)),
            "intervals": len(ivs),
            "good_intervals": good,
            "availability": availability,
            "ttft_ms": {f"p{p}": percentile(ttft, p) for p in (50, 95, 99)},
            "ttlt_ms": {f"p{p}": percentile(ttlt, p) for p in (50, 95, 99)},
            "error_budget_left": None if not ivs or allowed <= 0 else 1 - bad_share / allowed,
            "burn_rate": {"1h": _burn(ivs, minute_now - 60, allowed), "6h": _burn(ivs, minute_now - 360, allowed)},
            "ttft_breach_hours": breach,
            "credit_percent": credit,
            "credits": {t: round(tier.monthly_fee * credit / 100, 2) for t in tenants},
            "bad_intervals": sorted(f"{m}@{reg or '-'} {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime(mi * 60))}"
                                    for (m, reg, mi), g in ivs.items() if not g),
        })
    return {"stack": spec.stack, "generated_at": now, "tiers": tiers}
