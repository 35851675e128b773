"""Per-pool SLIs over a recent window: what a canary is judged on (`GET /admin/sli?window=600`).

Two sources:

- the usage ledger: one row per request, naming the pool that finally served it;
- ``AttemptLog``: the upstream attempts that failed *before the first byte* and were retried on
  another endpoint (the proxy reports each one). The ledger cannot show them: the client got an
  answer from another pool, so the row names that pool. Without them a canary that fails 30% of
  its attempts would look perfect while a healthy baseline absorbs its failures as retries.

Per pool, over the window:

- ``requests``: ledger rows served (finally) by the pool; ``errors_5xx``: those with a 5xx;
- ``attempts``: upstream attempts the pool received = rows it answered (any status except the
  retry-exhausted 5xx, whose last failed attempt is already in the attempt log) + failed attempts;
- ``errors``: failed attempts (connect, timeout, reset, 5xx, 429 before the first byte) + streams
  the pool broke after the first byte (stream_interrupted, idle_timeout, upstream_error_event);
- ``error_rate`` = errors / attempts;
- ``ttft_p50_ms``, ``ttft_p95_ms``, ``ttlt_p50_ms``, ``ttlt_p95_ms`` (nearest rank) over the pool's
  successful requests served at the first attempt (``latency_samples`` of them): a retried
  request's latency includes another pool's failure and would blur the comparison;
- ``first_at``: the time of the pool's first request in the window (a canary's comparison starts
  there: ``?since=`` asks for SLIs from a point in time instead of a window);
- ``probes``, ``probe_pass_rate``: synthetic probes in the window when the gateway runs probes
  (an object with ``window(since) -> {pool: {"passed": n, "total": n}}`` as ``gw.probe_log``),
  else null.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any


# Rows whose last attempt failed before the first byte and could not be retried further: the
# attempt is in the AttemptLog already.
EXHAUSTED = {"upstream_error", "upstream_timeout", "no_capacity"}
# Failures after the first byte: never retried, only the ledger row knows them.
STREAM_FAILURES = {"stream_interrupted", "idle_timeout", "upstream_error_event"}


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation): the value a client could have observed."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


class AttemptLog:
    """Failed upstream attempts (before the first byte), per pool, kept in memory for a while."""

    def __init__(self, max_events: int = 200_000) -> None:
        self._events: deque[tuple[float, str, str]] = deque(maxlen=max_events)

    def failed(self, pool: str, error_class: str, now: float | None = None) -> None:
        self._events.append((now if now is not None else time.time(), pool, error_class))

    def counts(self, since: float) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t, pool, cls in reversed(self._events):
            if t < since:
                break
            by = out.setdefault(pool, {})
            by[cls] = by.get(cls, 0) + 1
        return out


def pool_slis(rows: Iterable[dict[str, Any]], failed: dict[str, dict[str, int]],
              probes: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, Any]]:
    acc: dict[str, dict[str, Any]] = {}

    def pool(name: str) -> dict[str, Any]:
        return acc.setdefault(name, {"requests": 0, "errors_5xx": 0, "answered": 0, "stream_failures": 0,
                                     "ttft": [], "ttlt": [], "first_at": None})

    for r in rows:
        name = r.get("pool")
        if not name:
            continue                        # refused before routing (auth, limits, validation)
        p = pool(name)
        p["requests"] += 1
        at = r.get("created_at")
        if at is not None and (p["first_at"] is None or at < p["first_at"]):
            p["first_at"] = at
        status, error = r["status"], r.get("error")
        if status >= 500:
            p["errors_5xx"] += 1
            if error in EXHAUSTED:
                continue
            if error in STREAM_FAILURES or error is None:
                p["stream_failures"] += 1
        p["answered"] += 1
        if status == 200 and not r.get("retries"):
            if r.get("ttft_ms") is not None:
                p["ttft"].append(r["ttft_ms"])
            if r.get("ttlt_ms") is not None:
                p["ttlt"].append(r["ttlt_ms"])
    for name in failed:
        pool(name)
    for name in probes or {}:
        pool(name)
    out: dict[str, dict[str, Any]] = {}
    for name, p in sorted(acc.items()):
        f = failed.get(name, {})
        n_failed = sum(f.values())
        attempts = p["answered"] + n_failed
        errors = p["stream_failures"] + n_failed
        pr = (probes or {}).get(name)
        out[name] = {
            "requests": p["requests"], "errors_5xx": p["errors_5xx"],
            "attempts": attempts, "errors": errors, "failed_attempts": dict(sorted(f.items())),
            "error_rate": round(errors / attempts, 6) if attempts else None,
            "latency_samples": len(p["ttft"]),
            "ttft_p50_ms": _r(percentile(p["ttft"], 50)), "ttft_p95_ms": _r(percentile(p["ttft"], 95)),
            "ttlt_p50_ms": _r(percentile(p["ttlt"], 50)), "ttlt_p95_ms": _r(percentile(p["ttlt"], 95)),
            "first_at": p["first_at"],
            "probes": pr["total"] if pr else None,
            "probe_pass_rate": round(pr["passed"] / pr["total"], 6) if pr and pr["total"] else None,
        }
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def report(rows: list[dict[str, Any]], attempts: AttemptLog, window_s: float, now: float,
           probe_log: Any = None) -> dict[str, Any]:
    since = now - window_s
    probes = probe_log.window(since) if probe_log is not None else None
    return {"window_s": window_s, "since": since, "now": now, "probes_available": probes is not None,
            "pools": pool_slis(rows, attempts.counts(since), probes)}
