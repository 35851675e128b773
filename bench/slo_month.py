"""A month of prod for the SLA reports: how long `slo report --month` and `slo credits` take, and
how much memory, at the prod forecast's request rate; and how fast the gateway's rollup turns
ledger rows into minutes.

    .venv/bin/python bench/slo_month.py [--tenants 200] [--rollup-rows 2000000] [--backend sqlite|postgres]

1. Rollup throughput: `--rollup-rows` ledger rows (a mix of tenants, models, regions, statuses,
   streams and whole answers) are written to a ledger.db, then rolled up as the gateway does
   (gateway/sla.py Rollup, in CHUNK transactions). Reported as rows per second; the prod month's
   requests (the forecast's QPS x 30 days) divided by it is the month's rollup CPU.
2. The report: the rollup rows a prod month would have (per minute, the (tenant, model, region)
   combinations the forecast's requests hit, tenants drawn Zipf-like), written straight into
   usage_minute, then `sla.report` for the month and the credits statement, each in a fresh
   process so its peak RSS is its own.

Nothing here is a test: run it by hand, report the command and the numbers (bench/README.md).
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet import spec as spec_mod  # noqa: E402
from gateway import ledger, sla  # noqa: E402

MONTH = "2026-11"
START = calendar.timegm((2026, 11, 1, 0, 0, 0))
NOW = calendar.timegm((2026, 12, 1, 12, 0, 0))


def _tenants(n: int) -> list[tuple[str, float]]:
    weights = [1 / (i + 1) for i in range(n)]
    total = sum(weights)
    return [(f"tenant-{i:04d}", w / total) for i, w in enumerate(weights)]


def rollup_throughput(spec: spec_mod.Spec, rows: int, tmp: Path) -> float:
    path = tmp / "ledger.db"
    rng = random.Random(1)
    tenants = _tenants(200)
    names, weights = [t for t, _ in tenants], [w for _, w in tenants]
    models = [m.id for m in spec.models]
    regions = sorted({p.region for p in spec.pools})
    tiers = [t.name for t in spec.tiers]
    conn = ledger.connect(path)
    conn.execute("BEGIN")
    batch = []
    for i in range(rows):
        stream = rng.random() < 0.7
        status = 200 if rng.random() < 0.995 else rng.choice((429, 502, 504, 400))
        rec = ledger.UsageRecord(f"r{i}", rng.choices(names, weights)[0], "k", rng.choice(tiers), "chat",
                                 rng.choice(models), region=rng.choice(regions), stream=stream,
                                 prompt_tokens=600, completion_tokens=250 if status == 200 else 0, status=status,
                                 ttft_ms=rng.uniform(80, 2500) if stream and status == 200 else None,
                                 ttlt_ms=rng.uniform(1000, 12000), created_at=START + i * 0.18)
        batch.append(ledger._row(rec))
        if len(batch) == 50_000:
            conn.executemany(ledger._INSERT, batch)
            batch.clear()
    conn.executemany(ledger._INSERT, batch)
    conn.execute("COMMIT")
    conn.close()
    target = sla.SqliteTarget(path)
    t = time.perf_counter()
    covered = sla.Rollup(spec, path, target, "local").run_once()
    took = time.perf_counter() - t
    assert covered == rows, covered
    return rows / took


def month_of_rollups(spec: spec_mod.Spec, tenants: int, qps: float, target) -> int:
    """Per minute, the (tenant, model, region) rows the forecast's requests would fill."""
    rng = random.Random(2)
    ts = _tenants(tenants)
    names, weights = [t for t, _ in ts], [w for _, w in ts]
    tier_of = {n: spec.tiers[i % len(spec.tiers)].name for i, n in enumerate(names)}
    combos = [(f.model, f.region) for f in spec.forecast]
    per_minute = int(qps * 60)
    n_cols = len(sla._COUNTS)
    rows = []
    minutes = calendar.monthrange(2026, 11)[1] * 1440
    start = START // 60
    total = 0

    def flush():
        nonlocal total
        def compute(after):
            return after, rows, []
        target.roll("bench", compute)
        total += len(rows)
        rows.clear()

    for m in range(minutes):
        cells: dict[tuple, int] = {}
        for name in rng.choices(names, weights, k=per_minute):
            key = (name, *rng.choice(combos))
            cells[key] = cells.get(key, 0) + 1
        bad = rng.random() < 0.0005
        for (name, model, region), n in cells.items():
            counts = [0] * n_cols
            counts[0], counts[1] = n, n - (1 if bad else 0)
            counts[2] = 1 if bad else 0
            counts[5] = int(n * 0.7)
            rows.append((start + m, name, tier_of[name], model, region, *counts))
        if len(rows) >= 200_000:
            flush()
    flush()
    return total


def child(kind: str, where: str) -> None:
    """In a fresh process: one report over the month; prints seconds and peak RSS."""
    spec = spec_mod.load("prod")
    target = sla.SqliteTarget(where) if kind == "sqlite" else sla.PgTarget(where)
    t = time.perf_counter()
    rep = sla.report(target.query, spec, sla.month_period(MONTH, NOW))
    statement = sla.credits_statement(rep)
    took = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(took, 2), "peak_rss_mb": round(rss, 1), "customers": len(rep["customers"]),
                      "credit_lines": len(statement)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tenants", type=int, default=200)
    p.add_argument("--rollup-rows", type=int, default=2_000_000)
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    spec = spec_mod.load("prod")
    qps = sum(f.qps for f in spec.forecast)
    month_requests = qps * 30 * 86400
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rate = rollup_throughput(spec, a.rollup_rows, tmp)
        print(f"rollup: {rate:,.0f} ledger rows/s on one core; a prod month ({month_requests / 1e6:.1f}M requests at "
              f"{qps} QPS) is {month_requests / rate:,.0f} s of rollup CPU, spread over the month")
        if a.backend == "sqlite":
            where = str(tmp / "month.db")
            target = sla.SqliteTarget(where)
        else:
            import psycopg
            from gateway.state.migrate import migrate
            admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute('DROP DATABASE IF EXISTS "bench_slo" WITH (FORCE)')
                conn.execute('CREATE DATABASE "bench_slo"')
            where = "host=127.0.0.1 port=5432 user=postgres dbname=bench_slo"
            migrate(where)
            target = sla.PgTarget(where)
        t = time.perf_counter()
        n = month_of_rollups(spec, a.tenants, qps, target)
        print(f"month: {n:,} rollup rows for {a.tenants} tenants at {qps} QPS "
              f"(written in {time.perf_counter() - t:.0f} s)")
        out = subprocess.run([sys.executable, __file__, "--child", a.backend, where], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout)
        print(f"slo report + credits for {MONTH} ({a.backend}): {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB, "
              f"{r['customers']} customers")


if __name__ == "__main__":
    main()
