"""`infermesh billing invoice --stack S --month YYYY-MM [--tenant T] [--format json|csv]`: invoices.

Per tenant, for one calendar month (UTC), in integer cents (docs/money.md):

- the tier's monthly fee;
- usage by model and token class (input, cached input, output) at the tier's prices: tokens x price
  per 1M, exact (decimal), rounded half up to the micro-dollar and then to the cent, line by line;
- the monthly minimum, where usage falls short of the tier's ``monthly_minimum`` (the difference);
- the SLA credit gateway/sla.py computes for the month (a negative line);
- the total: the sum of the lines.

Every tenant of the key store that existed before the month ended gets an invoice, one without usage
too (its fee, its minimum). A month is *closed* an hour after it ends (``CLOSE_GRACE_S``: the last
replicas' ledger rows are in by then); until then the invoice is marked ``provisional`` and recomputed
each time. The first time a closed month is invoiced, the invoices are written to
``<state dir>/invoices/<month>.json`` and read back from then on, so a closed month's invoice never
changes: later price edits in the stack file, late rows or a tenant's new tier leave it as it was
(same bytes, JSON or CSV).
"""

from __future__ import annotations

import argparse
import calendar
import csv
import io
import json
import os
import time
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from fleet import spec as spec_mod
from infermesh_cli.errors import UserError
from infermesh_cli.inputs import csv_cell, tenant_name
from fleet.paths import private_dir, state_dir

CLOSE_GRACE_S = 3600
CLASSES = (("input", "prompt_tokens"), ("cached_input", "cached_tokens"), ("output", "completion_tokens"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("billing", help="invoices per tenant and month: fee, usage, minimum, SLA credit")
    bsub = p.add_subparsers(dest="action", required=True)
    i = bsub.add_parser("invoice", help="a month's invoices (every tenant, or --tenant)")
    i.add_argument("--stack", required=True)
    i.add_argument("--month", required=True, help="YYYY-MM (UTC); the current month is provisional")
    i.add_argument("--tenant", type=tenant_name)
    i.add_argument("--format", choices=("json", "csv"), default="json")
    i.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
    i.set_defaults(func=run)


def _dec(x: float) -> Decimal:
    return Decimal(repr(float(x)))


def micro(tokens: int, price_per_1m: float) -> int:
    """tokens x price per 1M tokens (USD) = micro-dollars, exact, half up."""
    return int((Decimal(tokens) * _dec(price_per_1m)).quantize(Decimal(1), ROUND_HALF_UP))


def cents(micro_usd: int) -> int:
    return int((Decimal(micro_usd) / 10_000).quantize(Decimal(1), ROUND_HALF_UP))


def usd_cents(usd: float) -> int:
    return int((_dec(usd) * 100).quantize(Decimal(1), ROUND_HALF_UP))


def invoice(spec: spec_mod.Spec, tenant: str, tier_name: str, rows: list[dict], credit: dict | None) -> dict:
    """One tenant's invoice from its ledger rows of the month and its SLA report entry (or None)."""
    tiers = {t.name: t for t in spec.tiers}
    tier = tiers.get(tier_name)
    lines: list[dict[str, Any]] = []
    fee = usd_cents(tier.monthly_fee) if tier else 0
    if fee:
        lines.append({"kind": "fee", "description": f"{tier_name} monthly fee", "amount_cents": fee})
    sums: dict[tuple[str, str, str], int] = defaultdict(int)       # (tier, model, class) -> tokens
    for r in rows:
        model = r.get("served_model") or r["requested_model"]
        for cls, col in CLASSES:
            sums[(r["tier"], model, cls)] += int(r.get(col) or 0)
    usage = 0
    order = {c: i for i, (c, _) in enumerate(CLASSES)}
    for (row_tier, model, cls), tokens in sorted(sums.items(), key=lambda kv: (*kv[0][:2], order[kv[0][2]])):
        t = tiers.get(row_tier)
        if not tokens or t is None:
            continue
        price = t.price_per_1m_tokens
        if cls == "cached_input" and t.price_per_1m_cached_tokens is not None:
            price = t.price_per_1m_cached_tokens
        amount = micro(tokens, price)
        line: dict[str, Any] = {"kind": "usage", "tier": row_tier, "model": model, "token_class": cls,
                                "tokens": tokens, "price_per_1m_usd": str(_dec(price)), "amount_micro_usd": amount,
                                "amount_cents": cents(amount)}
        usage += line["amount_cents"]
        lines.append(line)
    minimum = usd_cents(tier.monthly_minimum) if tier else 0
    if minimum > usage:
        lines.append({"kind": "minimum", "description": f"{tier_name} monthly minimum {minimum} cents, usage "
                                                        f"{usage} cents", "amount_cents": minimum - usage})
    if credit and credit.get("credit_cents"):
        why = (f"SLA credit {credit['credit_percent']:g}% of the monthly fee (availability "
               f"{credit['availability_pct']:.4f}%, {credit['ttft_p95_breach_hours']} h over the TTFT p95)")
        lines.append({"kind": "sla_credit", "description": why, "credit_percent": credit["credit_percent"],
                      "amount_cents": -int(credit["credit_cents"])})
    return {"tenant": tenant, "tier": tier_name, "currency": "USD", "lines": lines,
            "usage_cents": usage, "total_cents": sum(x["amount_cents"] for x in lines)}


def month_bounds(month: str, now: float) -> tuple[int, int, bool]:
    """(start, end) in unix seconds and whether the month is closed (ended CLOSE_GRACE_S ago)."""
    from gateway import sla

    try:
        period = sla.month_period(month, now)
    except sla.SlaError as e:
        raise UserError(str(e)) from None
    start = period.start * 60
    y, m = int(month[:4]), int(month[5:7])
    end = calendar.timegm((y + m // 12, m % 12 + 1, 1, 0, 0, 0))
    return start, end, now >= end + CLOSE_GRACE_S


def compute(spec: spec_mod.Spec, state: Path, month: str, now: float) -> dict:
    """Every tenant's invoice for the month, from the ledger, the key store and the SLA report."""
    from gateway import sla
    from gateway.state import key_admin, sla_target, usage_rows, uses_postgres

    start, end, closed = month_bounds(month, now)
    admin = key_admin(spec, state)
    try:
        keys = admin.list()
    finally:
        admin.close()
    tenants: dict[str, tuple[float, str]] = {}
    for k in keys:                       # the tenant's tier now, and when it first had a key
        first = min(tenants.get(k.tenant, (k.created_at, k.tier))[0], k.created_at)
        tenants[k.tenant] = (first, k.tier)
    has_ledger = uses_postgres(spec) or (state / "ledger.db").exists()
    rows = [r for r in usage_rows(spec, state, None, start) if r["created_at"] < end] if has_ledger else []
    by_tenant: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_tenant[r["tenant"]].append(r)
    credits: dict[str, dict] = {}
    if rows:
        target = sla_target(spec, state)
        if not uses_postgres(spec):
            sla.Rollup(spec, state / "ledger.db", target, "local").run_once()
        period = sla.month_period(month, now)
        for c in sla.report(target.query, spec, period)["customers"]:
            credits[c["tenant"]] = c
    names = sorted({t for t, (first, _) in tenants.items() if first < end} | set(by_tenant))
    out = []
    for name in names:
        mine = by_tenant.get(name, [])
        tier = tenants[name][1] if name in tenants else mine[-1]["tier"]
        out.append(invoice(spec, name, tier, mine, credits.get(name)))
    return {"stack": spec.stack, "month": month, "status": "closed" if closed else "provisional",
            "currency": "USD", "minor_unit": "cent", "invoices": out}


def invoices(spec: spec_mod.Spec, state: Path, month: str, now: float | None = None) -> bytes:
    """The month's invoices as JSON bytes: a closed month's from its archive (written the first time)."""
    now = time.time() if now is None else now
    _, _, closed = month_bounds(month, now)
    archive = state / "invoices" / f"{month}.json"
    if closed and archive.exists():
        return archive.read_bytes()
    data = (json.dumps(compute(spec, state, month, now), indent=2, sort_keys=True) + "\n").encode()
    if closed:
        private_dir(archive.parent)
        tmp = archive.with_name(archive.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, archive)
    return data


def select(doc: dict, tenant: str | None) -> dict:
    if tenant is None:
        return doc
    mine = [x for x in doc["invoices"] if x["tenant"] == tenant]
    if not mine:
        raise UserError(f"no invoice for tenant {tenant!r} in {doc['month']} (not a tenant then; "
                        "`infermesh keys list` shows the tenants)")
    return {**doc, "invoices": mine}


CSV_COLUMNS = ["month", "status", "tenant", "tier", "kind", "model", "token_class", "tokens", "price_per_1m_usd",
               "amount_micro_usd", "amount_cents", "description"]


def to_csv(doc: dict) -> str:
    """One row per invoice line, then a `total` row per tenant."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for inv in doc["invoices"]:
        base = {"month": doc["month"], "status": doc["status"], "tenant": inv["tenant"], "tier": inv["tier"]}
        for line in inv["lines"]:
            w.writerow({k: csv_cell(v) for k, v in {**base, **{c: line.get(c, "") for c in CSV_COLUMNS[4:]}}.items()})
        w.writerow({k: csv_cell(v) for k, v in {**base, "kind": "total", "amount_cents": inv["total_cents"]}.items()})
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    state = state_dir(args.stack)
    from gateway.state import uses_postgres

    if not uses_postgres(spec) and not (state / "keys.db").exists() and not (state / "ledger.db").exists():
        raise UserError(f"no tenants or ledger yet for stack {args.stack} ({state})")
    doc = select(json.loads(invoices(spec, state, args.month)), args.tenant)
    if args.format == "csv":
        print(to_csv(doc), end="")
    else:
        print(json.dumps(doc, indent=2, sort_keys=True))
    return 0
