"""`infermesh bootstrap`: run the bootstrap, drain or rotate-keys playbook against a stack's hosts.

The inventory is generated from the plan and the lease outputs (fleet/inventory.py) into
.infermesh/<stack>/ansible, ansible-runner's private data dir; the summary is per host.
Exit status: 0 when every host succeeded, 1 when any failed or was unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fleet import mesh_keys
from fleet.ansible_run import PLAYBOOKS, PlaybookResult, run_playbook
from infermesh_cli.errors import UserError
from fleet.inventory import GATEWAYS, WORKERS, load_fleet, nodes_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bootstrap", help="bootstrap SSH hosts (preflight, mesh, workers) with Ansible",
                       description=__doc__.splitlines()[0])
    add_stack_args(p)
    p.add_argument("--playbook", choices=PLAYBOOKS, default="bootstrap",
                   help="bootstrap (default), drain (take --limit workers out without dropping requests), "
                        "rotate-keys (new WireGuard keys across the mesh)")
    p.add_argument("--limit", metavar="HOST", action="append", default=[],
                   help="only these nodes (repeatable); for drain: the workers to drain")
    p.add_argument("--timeout", type=int, default=1800, help="seconds before the run is stopped (default 1800)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", help="stack name (stacks/Pulumi.<stack>.yaml)")
    p.add_argument("--stacks-dir", type=Path, help="folder holding Pulumi.<stack>.yaml (default stacks/)")
    p.add_argument("--stack-file", type=Path, help="a stack file outside stacks/ (tests, reviews)")
    p.add_argument("--inventory-hosts", type=Path, metavar="FILE",
                   help="the lease outputs: node -> SSH address (default .infermesh/<stack>/hosts.yaml)")
    p.add_argument("--state-dir", type=Path, help="controller state for the stack (default .infermesh/<stack>)")


def run(args: argparse.Namespace) -> int:
    if not args.stack and not args.stack_file:
        raise UserError("name a stack: --stack S (or --stack-file FILE)")
    fleet = load_fleet(args.stack, stack_file=args.stack_file, stacks_dir=args.stacks_dir,
                       state_dir=args.state_dir, hosts_file=args.inventory_hosts)
    inventory_path = fleet.write_inventory()
    known = nodes_of(fleet.inventory)
    for host in args.limit:
        if host not in known:
            raise UserError(f"--limit {host}: no such node; nodes: {', '.join(known)}")

    extravars: dict[str, object] = {}
    limit = ",".join(args.limit) or None
    if args.playbook == "drain":
        workers = nodes_of(fleet.inventory, WORKERS)
        if not args.limit or any(h not in workers for h in args.limit):
            raise UserError(f"drain needs --limit with the workers to drain; workers: {', '.join(workers)}")
        extravars["drain_nodes"] = list(args.limit)
        # The gateways take part: they stop routing to the drained workers first.
        limit = ",".join(nodes_of(fleet.inventory, GATEWAYS) + list(args.limit))
    elif args.playbook == "bootstrap" and args.limit:
        # A worker joins through the gateways: their routing file must list it, and the play
        # that writes it runs on them.
        limit = ",".join(dict.fromkeys(nodes_of(fleet.inventory, GATEWAYS) + list(args.limit)))
    elif args.playbook == "rotate-keys":
        if args.limit:
            raise UserError("rotate-keys rotates every node's key at once; it takes no --limit")
        next_file = mesh_keys.prepare_rotation(fleet.keys_file, [n.name for n in fleet.plan.mesh])
        extravars["mesh_keys_file"] = str(next_file)

    result = run_playbook(args.playbook, inventory=inventory_path, private_data_dir=fleet.ansible_dir,
                          limit=limit, extravars=extravars, timeout=args.timeout)
    if args.playbook == "rotate-keys" and result.ok:
        mesh_keys.promote(fleet.keys_file)
    print_summary(result, as_json=args.json)
    return 0 if result.ok else 1


def print_summary(result: PlaybookResult, *, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(result.to_json(), indent=1))
        return
    width = max([len(h) for h in result.hosts] + [4])
    print(f"{result.playbook}: {result.status}")
    print(f"  {'host':<{width}}  {'ok':>4} {'changed':>7} {'failed':>6} {'unreachable':>11} {'skipped':>7}")
    for host, s in sorted(result.hosts.items()):
        print(f"  {host:<{width}}  {s.ok:>4} {s.changed:>7} {s.failed:>6} {s.unreachable:>11} {s.skipped:>7}")
    for f in result.failures:
        print(f"  FAILED {f.host}: {f.task}: {f.message}", file=sys.stderr)
    if not result.ok:
        print(f"  (full log: {result.artifact_dir}/stdout)", file=sys.stderr)
