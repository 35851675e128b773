"""`infermesh usage report --stack S [--tenant T] [--since ...] [--format csv|json|table]`.

Model names in the ledger are what clients sent: the table escapes control characters, the CSV
neutralises formula prefixes (fleet.cli.cell, csv_cell); JSON escapes them by itself.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict

from fleet import spec as spec_mod
from fleet.cli import UserError, cell, csv_cell, parse_since, tenant_name
from fleet.paths import state_dir
from gateway.state import usage_rows, uses_postgres


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("usage", help="usage reports from the ledger")
    usub = p.add_subparsers(dest="action", required=True)
    r = usub.add_parser("report", help="tokens and requests per tenant and model")
    r.add_argument("--stack", required=True)
    r.add_argument("--tenant", type=tenant_name)
    r.add_argument("--since", help="ISO date/time (UTC) or a duration like 24h, 7d, 30m")
    r.add_argument("--format", choices=("table", "csv", "json"), default="table")
    r.add_argument("--records", action="store_true", help="one row per request instead of totals")
    r.set_defaults(func=run)


def price_micro_usd(row: dict, spec: spec_mod.Spec) -> int:
    """What a request (or a sum of them, of one tier) costs the customer at its tier's prices, in
    micro-dollars: uncached input and output at price_per_1m_tokens, cached input at
    price_per_1m_cached_tokens (the tier's price when it sets none). A tier no longer in the
    stack prices at 0."""
    tier = next((t for t in spec.tiers if t.name == row["tier"]), None)
    if tier is None:
        return 0
    cached_price = tier.price_per_1m_cached_tokens
    if cached_price is None:
        cached_price = tier.price_per_1m_tokens
    return round((row["prompt_tokens"] + row["completion_tokens"]) * tier.price_per_1m_tokens
                 + row.get("cached_tokens", 0) * cached_price)


def totals(rows: list[dict], spec: spec_mod.Spec) -> list[dict]:
    acc: dict[tuple, dict] = defaultdict(lambda: {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                                  "cached_tokens": 0, "completion_tokens": 0, "price_usd": 0})
    for r in rows:
        a = acc[(r["tenant"], r["served_model"] or r["requested_model"])]
        a["requests"] += 1
        a["errors"] += r["status"] != 200
        a["prompt_tokens"] += r["prompt_tokens"]
        a["cached_tokens"] += r.get("cached_tokens", 0)
        a["completion_tokens"] += r["completion_tokens"]
        a["price_usd"] += price_micro_usd(r, spec)
    return [{"tenant": t, "model": m, **v, "price_usd": round(v["price_usd"] / 1e6, 6),
             "total_tokens": v["prompt_tokens"] + v["cached_tokens"] + v["completion_tokens"]}
            for (t, m), v in sorted(acc.items())]


def run(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    spec = spec_mod.load(args.stack)
    path = state_dir(args.stack) / "ledger.db"
    if not uses_postgres(spec) and not path.exists():
        raise UserError(f"no ledger yet for stack {args.stack} ({path})")
    rows = usage_rows(spec, state_dir(args.stack), args.tenant, since)
    out = rows if args.records else totals(rows, spec)
    if args.format == "json":
        print(json.dumps(out, indent=None))
    elif args.format == "csv":
        if out:
            w = csv.DictWriter(sys.stdout, fieldnames=list(out[0]))
            w.writeheader()
            w.writerows({k: csv_cell(v) for k, v in row.items()} for row in out)
    else:
        cols = list(out[0]) if out else ["tenant", "model", "requests", "total_tokens"]
        print("  ".join(f"{c:>14}" for c in cols))
        for row in out:
            print("  ".join(f"{cell(row[c]):>14}" for c in cols))
    return 0
