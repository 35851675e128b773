"""`infermesh slo report --stack S [--since 30d] [--json]`: availability, latency, budget and credits."""

from __future__ import annotations

import argparse
import json

from fleet import spec as spec_mod
from fleet.cli import UserError, cell, parse_since
from fleet.paths import state_dir
from gateway import slo
from gateway.state import usage_rows, uses_postgres


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slo", help="SLO and SLA credit reports from the ledger")
    ssub = p.add_subparsers(dest="action", required=True)
    r = ssub.add_parser("report")
    r.add_argument("--stack", required=True)
    r.add_argument("--since", default="30d", help="ISO date/time or a duration (default 30d: the SLA month)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=run)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def run(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    spec = spec_mod.load(args.stack)
    path = state_dir(args.stack) / "ledger.db"
    if not uses_postgres(spec) and not path.exists():
        raise UserError(f"no ledger yet for stack {args.stack} ({path})")
    rep = slo.report(usage_rows(spec, state_dir(args.stack), since=since), spec)
    if args.json:
        print(json.dumps(rep))
        return 0
    print(f"{'tier':<10} {'requests':>8} {'5xx':>5} {'avail%':>8} {'SLO%':>6} {'TTFT p50/p95/p99 ms':>22} "
          f"{'budget':>7} {'burn1h':>7} {'credit%':>7}")
    for t in rep["tiers"]:
        avail = "-" if t["availability"] is None else f"{t['availability']:.3f}"
        ttft = "/".join(_ms(t["ttft_ms"][k]) for k in ("p50", "p95", "p99"))
        budget = "-" if t["error_budget_left"] is None else f"{t['error_budget_left']:.0%}"
        burn = "-" if t["burn_rate"]["1h"] is None else f"{t['burn_rate']['1h']:.2f}"
        print(f"{cell(t['tier']):<10} {t['requests']:>8} {t['requests_5xx']:>5} {avail:>8} "
              f"{t['slo']['availability']:>6} {ttft:>22} {budget:>7} {burn:>7} {t['credit_percent']:>7}")
    return 0
