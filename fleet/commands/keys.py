"""`infermesh keys create|list|revoke|debug-log --stack S`: tenants and their API keys.

Tenant names match gateway.keys.TENANT_PATTERN (docs/cli-inputs.md); keys.db is created 0600 in a
0700 state dir (it holds key hashes and the debug-log opt-ins).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fleet import spec as spec_mod
from fleet.cli import MAX_DEBUG_LOG_HOURS, UserError, cell, hours, key_id, tenant_name
from fleet.paths import ensure_state_dir
from gateway.state import key_admin


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = p.add_subparsers(dest="action", required=True)
    c = ksub.add_parser("create", help="create a key (and the tenant if new); the key is shown once")
    c.add_argument("--tenant", required=True, type=tenant_name)
    c.add_argument("--tier", help="the tenant's tier (required for a new tenant)")
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


def _info(k) -> dict:
    return {"id": k.id, "tenant": k.tenant, "tier": k.tier, "prefix": k.prefix,
            "created_at": k.created_at, "revoked_at": k.revoked_at}


def run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    admin = key_admin(spec, ensure_state_dir(args.stack))   # PostgreSQL with ledger: postgres, else keys.db
    try:
        if args.action == "create":
            tiers = [t.name for t in spec.tiers]
            if args.tier is not None and args.tier not in tiers:
                raise UserError(f"--tier {args.tier!r}: not a tier of stack {args.stack} ({', '.join(tiers)})")
            key, info = admin.create(args.tenant, args.tier)
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
                    print(f"{k.id}  {cell(k.prefix)}…  {cell(k.tenant):<20} {cell(k.tier):<10} {state:<8} {when}Z")
        elif args.action == "revoke":
            info = admin.revoke(args.key_id)
            print(json.dumps(_info(info)) if args.json else f"revoked {info.id} (tenant {cell(info.tenant)})")
        elif args.action == "debug-log":
            until = admin.set_debug_log(args.tenant, args.hours)
            msg = "off" if until is None else time.strftime("until %Y-%m-%d %H:%MZ", time.gmtime(until))
            print(json.dumps({"tenant": args.tenant, "debug_log_until": until}) if args.json
                  else f"debug logs for {args.tenant}: {msg}")
    except LookupError as e:
        raise UserError(str(e).strip("'\"")) from None
    return 0
