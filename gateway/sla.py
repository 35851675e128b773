"""The SLA's truth: its definitions, the per-minute rollups they are computed from, and the
reports (per customer, per calendar month, per region, the credits statement, the status page).

Definitions, as the seeds' SLA addendum (001 template, 002 copy-paste addendum) writes them:

- *Interval.* One minute (UTC). A customer's interval is **bad** when it holds one of that
  customer's requests that failed because of the service: a 5xx, or the gateway's own load
  shedding (429 with code ``overloaded``), or a stream whose time to first token exceeded
  ``TTFT_BOUND_MS`` (the addendum: "no 5xx and TTFT < 5 s"). A 429 of the customer's own
  limits, any other 4xx and a request the client abandoned (499) never count against it.
  A minute in which every synthetic probe of a model failed (the service was down for it) is
  bad for every customer who used that model in the period, whether or not they called in
  that minute.
- *Availability* = (minutes in the period - bad minutes) / minutes in the period. The period is
  a calendar month (``--month``) or any window; a month not over yet counts its minutes so far
  and is marked provisional. Minutes in which the gateway recorded nothing at all (no request
  and no probe: it was down, or its ledger was) are reported as ``no_data_minutes``; they are
  not counted bad unless probes (of a replica that was up) saw the service down.
- *TTFT* is a stream's first content event. A non-stream answer has no TTFT: it is judged on
  *TTLT normalised to the tier's token budget* (``slo.ttlt_tokens``, 256 by default): its total
  time x budget / completion tokens, for answers of at least a quarter of the budget (shorter
  ones are all prefill and say nothing about generation speed). Streams are judged on both.
- *p95 TTFT over the SLO* (the latency credit) is decided per hour, exactly: with n streams of
  which k took longer than the tier's ``slo.ttft_p95_ms``, the nearest-rank p95 is over the SLO
  iff n - k < ceil(0.95 n). The rollups count k per tier threshold, so no histogram error enters
  a credit. Percentiles *shown* (p50/p95/p99) come from fixed buckets (``TTFT_EDGES_MS``,
  ``TTLT_EDGES_MS``): the true value lies in the reported bucket (lo, hi]; the error is at most
  the bucket's width.
- *5xx rate* = requests failed by the service / requests the service was responsible for
  (all but client errors and abandoned ones), per month, against ``slo.max_5xx_pct`` (0.2%).
- *Error budget* = (1 - availability SLO) x minutes in the period, in minutes; spent = bad
  minutes; left = budget - spent (negative when overspent).
- *Credits*, per customer, from that customer's own requests: 5% of the tier's monthly fee per
  full 0.1% of availability below the SLA, plus 5% when its p95 TTFT exceeded the SLO for at
  least 3 consecutive hours; at most 25% in all. Amounts in integer cents.
- *Exclusions* (the stack file's ``sla:``): bad minutes inside scheduled maintenance announced at
  least ``MAINTENANCE_NOTICE_H`` hours ahead, up to ``MAINTENANCE_MAX_MIN`` minutes per calendar
  month (the earliest windows first; the rest counts), and inside the addendum's other exclusions
  (force majeure for everyone, a customer's misuse for that customer) do not count. The customer's
  own-quota 429s, requests over its tier's limits (4xx) and its network (499) never counted.
  The report lists each window applied, and the maintenance that did not qualify with the reason.

Rollups, not rows: every gateway process aggregates its own ledger (gateway/ledger.py, the
spool when the ledger is PostgreSQL) into one row per (minute, tenant, tier, model, region)
with counts by class, threshold counts and cumulative bucket counts, all additive, and upserts
them into ``usage_minute`` of the ledger backend (the local ledger.db, or PostgreSQL shared by
the replicas), together with its high-water mark in the same transaction, so every row is
counted exactly once, late rows (a spool replayed after an outage) included. A month of prod
is read with a few GROUP BY queries (bench/slo_month.py has the figures).
"""

from __future__ import annotations

import calendar
import math
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fleet.spec import Spec, Tier

TTFT_BOUND_MS = 5000.0         # the addendum's per-interval TTFT bound
MIN_TTLT_SHARE = 0.25          # answers shorter than this share of the token budget: no TTLT sample
CREDIT_PER_STEP = 5.0          # percent of the monthly fee per full 0.1% below the SLA
CREDIT_CAP = 25.0
TTFT_BREACH_CREDIT = 5.0
TTFT_BREACH_HOURS = 3
TTFT_EDGES_MS = (100, 250, 500, 1000, 1500, 2000, 3000, 5000, 10000)
TTLT_EDGES_MS = (1000, 2000, 4000, 8000, 15000, 30000, 60000)
STATUS_DAYS = 90
MAINTENANCE_NOTICE_H = 48
MAINTENANCE_MAX_MIN = 60
CHUNK = 20_000                 # ledger rows rolled up per transaction

_KEY = ("minute", "tenant", "tier", "model", "region")
_COUNTS = ("requests", "ok", "service_errors", "client_errors", "gone", "streams", "ttft_over_bound",
           "ttft_over_slo", "ttlt_samples", "ttlt_over_slo", "prompt_tokens", "cached_tokens", "completion_tokens",
           *(f"ttft_le_{e}" for e in TTFT_EDGES_MS), *(f"ttlt_le_{e}" for e in TTLT_EDGES_MS))
ROLLUP_COLUMNS = (*_KEY, *_COUNTS)
BAD = "(service_errors > 0 OR ttft_over_bound > 0)"    # a bad row makes its minute bad (counts are never negative)

SQLITE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS usage_minute (
    minute INTEGER NOT NULL, tenant TEXT NOT NULL, tier TEXT NOT NULL, model TEXT NOT NULL, region TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in _COUNTS)},
    PRIMARY KEY (minute, tenant, tier, model, region)
);
CREATE INDEX IF NOT EXISTS usage_minute_bad ON usage_minute(minute) WHERE {BAD};
CREATE TABLE IF NOT EXISTS usage_hour (
    hour INTEGER NOT NULL, tenant TEXT NOT NULL, tier TEXT NOT NULL, model TEXT NOT NULL, region TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in _COUNTS)},
    PRIMARY KEY (hour, tenant, tier, model, region)
);
CREATE TABLE IF NOT EXISTS minute_seen (minute INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS probe_minute (
    minute INTEGER NOT NULL, model TEXT NOT NULL, region TEXT NOT NULL,
    probes INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, model, region)
);
CREATE TABLE IF NOT EXISTS rollup_marks (instance_id TEXT PRIMARY KEY, upto INTEGER NOT NULL);
"""


class SlaError(ValueError):
    """A report asked for something that cannot be answered (one line, for the CLI)."""


# ---- rollups -------------------------------------------------------------------------------------


def _lit(name: str) -> str:
    """A stack name as an SQL string literal (names are [a-z0-9._/-], checked by fleet.spec)."""
    return "'" + name.replace("'", "''") + "'"


def aggregate_sql(spec: Spec) -> str:
    """The SELECT that turns ledger rows with id in (?, ?] into rollup rows (run by SQLite, on
    the gateway's own ledger or spool). Thresholds that differ per tier (its TTFT and TTLT SLOs,
    its token budget) are CASE expressions over the row's tier: each row is judged by its own
    tier's contract. Made-up model names are rolled up as 'unknown'."""
    def per_tier(value: Callable[[Tier], float]) -> str:
        cases = " ".join(f"WHEN {_lit(t.name)} THEN {float(value(t))!r}" for t in spec.tiers)
        return f"(CASE tier {cases} ELSE 1e18 END)"

    shed = "(status = 429 AND coalesce(error, '') = 'overloaded')"
    stream_ok = "(status = 200 AND stream AND ttft_ms IS NOT NULL)"
    budget = per_tier(lambda t: t.slo.ttlt_tokens)
    ttlt_ok = f"(status = 200 AND ttlt_ms IS NOT NULL AND completion_tokens >= {budget} * {MIN_TTLT_SHARE})"
    norm = f"(ttlt_ms * {budget} / max(completion_tokens, 1))"
    models = ", ".join(_lit(m.id) for m in spec.models)
    cols = [
        "CAST(created_at / 60 AS INTEGER)", "tenant", "tier",
        f"CASE WHEN requested_model IN ({models}) THEN requested_model ELSE 'unknown' END",
        "coalesce(region, '')",
        "count(*)", "sum(status = 200)", f"sum(status >= 500 OR {shed})",
        f"sum(status >= 400 AND status < 500 AND status != 499 AND NOT {shed})", "sum(status = 499)",
        f"sum({stream_ok})", f"sum({stream_ok} AND ttft_ms > {TTFT_BOUND_MS})",
        f"sum({stream_ok} AND ttft_ms > {per_tier(lambda t: t.slo.ttft_p95_ms)})",
        f"sum({ttlt_ok})", f"sum({ttlt_ok} AND {norm} > {per_tier(lambda t: t.slo.ttlt_p95_ms)})",
        "sum(prompt_tokens)", "sum(cached_tokens)", "sum(completion_tokens)",
        *(f"sum({stream_ok} AND ttft_ms <= {e})" for e in TTFT_EDGES_MS),
        *(f"sum({ttlt_ok} AND {norm} <= {e})" for e in TTLT_EDGES_MS),
    ]
    return f"SELECT {', '.join(cols)} FROM usage WHERE id > ? AND id <= ? GROUP BY 1, 2, 3, 4, 5"


def minute_of(t: float) -> int:
    return int(t // 60)


_UPSERT_USAGE = (f"INSERT INTO usage_minute ({', '.join(ROLLUP_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(ROLLUP_COLUMNS))}) "
                 f"ON CONFLICT (minute, tenant, tier, model, region) DO UPDATE SET "
                 + ", ".join(f"{c} = usage_minute.{c} + excluded.{c}" for c in _COUNTS))
_UPSERT_HOUR = (f"INSERT INTO usage_hour (hour, {', '.join(ROLLUP_COLUMNS[1:])}) "
                f"VALUES ({', '.join('?' * len(ROLLUP_COLUMNS))}) "
                f"ON CONFLICT (hour, tenant, tier, model, region) DO UPDATE SET "
                + ", ".join(f"{c} = usage_hour.{c} + excluded.{c}" for c in _COUNTS))
_UPSERT_SEEN = "INSERT INTO minute_seen (minute) VALUES (?) ON CONFLICT (minute) DO NOTHING"
_UPSERT_PROBE = ("INSERT INTO probe_minute (minute, model, region, probes, failed) VALUES (?, ?, ?, ?, ?) "
                 "ON CONFLICT (minute, model, region) DO UPDATE SET probes = probe_minute.probes + excluded.probes, "
                 "failed = probe_minute.failed + excluded.failed")
_UPSERT_MARK = ("INSERT INTO rollup_marks (instance_id, upto) VALUES (?, ?) "
                "ON CONFLICT (instance_id) DO UPDATE SET upto = excluded.upto")


Compute = Callable[[int], tuple[int, list[tuple], list[tuple]]]   # mark -> (new mark, usage rows, probe rows)


def _derived(rows: list[tuple], probes: list[tuple]) -> tuple[list[tuple], list[tuple]]:
    """The hourly rows and the minutes seen that go with a batch of minute rows: reports sum
    hours (60 times fewer rows) and count seen minutes, and read minutes only where one is bad."""
    hours: dict[tuple, list[int]] = {}
    for r in rows:
        key = (r[0] // 60, *r[1:5])
        acc = hours.get(key)
        if acc is None:
            hours[key] = list(r[5:])
        else:
            for i, v in enumerate(r[5:]):
                acc[i] += v
    seen = {r[0] for r in rows} | {p[0] for p in probes}
    return [(*k, *v) for k, v in hours.items()], [(m,) for m in sorted(seen)]


class SqliteTarget:
    """Rollups in a SQLite file (the one-replica stack: its own ledger.db)."""

    def __init__(self, path) -> None:
        self.path = path

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        conn.executescript(SQLITE_SCHEMA)
        return conn

    def roll(self, instance_id: str, compute: Compute) -> None:
        """Read the mark, compute and write under the file's write lock: two rollups of one
        spool (the gateway's, the CLI's) never count a row twice."""
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT upto FROM rollup_marks WHERE instance_id = ?", (instance_id,)).fetchone()
            upto, rows, probes = compute(row[0] if row else 0)
            hours, seen = _derived(rows, probes)
            conn.executemany(_UPSERT_USAGE, rows)
            conn.executemany(_UPSERT_HOUR, hours)
            conn.executemany(_UPSERT_SEEN, seen)
            conn.executemany(_UPSERT_PROBE, probes)
            conn.execute(_UPSERT_MARK, (instance_id, upto))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        conn = self.connect()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


class PgTarget:
    """Rollups in PostgreSQL, shared by the replicas (gateway/state/migrations/0004_rollups.sql)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def _connect(self):
        import psycopg
        return psycopg.connect(self.dsn, connect_timeout=5)

    def roll(self, instance_id: str, compute: Compute) -> None:
        with self._connect() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (instance_id,))
            row = cur.execute("SELECT upto FROM rollup_marks WHERE instance_id = %s", (instance_id,)).fetchone()
            upto, rows, probes = compute(row[0] if row else 0)
            hours, seen = _derived(rows, probes)
            cur.executemany(_pg(_UPSERT_USAGE), rows)
            cur.executemany(_pg(_UPSERT_HOUR), hours)
            cur.executemany(_pg(_UPSERT_SEEN), seen)
            cur.executemany(_pg(_UPSERT_PROBE), probes)
            cur.execute(_pg(_UPSERT_MARK), (instance_id, upto))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows as SQLite gives them: PostgreSQL's sum() of bigints is numeric (Decimal): made int."""
        from decimal import Decimal
        with self._connect() as conn:
            return [tuple(int(v) if isinstance(v, Decimal) else v for v in row)
                    for row in conn.execute(_pg(sql), params).fetchall()]


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class Rollup:
    """One gateway process's rollups: its ledger (or spool) rows above the high-water mark,
    aggregated by SQLite, plus the probe outcomes since the last run, written to the target in
    one transaction with the new mark. Runs in a thread (Gateway._rollup_loop); a failed run
    changes nothing and keeps its probe outcomes for the next one."""

    def __init__(self, spec: Spec, spool, target: SqliteTarget | PgTarget, instance_id: str) -> None:
        self.spool, self.target, self.instance_id = spool, target, instance_id
        self.sql = aggregate_sql(spec)
        self._probes: list[tuple[float, str, str, bool]] = []

    def probe(self, at: float, model: str, region: str, passed: bool) -> None:
        self._probes.append((at, model, region, passed))

    def run_once(self) -> int:
        """Roll up what is new, CHUNK rows per transaction (the gateway's own commits wait while
        one holds SQLite's write lock); returns how many ledger rows it covered."""
        total = 0
        while True:
            n = self._run_chunk()
            total += n
            if n < CHUNK:
                return total

    def _run_chunk(self) -> int:
        probes, self._probes = self._probes, []
        covered = 0

        def compute(after: int) -> tuple[int, list[tuple], list[tuple]]:
            nonlocal covered
            conn = sqlite3.connect(self.spool, timeout=10)
            try:
                upto = min(conn.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()[0], after + CHUNK)
                rows = conn.execute(self.sql, (after, upto)).fetchall() if upto > after else []
            finally:
                conn.close()
            counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
            for at, model, region, passed in probes:
                c = counts[(minute_of(at), model, region)]
                c[0] += 1
                c[1] += not passed
            covered = max(0, upto - after)
            return max(upto, after), rows, [(*k, n, f) for k, (n, f) in counts.items()]

        try:
            self.target.roll(self.instance_id, compute)
        except BaseException:
            self._probes[:0] = probes
            raise
        return covered


# ---- periods -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    start: int                  # first minute (unix minutes)
    end: int                    # minute after the last
    label: str
    provisional: bool           # not over yet: the minutes so far

    @property
    def minutes(self) -> int:
        return self.end - self.start

    def view(self) -> dict[str, Any]:
        return {"label": self.label, "start": _iso(self.start), "end": _iso(self.end), "minutes": self.minutes,
                "provisional": self.provisional}


def month_period(text: str, now: float | None = None) -> Period:
    """A calendar month, YYYY-MM (UTC). The current month is provisional (its minutes so far);
    a future one is refused."""
    now = time.time() if now is None else now
    try:
        if len(text) != 7 or not text.isascii():
            raise ValueError
        year, month = int(text[:4]), int(text[5:7])
        if text[4] != "-" or not 1 <= month <= 12 or year < 1970:
            raise ValueError
    except ValueError:
        raise SlaError(f"--month {text!r}: give a calendar month as YYYY-MM, e.g. 2026-11") from None
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    days = calendar.monthrange(year, month)[1]
    end = start + days * 86400
    if start > now:
        raise SlaError(f"--month {text}: that month has not begun (it is {_iso(minute_of(now))} UTC)")
    provisional = end > now
    return Period(start // 60, (minute_of(now) + 1 if provisional else end // 60), text, provisional)


def window_period(since: float, until: float | None, now: float | None = None) -> Period:
    now = time.time() if now is None else now
    provisional = until is None or until > now            # up to now: the current minute so far counts
    until = now if until is None else until
    if until <= since:
        raise SlaError("--until must be after --since")
    if since > now:
        raise SlaError("--since is in the future")
    end = minute_of(now) + 1 if provisional else minute_of(until)
    return Period(minute_of(since), max(end, minute_of(since) + 1), f"{_iso(minute_of(since))}..{_iso(end)}",
                  provisional)


def _iso(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


# ---- reports ---------------------------------------------------------------------------------------

Query = Callable[[str, Sequence[Any]], list[tuple]]


def credit_percent(availability: float | None, slo_availability: float, ttft_breach_hours: int) -> float:
    credit = 0.0
    if availability is not None and availability < slo_availability:
        steps = math.floor(round((slo_availability - availability) / 0.1, 9))
        credit += min(CREDIT_CAP, steps * CREDIT_PER_STEP)
    if ttft_breach_hours >= TTFT_BREACH_HOURS:
        credit += TTFT_BREACH_CREDIT
    return min(CREDIT_CAP, credit)


def p95_over(n: int, over: int) -> bool:
    """Whether the nearest-rank p95 of n samples, `over` of them above a threshold, is above it."""
    return n > 0 and n - over < math.ceil(0.95 * n)


def longest_breach(hours: Iterable[tuple[int, int, int]]) -> int:
    """The longest run of consecutive hours (hour, streams, over the SLO) whose p95 was over."""
    longest = run = 0
    prev = None
    for hour, n, over in sorted(hours):
        if p95_over(n, over):
            run = run + 1 if prev == hour - 1 and run else 1
        else:
            run = 0
        prev = hour
        longest = max(longest, run)
    return longest


def bucket_percentile(n: int, cumulative: Sequence[int], edges: Sequence[int], p: float) -> dict | None:
    """The bucket (gt, le] that holds the nearest-rank p-th percentile, from cumulative counts."""
    if n <= 0:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    lo = 0
    for edge, count in zip(edges, cumulative, strict=True):
        if count >= rank:
            return {"gt": lo, "le": edge}
        lo = edge
    return {"gt": lo, "le": None}


def ranges(minutes: Iterable[int]) -> list[list[str]]:
    """Consecutive minutes as [first, end) ranges of ISO times."""
    out: list[list[int]] = []
    for m in sorted(minutes):
        if out and out[-1][1] == m:
            out[-1][1] = m + 1
        else:
            out.append([m, m + 1])
    return [[_iso(a), _iso(b)] for a, b in out]


_SUMS = ", ".join(f"sum({c})" for c in _COUNTS)
_COLS = ", ".join(_COUNTS)


def _source(period: Period, tenant: str | None) -> tuple[str, list[Any]]:
    """A FROM clause over the period at hour granularity: usage_hour for the whole hours inside
    it, usage_minute for the minutes at its edges (a window need not start on the hour)."""
    only = " AND tenant = ?" if tenant else ""
    extra = [tenant] if tenant else []
    h0, h1 = -(-period.start // 60), period.end // 60
    if h0 >= h1:
        return (f"(SELECT minute / 60 AS h, tenant, tier, model, region, {_COLS} FROM usage_minute "
                f"WHERE minute >= ? AND minute < ?{only}) AS src", [period.start, period.end, *extra])
    sql = (f"(SELECT hour AS h, tenant, tier, model, region, {_COLS} FROM usage_hour "
           f"WHERE hour >= ? AND hour < ?{only} "
           f"UNION ALL SELECT minute / 60 AS h, tenant, tier, model, region, {_COLS} FROM usage_minute "
           f"WHERE ((minute >= ? AND minute < ?) OR (minute >= ? AND minute < ?)){only}) AS src")
    return sql, [h0, h1, *extra, period.start, h0 * 60, h1 * 60, period.end, *extra]


def report(q: Query, spec: Spec, period: Period, tenant: str | None = None) -> dict[str, Any]:
    """Per customer (tenant and tier): availability over the period's minutes, its bad minutes,
    budget, 5xx rate, latency and the credit; per region; per model and region (no tenants).
    Sums come from hourly rows; minutes are read only where one was bad (a partial index)."""
    tiers = {t.name: t for t in spec.tiers}
    span = [period.start, period.end]
    src, args = _source(period, tenant)
    per: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(_COUNTS))   # (tenant, tier) -> sums
    by_model: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * len(_COUNTS))  # (model, region)
    used = defaultdict(set)                                # tenant -> {(model, region)}
    for t, tier_name, model, region, *sums in q(
            f"SELECT tenant, tier, model, region, {_SUMS} FROM {src} GROUP BY tenant, tier, model, region", args):
        for acc in (per[(t, tier_name)], by_model[(model, region)]):
            for i, v in enumerate(sums):
                acc[i] += v or 0
        used[t].add((model, region))
    if tenant and not per:
        raise SlaError(f"tenant {tenant!r} made no requests from {_iso(period.start)} to {_iso(period.end)} "
                       "(`infermesh keys list` shows the tenants)")
    hours = defaultdict(list)
    for t, h, n, over in q(f"SELECT tenant, h, sum(streams), sum(ttft_over_slo) FROM {src} GROUP BY tenant, h", args):
        hours[t].append((h, n or 0, over or 0))
    only = " AND tenant = ?" if tenant else ""
    bad = defaultdict(set)
    model_bad = defaultdict(set)
    for t, model, region, m in q(f"SELECT tenant, model, region, minute FROM usage_minute WHERE {BAD} "
                                 f"AND minute >= ? AND minute < ?{only}", [*span, *([tenant] if tenant else [])]):
        bad[(t, region)].add(m)
        model_bad[(model, region)].add(m)
    down = _down(q, span)
    seen = q("SELECT count(*) FROM minute_seen WHERE minute >= ? AND minute < ?", span)[0][0]
    excluded, excluded_for, applied = exclusions(spec, period)
    customers = []
    for (name, tier_name), sums in sorted(per.items()):
        c = dict(zip(_COUNTS, sums, strict=True))
        regions = sorted({r for (t, r) in bad if t == name} | {r for _, r in used[name]})
        bad_by_region = {}
        for r in regions:
            mins = set(bad.get((name, r), ()))
            for model, reg in used[name]:
                if reg == r:
                    mins |= down.get((model, reg), set())
            bad_by_region[r] = mins - excluded - excluded_for.get(name, set())
        all_bad = set().union(*bad_by_region.values()) if bad_by_region else set()
        customers.append(_customer(name, tier_name, tiers.get(tier_name), c, all_bad, bad_by_region, hours[name],
                                   period))
    models = []
    if not tenant:
        for (model, region), sums in sorted(by_model.items()):
            c = dict(zip(_COUNTS, sums, strict=True))
            mins = model_bad[(model, region)] | down.get((model, region), set())
            models.append({"model": model, "region": region, "requests": c["requests"],
                           "service_errors": c["service_errors"], "bad_minutes": len(mins),
                           "availability_pct": 100.0 * (period.minutes - len(mins)) / period.minutes,
                           "ttft_ms": {f"p{p}": bucket_percentile(c["streams"], [c[f"ttft_le_{e}"]
                                                                                 for e in TTFT_EDGES_MS],
                                                                  TTFT_EDGES_MS, p) for p in (50, 95, 99)}})
    return {"stack": spec.stack, "period": period.view(), "no_data_minutes": period.minutes - seen,
            "definitions": "gateway/sla.py", "exclusions": applied, "customers": customers, "models": models}


def exclusions(spec: Spec, period: Period) -> tuple[set[int], dict[str, set[int]], list[dict[str, Any]]]:
    """(minutes excluded for every customer, minutes excluded per tenant, what was applied and what
    was not) inside the period, from the stack's ``sla:`` block (see the module's text)."""
    everyone: set[int] = set()
    per_tenant: dict[str, set[int]] = defaultdict(set)
    applied: list[dict[str, Any]] = []

    def minutes(w) -> range:
        a, b = minute_of(w.start.timestamp()), -(-int(w.end.timestamp()) // 60)
        return range(max(a, period.start), min(b, period.end))

    used_by_month: dict[tuple[int, int], int] = defaultdict(int)
    for w in sorted(spec.sla.maintenance, key=lambda w: w.start):
        view = {"kind": "maintenance", "start": w.start.isoformat(), "end": w.end.isoformat(), "reason": w.reason}
        notice = None if w.announced is None else (w.start - w.announced).total_seconds() / 3600
        if notice is None or notice < MAINTENANCE_NOTICE_H:
            applied.append({**view, "excluded_minutes": 0,
                            "why_not": f"not announced {MAINTENANCE_NOTICE_H} h ahead"})
            continue
        month = (w.start.year, w.start.month)
        span = range(minute_of(w.start.timestamp()), -(-int(w.end.timestamp()) // 60))
        allowed = max(0, MAINTENANCE_MAX_MIN - used_by_month[month])
        counted = span[:allowed]
        used_by_month[month] += len(counted)
        mins = [m for m in counted if period.start <= m < period.end]
        everyone.update(mins)
        extra = {} if len(counted) == len(span) else {
            "why_not": f"{len(span) - len(counted)} minutes over {MAINTENANCE_MAX_MIN} a month"}
        if mins or extra:
            applied.append({**view, "excluded_minutes": len(mins), **extra})
    for w in spec.sla.exclusions:
        window = set(minutes(w))
        if not window:
            continue
        (per_tenant[w.tenant] if w.tenant else everyone).update(window)
        applied.append({"kind": "misuse" if w.tenant else "exclusion", "start": w.start.isoformat(),
                        "end": w.end.isoformat(), "reason": w.reason, "excluded_minutes": len(window),
                        **({"tenant": w.tenant} if w.tenant else {})})
    return everyone, per_tenant, applied


def _down(q: Query, span: Sequence[int]) -> dict[tuple[str, str], set[int]]:
    """(model, region) -> the minutes in which every synthetic probe of it failed."""
    down = defaultdict(set)
    for model, region, m in q("SELECT model, region, minute FROM probe_minute WHERE minute >= ? AND minute < ? "
                              "GROUP BY model, region, minute HAVING sum(failed) = sum(probes) AND sum(probes) > 0",
                              span):
        down[(model, region)].add(m)
    return down


def _customer(name: str, tier_name: str, tier: Tier | None, c: dict[str, int], bad: set[int],
              bad_by_region: dict[str, set[int]], hours: list[tuple[int, int, int]], period: Period) -> dict:
    minutes = period.minutes
    slo = tier.slo if tier else None
    availability = 100.0 * (minutes - len(bad)) / minutes if minutes else None
    responsible = c["requests"] - c["client_errors"] - c["gone"]
    rate = 100.0 * c["service_errors"] / responsible if responsible else 0.0
    breach = longest_breach(hours)
    credit = credit_percent(availability, slo.availability, breach) if slo else 0.0
    fee_cents = round((tier.monthly_fee if tier else 0) * 100)
    budget = (1 - slo.availability / 100) * minutes if slo else None
    ttft = [c[f"ttft_le_{e}"] for e in TTFT_EDGES_MS]
    ttlt = [c[f"ttlt_le_{e}"] for e in TTLT_EDGES_MS]
    return {
        "tenant": name, "tier": tier_name,
        "requests": c["requests"], "ok": c["ok"], "service_errors": c["service_errors"],
        "client_errors": c["client_errors"], "abandoned": c["gone"],
        "tokens": {"input": c["prompt_tokens"], "cached_input": c["cached_tokens"], "output": c["completion_tokens"]},
        "minutes": minutes, "bad_minutes": len(bad), "bad_intervals": ranges(bad),
        "availability_pct": availability, "slo_availability_pct": slo.availability if slo else None,
        "error_budget_minutes": None if budget is None else {
            "budget": round(budget, 2), "spent": len(bad), "left": round(budget - len(bad), 2)},
        "five_xx_rate_pct": round(rate, 4), "five_xx_target_pct": slo.max_5xx_pct if slo else None,
        "ttft_ms": {f"p{p}": bucket_percentile(c["streams"], ttft, TTFT_EDGES_MS, p) for p in (50, 95, 99)},
        "ttft_p95_slo_ms": slo.ttft_p95_ms if slo else None,
        "ttft_p95_breach_hours": breach,
        "ttlt_at_budget_ms": {f"p{p}": bucket_percentile(c["ttlt_samples"], ttlt, TTLT_EDGES_MS, p)
                              for p in (50, 95, 99)},
        "ttlt_p95_met": None if not c["ttlt_samples"] or not slo else not p95_over(c["ttlt_samples"],
                                                                                   c["ttlt_over_slo"]),
        "ttlt_tokens": slo.ttlt_tokens if slo else None,
        "credit_percent": credit, "monthly_fee_cents": fee_cents,
        "credit_cents": round(fee_cents * credit / 100),
        "regions": [{"region": r, "bad_minutes": len(m), "availability_pct": 100.0 * (minutes - len(m)) / minutes,
                     "bad_intervals": ranges(m)} for r, m in sorted(bad_by_region.items())],
    }


def credits_statement(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """What a customer's finance team receives, one line per customer, from a month's report."""
    return [{"tenant": c["tenant"], "tier": c["tier"], "period": rep["period"]["label"],
             "provisional": rep["period"]["provisional"],
             "availability_pct": None if c["availability_pct"] is None else round(c["availability_pct"], 4),
             "slo_availability_pct": c["slo_availability_pct"], "bad_minutes": c["bad_minutes"],
             "ttft_p95_breach_hours": c["ttft_p95_breach_hours"], "credit_percent": c["credit_percent"],
             "monthly_fee_cents": c["monthly_fee_cents"], "credit_cents": c["credit_cents"],
             "bad_intervals": c["bad_intervals"]} for c in rep["customers"]]


def status(q: Query, spec: Spec, now: float | None = None, days: int = STATUS_DAYS) -> list[dict[str, Any]]:
    """Per model and region, daily availability for the last `days` days (today so far), from the
    rollups: a minute is bad when any request to it failed because of the service or every probe
    failed. No tenant appears."""
    now = time.time() if now is None else now
    today = int(now // 86400)
    first = (today - days + 1) * 1440
    end = minute_of(now) + 1
    span = (first, end)
    bad: dict[tuple[str, str], dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for model, region, m in q(f"SELECT DISTINCT model, region, minute FROM usage_minute WHERE {BAD} "
                              "AND minute >= ? AND minute < ?", span):
        bad[(model, region)][m // 1440].add(m)
    for (model, region), mins in _down(q, span).items():
        for m in mins:
            bad[(model, region)][m // 1440].add(m)
    pools = {(p.model, p.region) for p in spec.pools if p.role != "drained"}
    out = []
    for model, region in sorted(pools | set(bad)):
        if model == "unknown":
            continue
        daily = []
        for day in range(today - days + 1, today + 1):
            minutes = 1440 if day < today else end - day * 1440
            n = len(bad[(model, region)].get(day, ()))
            daily.append({"date": datetime.fromtimestamp(day * 86400, timezone.utc).strftime("%Y-%m-%d"),
                          "availability_pct": round(100.0 * (minutes - n) / minutes, 3), "bad_minutes": n})
        out.append({"model": model, "region": region, "days": daily})
    return out
