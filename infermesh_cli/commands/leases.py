"""`infermesh leases audit --stack S [--terminate] [--yes]`: leases billed to the stack that the stack does not know.

Every lease the fleet rents carries the label ``<project>--<stack>--<lease>--<generation>``
(fleet/components/lease.py), so a stack's leases can be listed on each marketplace by the label's
prefix, whatever happened to the ``pulumi up`` that rented them. Audit lists, per marketplace, the
ones that are not in the stack's state, with what they cost per hour:

- The state is ``pulumi stack export`` JSON: ``--state FILE``, else the output of
  ``pulumi stack export --stack S`` when the Pulumi CLI is on PATH. A lease is known when its id is a
  GpuLease's ``lease_id`` in that state.
- Without a state, the plan is the reference: a lease whose label names no lease of the plan is
  unknown, and so is every lease but one under a plan lease's name (the plan says one lease each;
  which one the state holds cannot be told without the state, so all of them are listed as
  ``duplicate``). The output says which reference was used.

Credentials come from the environment (``VASTAI_API_KEY``, ``RUNPOD_API_KEY``, ``AKASH_API_KEY``;
base URLs from ``INFERMESH_<KIND>_BASE_URL``): a marketplace without one is named as skipped and the
audit goes on with the others. ``--terminate`` gives the unknown leases back after a confirmation
(``--yes`` answers it, for CI).

Exit status: 0 when no unknown lease remains on the marketplaces checked, 1 when some do (or a
marketplace could not be listed), 2 for a problem with the command itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fleet import plan as plan_mod
from fleet import spec as spec_mod
from infermesh_cli import pulumi_cli
from infermesh_cli.errors import UserError

LEASE_TYPE = "pulumi-python:dynamic/infermesh:GpuLease"
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Unknown:
    """One lease labelled with the stack that the stack does not know."""

    kind: str
    lease_id: str
    label: str
    status: str
    price_per_hour: float | None
    why: str                        # "not in state" | "not in plan" | "duplicate"


@dataclass
class Report:
    reference: str                                                  # "state" | "plan"
    unknown: dict[str, list[Unknown]] = field(default_factory=dict)  # per marketplace checked
    skipped: dict[str, str] = field(default_factory=dict)           # marketplace -> why
    failed: dict[str, str] = field(default_factory=dict)            # marketplace -> error

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.unknown.values())

    @property
    def per_hour(self) -> float:
        return sum(x.price_per_hour or 0.0 for v in self.unknown.values() for x in v)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leases", help="GPU leases on the marketplaces: find (and end) the ones the stack does not know")
    lsub = p.add_subparsers(dest="action", required=True)
    a = lsub.add_parser("audit", help="list leases labelled with the stack that are not in its state (or plan)")
    a.add_argument("--stack", required=True)
    a.add_argument("--state", type=Path, default=None,
                   help="`pulumi stack export` JSON (default: run it when the Pulumi CLI is installed)")
    a.add_argument("--project", default=None, help="Pulumi project name (default: Pulumi.yaml's name)")
    a.add_argument("--terminate", action="store_true", help="give the unknown leases back (asks first)")
    a.add_argument("--yes", action="store_true", help="answer yes to the --terminate question (CI)")
    a.add_argument("--json", action="store_true")
    a.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
    a.set_defaults(func=run)


def project_name(root: Path = ROOT) -> str:
    try:
        doc = yaml.safe_load((root / "Pulumi.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return "infermesh"
    return str((doc or {}).get("name") or "infermesh")


def state_lease_ids(state: Mapping) -> set[str]:
    """GpuLease ids in a `pulumi stack export` document (v3 deployment)."""
    resources = ((state.get("deployment") or {}).get("resources")) or state.get("resources") or []
    ids = set()
    for r in resources:
        if r.get("type") == LEASE_TYPE:
            outs = r.get("outputs") or {}
            for value in (r.get("id"), outs.get("lease_id")):
                if value:
                    ids.add(str(value))
    return ids


def load_state(stack: str, path: Path | None) -> set[str] | None:
    if path is not None:
        try:
            return state_lease_ids(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--state {path}: not a `pulumi stack export` JSON file ({e})") from None
    if not pulumi_cli.available():
        return None
    doc = pulumi_cli.run_json(["stack", "export", "--stack", stack], hint="pass --state FILE instead")
    try:
        return state_lease_ids(doc)
    except (AttributeError, TypeError) as e:
        raise UserError(f"`pulumi stack export --stack {stack}` printed no export document ({type(e).__name__}: "
                        f"{e}); pass --state FILE instead") from None


def default_adapters() -> dict[str, Callable[[], object] | str]:
    """Per leasing marketplace, a factory for its adapter, or why it cannot be checked."""
    from fleet.marketplaces import API_KEY_ENV, LEASE_ADAPTERS

    out: dict[str, Callable[[], object] | str] = {}
    for kind, cls in LEASE_ADAPTERS.items():
        key = os.environ.get(API_KEY_ENV[kind], "")
        if not key:
            out[kind] = f"no credentials (set {API_KEY_ENV[kind]})"
            continue
        base = os.environ.get(f"INFERMESH_{kind.upper()}_BASE_URL") or None
        out[kind] = functools.partial(cls, key, base)
    return out


def audit(project: str, stack: str, known_ids: set[str] | None, plan_leases: set[str],
          adapters: Mapping[str, Callable[[], object] | str]) -> Report:
    from fleet.components.lease import label_prefix, parse_label
    from fleet.marketplaces import MarketplaceError

    report = Report("state" if known_ids is not None else "plan")
    prefix = label_prefix(project, stack)
    for kind, make in adapters.items():
        if isinstance(make, str):
            report.skipped[kind] = make
            continue
        try:
            listed = make().leases_labelled(prefix)           # type: ignore[attr-defined]
        except MarketplaceError as e:
            report.failed[kind] = str(e)
            continue
        found = []
        if known_ids is not None:
            found = [Unknown(kind, s.lease_id, s.label, s.raw_status, s.price_per_hour, "not in state")
                     for s in listed if s.lease_id not in known_ids]
        else:
            by_name: dict[str, list] = {}
            for s in listed:
                parts = parse_label(s.label)
                name = parts["lease"] if parts else ""
                if name not in plan_leases:
                    found.append(Unknown(kind, s.lease_id, s.label, s.raw_status, s.price_per_hour, "not in plan"))
                else:
                    by_name.setdefault(name, []).append(s)
            for group in by_name.values():
                if len(group) > 1:
                    found += [Unknown(kind, s.lease_id, s.label, s.raw_status, s.price_per_hour, "duplicate")
                              for s in group]
        report.unknown[kind] = found
    return report


def terminate(report: Report, adapters: Mapping[str, Callable[[], object] | str]) -> dict[str, str]:
    """Give back every unknown lease; lease id -> error for those that could not be."""
    from fleet.marketplaces import MarketplaceError

    errors = {}
    for kind, leases in report.unknown.items():
        make = adapters[kind]
        assert not isinstance(make, str)
        adapter = make()
        for x in leases:
            try:
                adapter.destroy(x.lease_id)              # type: ignore[attr-defined]
            except MarketplaceError as e:
                errors[x.lease_id] = str(e)
    return errors


def money(value: float | None) -> str:
    return "?/h" if value is None else f"${value:.4f}/h"


def print_report(report: Report, stack: str, out=None) -> None:
    out = out or sys.stdout
    ref = ("the stack's state" if report.reference == "state"
           else "the plan (no state: pass --state FILE, or install the Pulumi CLI, for an exact audit)")
    print(f"leases labelled with stack {stack}, against {ref}:", file=out)
    for kind, leases in report.unknown.items():
        cost = sum(x.price_per_hour or 0.0 for x in leases)
        print(f"{kind}: {len(leases)} unknown" + (f", {money(cost)}" if leases else ""), file=out)
        for x in leases:
            print(f"  {x.lease_id}  {x.label}  {x.status}  {money(x.price_per_hour)}  ({x.why})", file=out)
    for kind, why in report.skipped.items():
        print(f"{kind}: skipped: {why}", file=out)
    for kind, err in report.failed.items():
        print(f"{kind}: could not list leases: {err}", file=out)
    print(f"total: {report.count} unknown, {money(report.per_hour)}", file=out)


def run(args: argparse.Namespace, adapters: Mapping[str, Callable[[], object] | str] | None = None,
        ask: Callable[[str], str] = input) -> int:
    spec = spec_mod.load(args.stack, args.stacks_dir)
    plan = plan_mod.build_plan(spec)
    project = args.project or project_name()
    known = load_state(args.stack, args.state)
    adapters = adapters if adapters is not None else default_adapters()
    report = audit(project, args.stack, known, {x.name for x in plan.leases}, adapters)
    if args.json:
        print(json.dumps({"stack": args.stack, "reference": report.reference,
                          "unknown": {k: [vars(x) for x in v] for k, v in report.unknown.items()},
                          "skipped": report.skipped, "failed": report.failed,
                          "per_hour": round(report.per_hour, 4)}, indent=2))
    else:
        print_report(report, args.stack)
    if args.terminate and report.count:
        if not args.yes:
            if not sys.stdin.isatty() and ask is input:
                raise UserError("--terminate needs a confirmation: run it in a terminal, or add --yes")
            answer = ask(f"terminate these {report.count} leases ({money(report.per_hour)})? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing terminated")
                return 1
        errors = terminate(report, adapters)
        for lease_id, err in errors.items():
            print(f"could not terminate {lease_id}: {err}")
        print(f"terminated {report.count - len(errors)} of {report.count}")
        return 1 if errors or report.failed else 0
    return 1 if report.count or report.failed else 0
