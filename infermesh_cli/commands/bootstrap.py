"""`infermesh bootstrap`: run the bootstrap, drain or rotate-keys playbook against a stack's hosts.

The inventory is generated from the plan and the lease outputs (fleet/inventory.py) into
.infermesh/<stack>/ansible, ansible-runner's private data dir; the summary is per host.
Exit status: 0 when every host succeeded, 1 when any failed or was unreachable.

A Pulumi-managed stack (docs/mesh.md): ``--from-pulumi`` first reads the stack's outputs
(``pulumi stack output --json --show-secrets``) and writes the hosts file (``ansible_inventory``:
the SSH leases, and the gateways as Kubernetes pods) and the mesh key file (``mesh_keys``, 0600,
with its source marker), so the SSH hosts get the keys the gateway pods hold: one key source.
Such a stack's keys are rotated by Pulumi (``mesh.rotation``), never by ``--playbook rotate-keys``.
"""

from __future__ import annotations

import argparse
import binascii
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from fleet import mesh_keys
from fleet.paths import write_private
from fleet.ansible_run import PLAYBOOKS, PlaybookResult, run_playbook
from infermesh_cli import pulumi_cli
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
    p.add_argument("--from-pulumi", action="store_true",
                   help="first write the hosts file and the mesh key file from the Pulumi stack's outputs "
                        "(`pulumi stack output --json --show-secrets`): the keys of a Pulumi-managed stack")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stack", help="stack name (stacks/Pulumi.<stack>.yaml)")
    p.add_argument("--stacks-dir", type=Path, help="folder holding Pulumi.<stack>.yaml (default stacks/)")
    p.add_argument("--stack-file", type=Path, help="a stack file outside stacks/ (tests, reviews)")
    p.add_argument("--inventory-hosts", type=Path, metavar="FILE",
                   help="the lease outputs: node -> SSH address (default .infermesh/<stack>/hosts.yaml)")
    p.add_argument("--state-dir", type=Path, help="controller state for the stack (default .infermesh/<stack>)")


def stack_name(args: argparse.Namespace) -> str:
    if args.stack:
        return str(args.stack)
    return str(args.stack_file.name.removeprefix("Pulumi.").removesuffix(".yaml"))


def rotate_with_pulumi(stack: str, source: str) -> UserError:
    return UserError(f"rotate-keys: stack {stack}'s mesh keys come from {source} (the gateway pods hold them too); "
                     "new keys made here would split the mesh. Rotate them with Pulumi: raise `mesh.rotation` in "
                     f"stacks/Pulumi.{stack}.yaml, `pulumi up --stack {stack}`, then `infermesh bootstrap --stack "
                     f"{stack} --from-pulumi`")


def drain_through_the_stack(what: str, stack: str) -> UserError:
    """A drain where the gateways are Kubernetes pods: they route by the stack's ConfigMap, which only Pulumi writes."""
    return UserError(f"{what}: the gateways are Kubernetes pods, which route by the Pulumi stack's ConfigMap, not by "
                     "a routing file on a host; take the workers out through the stack (`infermesh failover drain "
                     f"PROVIDER --stack {stack}`, or the pool's role) and `pulumi up`")


def run(args: argparse.Namespace) -> int:
    if not args.stack and not args.stack_file:
        raise UserError("name a stack: --stack S (or --stack-file FILE)")
    from fleet.paths import state_dir as default_state_dir

    stack = stack_name(args)
    state = args.state_dir or default_state_dir(stack)
    keys_file = state / "mesh-keys.json"
    if args.playbook == "rotate-keys":
        if args.from_pulumi:
            raise rotate_with_pulumi(stack, f"Pulumi stack {stack}")
        try:
            source = mesh_keys.read_source(keys_file)
        except ValueError as e:
            raise UserError(str(e)) from None
        if source is not None:
            raise rotate_with_pulumi(stack, source)
    if args.from_pulumi:
        hosts_path = args.inventory_hosts or state / "hosts.yaml"
        write_from_pulumi(stack, pulumi_outputs(stack), hosts_path, keys_file)
    fleet = load_fleet(args.stack, stack_file=args.stack_file, stacks_dir=args.stacks_dir,
                       state_dir=state, hosts_file=args.inventory_hosts)
    inventory_path = fleet.write_inventory()
    known = nodes_of(fleet.inventory)
    for host in args.limit:
        if host not in known:
            raise UserError(f"--limit {host}: no such node; nodes: {', '.join(known)}")

    extravars: dict[str, object] = {}
    limit = ",".join(args.limit) or None
    if args.playbook == "drain":
        if fleet.hosts.kubernetes_gateways:
            raise drain_through_the_stack("drain", stack)
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


# ---- --from-pulumi: the hosts file and the key file from the stack's outputs ---------------------------------

def pulumi_outputs(stack: str) -> dict[str, Any]:
    """The stack's outputs, secrets shown (`pulumi stack output --json --show-secrets`). Raises UserError in one
    line; never with the output's text in it (it holds private keys)."""
    what = f"`pulumi stack output --stack {stack} --json --show-secrets`"
    if not pulumi_cli.available():
        raise UserError(f"--from-pulumi reads {what}, and there is no `pulumi` on PATH: install the Pulumi CLI "
                        "(https://www.pulumi.com/docs/iac/download-install/) and log in to the stack's backend")
    outputs = pulumi_cli.run_json(["stack", "output", "--stack", stack, "--json", "--show-secrets"])
    if not isinstance(outputs, dict):
        raise UserError(f"{what} printed a JSON {type(outputs).__name__}, not the stack's outputs (an object)")
    return outputs


def _rerun(stack: str) -> str:
    return f"run `pulumi up --stack {stack}` with this version of the program first"


def hosts_from_outputs(stack: str, outputs: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The hosts file (fleet/inventory.py) from the `ansible_inventory` output; the operator's own settings of the
    `previous` file (ssh_known_hosts, ssh_private_key_file, vars, a host's vars) are kept."""
    inv = outputs.get("ansible_inventory")
    if inv is None:
        raise UserError(f"stack {stack} has no `ansible_inventory` output (the SSH hosts' addresses): {_rerun(stack)}")
    if not isinstance(inv, dict) or not isinstance(inv.get("hosts"), dict):
        raise UserError(f"stack {stack}: the `ansible_inventory` output has no `hosts` mapping: {_rerun(stack)}")
    k8s = inv.get("kubernetes_gateways")
    if not isinstance(k8s, dict) or not k8s:
        raise UserError(f"stack {stack}: the `ansible_inventory` output lacks `kubernetes_gateways` (where the "
                        f"workers dial the gateway pods): {_rerun(stack)}")
    given = previous.get("hosts")
    old_hosts: dict[str, Any] = given if isinstance(given, dict) else {}
    hosts: dict[str, Any] = {}
    for name, entry in inv["hosts"].items():
        if not isinstance(entry, dict):
            raise UserError(f"stack {stack}: ansible_inventory.hosts.{name} is not a mapping: {_rerun(stack)}")
        entry = dict(entry)
        kept = old_hosts.get(name)
        if isinstance(kept, dict) and kept.get("vars"):
            entry["vars"] = kept["vars"]
        hosts[str(name)] = entry
    doc: dict[str, Any] = {k: previous[k] for k in ("ssh_known_hosts", "ssh_private_key_file", "vars")
                           if previous.get(k)}
    doc.update(hosts=hosts, kubernetes_gateways={str(k): v for k, v in k8s.items()})
    return doc


def keys_from_outputs(stack: str, outputs: dict[str, Any]) -> dict[str, mesh_keys.KeyPair]:
    """The key file (fleet/mesh_keys.py) from the `mesh_keys` output, each pair checked (its public key is its
    private key's). Errors name the node, never a key."""
    keys = outputs.get("mesh_keys")
    if keys is None:
        raise UserError(f"stack {stack} has no `mesh_keys` output (the mesh's keys, a secret): {_rerun(stack)}")
    if keys == "[secret]":
        raise UserError(f"stack {stack}: the `mesh_keys` output came back hidden ([secret]); it is read with "
                        "--show-secrets, which needs the stack's secrets provider (passphrase or key) here")
    if not isinstance(keys, dict) or not keys:
        raise UserError(f"stack {stack}: the `mesh_keys` output is not node -> {{private_key, public_key}}")
    out: dict[str, mesh_keys.KeyPair] = {}
    for node, pair in keys.items():
        if not isinstance(pair, dict) or not isinstance(pair.get("private_key"), str) \
                or not isinstance(pair.get("public_key"), str):
            raise UserError(f"stack {stack}: mesh_keys.{node} is not {{private_key, public_key}}")
        try:
            ok = mesh_keys.public_key(pair["private_key"]) == pair["public_key"]
        except (ValueError, binascii.Error):
            ok = False
        if not ok:
            raise UserError(f"stack {stack}: mesh_keys.{node} is not a WireGuard key pair (its public key is not "
                            "its private key's)")
        out[str(node)] = {"private_key": pair["private_key"], "public_key": pair["public_key"]}
    return out


def write_from_pulumi(stack: str, outputs: dict[str, Any], hosts_path: Path, keys_file: Path) -> None:
    """Write the key file (0600, with its source marker) and the hosts file from the stack's outputs."""
    keys = keys_from_outputs(stack, outputs)
    try:
        previous = yaml.safe_load(hosts_path.read_text()) or {}
    except FileNotFoundError:
        previous = {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{hosts_path}: unreadable ({type(e).__name__}); move it away and run again") from None
    hosts = hosts_from_outputs(stack, outputs, previous if isinstance(previous, dict) else {})
    mesh_keys.write(keys_file, keys)
    mesh_keys.mark_source(keys_file, mesh_keys.PULUMI, stack)
    write_private(hosts_path, yaml.safe_dump(hosts, sort_keys=False))
    print(f"from Pulumi stack {stack}: {hosts_path} ({len(hosts['hosts'])} SSH hosts, "
          f"{len(hosts['kubernetes_gateways'])} gateway pods), {keys_file} ({len(keys)} key pairs, owner-only)",
          file=sys.stderr)


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
