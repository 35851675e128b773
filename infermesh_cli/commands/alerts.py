"""`infermesh alerts render --stack S [--write | --check] [--runbook-url URL]`: the stack's Prometheus rules.

The rules are a pure function of the stack file (fleet/alerts.py): thresholds come from each tier's
SLO. Without a flag the rules file is printed; `--write` writes it to
monitoring/alerts/<stack>.rules.yml (the shipped copy, also rendered into the Kubernetes program as
a PrometheusRule); `--check` exits 1 when that file is not what the stack renders (CI, and after a
stack change).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleet import alerts, project
from fleet import spec as spec_mod

ALERTS_DIR = project.root() / "monitoring" / "alerts"     # the project's (fleet/project.py)


def rules_path(stack: str) -> Path:
    return ALERTS_DIR / f"{stack}.rules.yml"


def _shown(path: Path) -> str:
    return str(path.relative_to(spec_mod.ROOT)) if path.is_relative_to(spec_mod.ROOT) else str(path)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alerts", help="Prometheus alerting rules rendered from the stack's SLOs")
    asub = p.add_subparsers(dest="action", required=True)
    r = asub.add_parser("render", help="print (or --write, or --check) monitoring/alerts/<stack>.rules.yml")
    r.add_argument("--stack", required=True)
    out = r.add_mutually_exclusive_group()
    out.add_argument("--write", action="store_true", help="write monitoring/alerts/<stack>.rules.yml")
    out.add_argument("--check", action="store_true", help="exit 1 when the shipped file differs from the render")
    r.add_argument("--runbook-url", default=alerts.RUNBOOK,
                   help=f"the runbook every alert links to (default {alerts.RUNBOOK}; give its web address)")
    r.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    text = alerts.to_yaml(spec, args.runbook_url)
    path = rules_path(args.stack)
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            print(f"{_shown(path)} is {'missing' if current is None else 'out of date'}: "
                  f"run `infermesh alerts render --stack {args.stack} --write`", file=sys.stderr)
            return 1
        print(f"{_shown(path)}: up to date")
        return 0
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {_shown(path)} ({len(alerts.alert_names(spec))} alerts)")
        return 0
    sys.stdout.write(text)
    return 0
