"""`infermesh check --stack S [--json]`: the policy rules (fleet/policy.py) over the stack and its plan.

One line per violation, `RULE resource: message (fix: ...)`, and exit status 1; a short OK line
and 0 when the stack passes. The CrossGuard pack in policies/ runs the same rules at `pulumi preview`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fleet import plan as plan_mod
from fleet import policy
from fleet import spec as spec_mod


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="policy rules over the stack: redundancy, N+1, TLS, digests, VRAM, prices, SLOs")
    p.add_argument("--stack", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    plan = plan_mod.build_plan(spec)
    violations = policy.check(spec, plan)
    if args.json:
        print(json.dumps({"stack": args.stack, "ok": not violations,
                          "rules": [r.id for r in policy.RULES],
                          "violations": [v.to_json() for v in violations]}, indent=2))
    elif violations:
        for v in violations:
            print(v.line())
    else:
        print(f"{args.stack}: OK ({len(policy.RULES)} rules, {len(plan.leases)} leases, {len(spec.pools)} pools)")
    return 1 if violations else 0
