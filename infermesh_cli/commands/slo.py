"""`infermesh slo report` and `infermesh slo credits`: the SLA per customer, from the rollups.

    infermesh slo report  --stack S (--month YYYY-MM | --since T [--until T]) [--tenant T] [--json]
    infermesh slo credits --stack S --month YYYY-MM [--tenant T] [--format table|csv|json]

Definitions and the rollups: gateway/sla.py. A local (SQLite) stack's ledger is rolled up first,
so a report includes the last seconds; a PostgreSQL stack's rollups are written by its gateways.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

from fleet import spec as spec_mod
from infermesh_cli.errors import UserError
from infermesh_cli.inputs import cell, csv_cell, parse_since, tenant_name
from fleet.paths import state_dir
from gateway import sla
from gateway.state import sla_target, uses_postgres


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slo", help="SLA reports and credits per customer, from the ledger's rollups")
    ssub = p.add_subparsers(dest="action", required=True)
    r = ssub.add_parser("report", help="availability, bad minutes, budget, latency and credit per customer")
    _period_args(r)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=run_report)
    c = ssub.add_parser("credits", help="the credits statement of a month, per customer")
    c.add_argument("--stack", required=True)
    c.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    c.add_argument("--tenant", type=tenant_name)
    c.add_argument("--format", choices=("table", "csv", "json"), default="table")
    c.set_defaults(func=run_credits)


def _period_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", required=True)
    p.add_argument("--month", help="a calendar month, YYYY-MM (UTC); the current one is provisional")
    p.add_argument("--since", help="ISO date/time (UTC) or a duration like 24h, 7d (instead of --month)")
    p.add_argument("--until", help="ISO date/time (UTC) or a duration ago (default: now)")
    p.add_argument("--tenant", type=tenant_name)


def _period(args: argparse.Namespace) -> sla.Period:
    month = getattr(args, "month", None)
    try:
        if month and (getattr(args, "since", None) is not None or getattr(args, "until", None) is not None):
            raise UserError("give --month or --since/--until, not both")
        if month:
            return sla.month_period(month)
        since = parse_since(args.since if args.since is not None else "30d")
        until = parse_since(args.until, flag="--until") if args.until is not None else None
        return sla.window_period(since, until)
    except sla.SlaError as e:
        raise UserError(str(e)) from None


def _report(args: argparse.Namespace) -> dict:
    spec = spec_mod.load(args.stack)
    period = _period(args)
    target = sla_target(spec, state_dir(args.stack))
    if not uses_postgres(spec):
        path = state_dir(args.stack) / "ledger.db"
        if not path.exists():
            raise UserError(f"no ledger yet for stack {args.stack} ({path})")
        sla.Rollup(spec, path, target, "local").run_once()     # what the gateway has not rolled up yet
    try:
        return sla.report(target.query, spec, period, args.tenant)
    except sla.SlaError as e:
        raise UserError(str(e)) from None


def _pct(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _bucket(b) -> str:
    if b is None:
        return "-"
    return f">{b['gt']}" if b["le"] is None else f"<={b['le']}"


def run_report(args: argparse.Namespace) -> int:
    rep = _report(args)
    if args.json:
        print(json.dumps(rep))
        return 0
    p = rep["period"]
    print(f"{p['label']}: {p['minutes']} minutes{' (provisional)' if p['provisional'] else ''}; "
          f"{rep['no_data_minutes']} with no data")
    print(f"{'tenant':<20} {'tier':<9} {'requests':>8} {'5xx%':>7} {'avail%':>8} {'SLO%':>6} {'bad min':>7} "
          f"{'budget left':>11} {'TTFT p95 ms':>11} {'breach h':>8} {'credit%':>7}")
    for c in rep["customers"]:
        budget = c["error_budget_minutes"]
        print(f"{cell(c['tenant'])[:20]:<20} {cell(c['tier']):<9} {c['requests']:>8} {c['five_xx_rate_pct']:>7.3f} "
              f"{_pct(c['availability_pct']):>8} {c['slo_availability_pct'] or '-':>6} {c['bad_minutes']:>7} "
              f"{'-' if budget is None else format(budget['left'], '.1f'):>11} {_bucket(c['ttft_ms']['p95']):>11} "
              f"{c['ttft_p95_breach_hours']:>8} {c['credit_percent']:>7}")
        for r in c["regions"]:
            print(f"  region {cell(r['region']) or '-'}: {_pct(r['availability_pct'])}% "
                  f"({r['bad_minutes']} bad minutes)")
    return 0


def run_credits(args: argparse.Namespace) -> int:
    rep = _report(args)
    lines = sla.credits_statement(rep)
    if args.format == "json":
        print(json.dumps({"period": rep["period"], "credits": lines}))
        return 0
    cols = ["tenant", "tier", "period", "provisional", "availability_pct", "slo_availability_pct", "bad_minutes",
            "ttft_p95_breach_hours", "credit_percent", "monthly_fee", "credit", "bad_intervals"]
    rows = [{**{k: v for k, v in line.items() if k in cols}, "monthly_fee": _money(line["monthly_fee_cents"]),
             "credit": _money(line["credit_cents"]),
             "bad_intervals": " ".join(f"{a}/{b}" for a, b in line["bad_intervals"])} for line in lines]
    if args.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=cols)
        w.writeheader()
        w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
        return 0
    p = rep["period"]
    print(f"Credits for {p['label']}{' (provisional: the month is not over)' if p['provisional'] else ''}")
    print(f"{'tenant':<20} {'tier':<9} {'avail%':>8} {'SLO%':>6} {'breach h':>8} {'credit%':>7} {'fee':>10} "
          f"{'credit':>10}")
    for r in rows:
        print(f"{cell(r['tenant'])[:20]:<20} {cell(r['tier']):<9} {_pct(r['availability_pct']):>8} "
              f"{r['slo_availability_pct'] or '-':>6} {r['ttft_p95_breach_hours']:>8} {r['credit_percent']:>7} "
              f"{r['monthly_fee']:>10} {r['credit']:>10}")
    return 0


def _money(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"
