"""`infermesh usage report --stack S [--tenant T] [--since ...] [--group-by tenant,model,provider]
[--format csv|json|table]`: tokens, requests, price, cost and margin per group (integer micro-dollars).

Price: what each request was charged when served (its ledger row). Cost: for a pool billed by the hour
(a lease), each hour's lease cost spread over the tokens the pool served in that hour; for an upstream
billed per token, its price (recorded with the row). See docs/money.md.

Model names in the ledger are what clients sent: the table escapes control characters, the CSV
neutralises formula prefixes (infermesh_cli.inputs.cell, csv_cell); JSON escapes them by itself.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict

from fleet import spec as spec_mod
from fleet.failover import effective_spec
from fleet.kinds import LEASED_KINDS, is_upstream
from infermesh_cli.errors import UserError
from infermesh_cli.inputs import cell, csv_cell, parse_since, shown, tenant_name
from fleet.paths import state_dir
from gateway.state import usage_rows, uses_postgres


GROUPS = ("tenant", "model", "provider", "pool", "tier", "region", "key")


def group_by(text: str) -> tuple[str, ...]:
    """argparse type: a comma-separated list of GROUPS."""
    names = tuple(x.strip() for x in text.split(","))
    bad = [n for n in names if n not in GROUPS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{shown(text)}: give distinct names from {', '.join(GROUPS)}, "
                                         "comma-separated (e.g. tenant,model,provider)")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("usage", help="usage reports from the ledger")
    usub = p.add_subparsers(dest="action", required=True)
    r = usub.add_parser("report", help="tokens, requests, price, cost and margin per tenant and model (or --group-by)")
    r.add_argument("--stack", required=True)
    r.add_argument("--tenant", type=tenant_name)
    r.add_argument("--since", help="ISO date/time (UTC) or a duration like 24h, 7d, 30m")
    r.add_argument("--format", choices=("table", "csv", "json"), default="table")
    r.add_argument("--group-by", type=group_by, default=("tenant", "model"),
                   help=f"comma-separated: {', '.join(GROUPS)} (default tenant,model)")
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


def _tokens(r: dict) -> int:
    return r["prompt_tokens"] + r.get("cached_tokens", 0) + r["completion_tokens"]


def lease_hour_micro_usd(spec: spec_mod.Spec) -> dict[str, int]:
    """Per pool billed by the hour (a lease, or a local pool the stack prices): what one hour of all its
    replicas costs, in micro-dollars (the canary's lease counts with its pool)."""
    eff = effective_spec(spec)
    out: dict[str, int] = {}
    for pool in eff.pools:
        prov = eff.provider(pool.provider)
        if is_upstream(prov.kind) or pool.role == "drained":
            continue
        if prov.kind not in LEASED_KINDS and pool.price_per_gpu_hour is None:
            continue
        price = pool.price_per_gpu_hour if pool.price_per_gpu_hour is not None else prov.price_cap_per_gpu_hour
        if price is None:
            continue
        replicas = pool.replicas + (1 if eff.canary is not None and eff.canary.pool == pool.name else 0)
        out[pool.name] = round(price * pool.gpu.count * replicas * 1_000_000)
    return out


def costs(rows: list[dict], spec: spec_mod.Spec) -> list[int]:
    """Each row's cost in micro-dollars. A pool billed by the hour: each hour's lease cost spread over the
    tokens the pool served in that hour, in proportion to each request's tokens (largest remainder, so an
    hour's shares add up to the hour exactly). Anything else: the cost recorded with the row (an
    upstream's per-token price). An hour in which a pool served nothing is idle cost no request carries."""
    hourly = lease_hour_micro_usd(spec)
    out = [int(r.get("cost_micro_usd") or 0) for r in rows]
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.get("pool") in hourly and _tokens(r) > 0:
            groups[(r["pool"], int(r["created_at"] // 3600))].append(i)
    for (pool, _), idx in groups.items():
        total = sum(_tokens(rows[i]) for i in idx)
        amount = hourly[pool]
        shares = [(amount * _tokens(rows[i]), i) for i in idx]
        base = {i: q // total for q, i in shares}
        left = amount - sum(base.values())
        for _, i in sorted(shares, key=lambda x: (-(x[0] % total), x[1]))[:left]:
            base[i] += 1
        for i in idx:
            out[i] = base[i]
    return out


def _key(r: dict, name: str) -> str:
    if name == "model":
        return r["served_model"] or r["requested_model"]
    if name == "key":
        return r["key_id"]
    return r.get(name) or ""


def totals(rows: list[dict], spec: spec_mod.Spec, by: tuple[str, ...] = ("tenant", "model")) -> list[dict]:
    """Per group: requests, errors, tokens by class, price, cost and margin (integer micro-dollars) and the
    margin as a percentage of the price."""
    acc: dict[tuple, dict] = defaultdict(lambda: {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                                  "cached_tokens": 0, "completion_tokens": 0,
                                                  "price_micro_usd": 0, "cost_micro_usd": 0})
    for r, cost in zip(rows, costs(rows, spec), strict=True):
        a = acc[tuple(_key(r, n) for n in by)]
        a["requests"] += 1
        a["errors"] += r["status"] != 200
        a["prompt_tokens"] += r["prompt_tokens"]
        a["cached_tokens"] += r.get("cached_tokens", 0)
        a["completion_tokens"] += r["completion_tokens"]
        # the price recorded when it was served; rows from before prices were recorded: at today's prices
        a["price_micro_usd"] += r.get("price_micro_usd") or price_micro_usd(r, spec)
        a["cost_micro_usd"] += cost
    out = []
    for k, v in sorted(acc.items()):
        margin = v["price_micro_usd"] - v["cost_micro_usd"]
        out.append({**dict(zip(by, k, strict=True)), **v,
                    "total_tokens": v["prompt_tokens"] + v["cached_tokens"] + v["completion_tokens"],
                    "margin_micro_usd": margin,
                    "margin_pct": round(margin * 100 / v["price_micro_usd"], 1) if v["price_micro_usd"] else None})
    return out


def run(args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    spec = spec_mod.load(args.stack)
    path = state_dir(args.stack) / "ledger.db"
    if not uses_postgres(spec) and not path.exists():
        raise UserError(f"no ledger yet for stack {args.stack} ({path})")
    rows = usage_rows(spec, state_dir(args.stack), args.tenant, since)
    out = rows if args.records else totals(rows, spec, args.group_by)
    if args.format == "json":
        print(json.dumps(out, indent=None))
    elif args.format == "csv":
        if out:
            w = csv.DictWriter(sys.stdout, fieldnames=list(out[0]))
            w.writeheader()
            w.writerows({k: csv_cell(v) for k, v in row.items()} for row in out)
    else:
        cols = list(out[0]) if out else [*args.group_by, "requests", "total_tokens"]
        print("  ".join(f"{c:>14}" for c in cols))
        for row in out:
            print("  ".join(f"{cell(row[c]):>14}" for c in cols))
    return 0
