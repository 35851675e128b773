"""`infermesh keys create|list|revoke|debug-log --stack S`: tenants and their API keys.

`keys create ... [--models a,b] [--monthly-spend USD]` scopes a key: only those models, and at most
that spend per calendar month (UTC) at the tier's prices (docs/money.md). `--region R` (one of the
stack's regions) serves the key's requests in R unless they name a region in x-infermesh-region.

Tenant names match gateway.keys.TENANT_PATTERN (docs/cli-inputs.md); keys.db is created 0600 in a
0700 state dir (it holds key hashes and the debug-log opt-ins).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from fleet import spec as spec_mod
from infermesh_cli.errors import UserError
from infermesh_cli.inputs import MAX_DEBUG_LOG_HOURS, cell, hours, key_id, shown, tenant_name
from fleet.paths import ensure_state_dir
from gateway.keys import KeyInfo
from gateway.state import key_admin


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = p.add_subparsers(dest="action", required=True)
    c = ksub.add_parser("create", help="create a key (and the tenant if new); the key is shown once")
    c.add_argument("--tenant", required=True, type=tenant_name)
    c.add_argument("--tier", help="the tenant's tier (required for a new tenant)")
    c.add_argument("--models", type=model_list, help="limit the key to these models (comma-separated; default: "
                                                     "every model of the tier)")
    c.add_argument("--monthly-spend", type=usd_micro, metavar="USD",
                   help="limit the key's spend per calendar month (UTC), at the tier's prices: at the limit "
                        "requests get 429 insufficient_quota")
    c.add_argument("--region", help="serve the key's requests in this region of the stack (unless a request names "
                                    "one in x-infermesh-region; default: the gateway's region)")
    ls = ksub.add_parser("list", help="list keys (never the keys themselves)")
    ls.add_argument("--tenant", type=tenant_name)
    r = ksub.add_parser("revoke", help="revoke a key by its id; takes effect at once (shared state: on every "
                                     "replica within 2 s)")
    r.add_argument("key_id", type=key_id)
    d = ksub.add_parser("debug-log", help="opt a tenant in to prompt/completion debug logs for N hours (0: off)")
    d.add_argument("--tenant", required=True, type=tenant_name)
    d.add_argument("--hours", type=hours, required=True, help=f"0 to {MAX_DEBUG_LOG_HOURS}")
    for q in (c, ls, r, d):
        q.add_argument("--stack", required=True)
        q.add_argument("--json", action="store_true")
        q.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
        q.set_defaults(func=run)


_MODEL = re.compile(r"[a-z0-9]([a-z0-9._/-]*[a-z0-9])?", re.ASCII)
_USD = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?", re.ASCII)


def model_list(text: str) -> list[str]:
    """argparse type: model ids, comma-separated."""
    names = [x.strip() for x in text.split(",")]
    if not names or any(not _MODEL.fullmatch(n) or len(n) > 120 for n in names):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a comma-separated list of model ids")
    return names


def usd_micro(text: str) -> int:
    """argparse type: US dollars (digits, up to 6 decimals) as integer micro-dollars."""
    if not _USD.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an amount in US dollars (e.g. 50 or 12.5; "
                                         "digits, at most 6 decimals, not negative)")
    whole, _, frac = text.partition(".")
    return int(whole) * 1_000_000 + int((frac + "000000")[:6])


def _info(k: KeyInfo) -> dict:
    return {"id": k.id, "tenant": k.tenant, "tier": k.tier, "prefix": k.prefix,
            "created_at": k.created_at, "revoked_at": k.revoked_at,
            "models": k.models.split(",") if k.models else None,
            "monthly_spend_micro_usd": k.monthly_spend_micro_usd,
            "region": k.region}


def _scope(k: KeyInfo) -> str:
    parts = []
    if k.models:
        parts.append("models " + k.models)
    if k.monthly_spend_micro_usd is not None:
        parts.append(f"spend ${k.monthly_spend_micro_usd / 1e6:,.2f}/month")
    if k.region:
        parts.append("region " + k.region)
    return "  " + "; ".join(cell(p) for p in parts) if parts else ""


def run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    admin = key_admin(spec, ensure_state_dir(args.stack))   # PostgreSQL with ledger: postgres, else keys.db
    try:
        if args.action == "create":
            tiers = [t.name for t in spec.tiers]
            if args.tier is not None and args.tier not in tiers:
                raise UserError(f"--tier {args.tier!r}: not a tier of stack {args.stack} ({', '.join(tiers)})")
            if args.models:
                known = {m.id for m in spec.models}
                allowed = set(spec.tier(args.tier).models) if args.tier is not None else known
                bad = [m for m in args.models if m not in allowed]
                if bad:
                    where = f"tier {args.tier}" if args.tier is not None else f"stack {args.stack}"
                    raise UserError(f"--models: {', '.join(bad)} not served to {where} "
                                    f"({', '.join(sorted(allowed))})")
            regions = [r.name for r in spec.regions]
            if args.region is not None and args.region not in regions:
                raise UserError(f"--region {shown(args.region)}: not a region of stack {args.stack} "
                                f"({', '.join(regions)})")
            key, info = admin.create(args.tenant, args.tier, args.models, args.monthly_spend, region=args.region)
            if args.json:
                print(json.dumps({"key": key, **_info(info)}))
            else:
                print(f"created {info.id} for tenant {info.tenant} (tier {info.tier}). The key, shown once:\n{key}")
        elif args.action == "list":
            keys = admin.list(args.tenant)
            if args.json:
                print(json.dumps([_info(k) for k in keys]))
            else:
                for k in keys:
                    state = "revoked" if k.revoked_at else "active"
                    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created_at))
                    print(f"{k.id}  {cell(k.prefix)}…  {cell(k.tenant):<20} {cell(k.tier):<10} {state:<8} {when}Z"
                          f"{_scope(k)}")
        elif args.action == "revoke":
            info = admin.revoke(args.key_id)
            print(json.dumps(_info(info)) if args.json else f"revoked {info.id} (tenant {cell(info.tenant)})")
        elif args.action == "debug-log":
            until = admin.set_debug_log(args.tenant, args.hours)
            msg = "off" if until is None else time.strftime("until %Y-%m-%d %H:%MZ", time.gmtime(until))
            print(json.dumps({"tenant": args.tenant, "debug_log_until": until}) if args.json
                  else f"debug logs for {args.tenant}: {msg}")
    except (LookupError, ValueError) as e:
        raise UserError(str(e).strip("'\"")) from None
    return 0
