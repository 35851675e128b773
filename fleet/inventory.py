"""The Ansible inventory and variables, generated from the plan and the lease outputs.

Nothing here is hand-written: the plan says which nodes exist, their roles, mesh addresses,
peers, models and GPU requirements; the *hosts file* (the lease outputs) says only where each
node answers SSH. The result is a YAML/JSON inventory with two groups, ``gateways`` and
``workers``, whose host variables are the roles' inputs (see playbooks/roles/*/meta/argument_specs.yml).

The hosts file (YAML or JSON), as the lease step records it::

    ssh_known_hosts: /path/known_hosts   # optional: pinned host keys (strict checking stays on)
    ssh_private_key_file: /path/id       # optional: the controller's key for every host
    vars: {}                             # optional: operator overrides for every host
    hosts:
      gateway-0:
        ssh_host: 203.0.113.5
        ssh_port: 22                     # default 22
        ssh_user: root                   # default root
        mesh_endpoint: 203.0.113.5       # optional: where peers dial this node's WireGuard port
        vars: {}                         # optional: overrides for this host only
    kubernetes_gateways:                 # optional: gateways that are Kubernetes pods, not SSH hosts
      gateway-1: gateway-1.mesh.api.example.com     # where workers dial its WireGuard port

Only SSH-connected nodes are bootstrapped: the SSH-host gateways and the leases whose pool says
``connection: ssh``. A Pulumi-managed stack's gateways are Kubernetes pods (fleet/components/gateway.py):
``infermesh bootstrap --from-pulumi`` writes them under ``kubernetes_gateways`` (the stack's
``ansible_inventory`` output), so the workers dial them at their mesh names and no play runs on them;
their peer lists come from Pulumi (the pods' ConfigMap), their keys from the same Pulumi keys the
controller's key file then holds (fleet/mesh_keys.py).

Container leases run the worker image and are not Ansible's business, and an SSH gateway does
not route to them: they are reached on mutual TLS at the port their marketplace forwards, an
address only the lease outputs hold, with material the Kubernetes gateways mount
(fleet/components/gateway.py). The routing an SSH gateway gets (``routing_config``) leaves those
endpoints out rather than carry a placeholder address; ``routing_left_out`` names them and the
routing role says so.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleet import launch
from fleet.plan import WORKER_PORT, Lease, MeshNode, Plan
from fleet.spec import Spec, SpecError

GATEWAYS, WORKERS = "gateways", "workers"
_IFNAME = re.compile(r"^[A-Za-z0-9_=+.-]{1,15}$")
# Disk a worker needs beyond its weights (image layers, logs, caches), GiB.
WORKER_DISK_OVERHEAD_GB = launch.DISK_OVERHEAD_GB      # the plan's (fleet/launch.py disk_gb)
SIM_WORKER_DISK_GB = 1
GATEWAY_ADMIN_TOKEN_FILE = "/var/lib/infermesh/gateway/admin.token"


class InventoryError(SpecError):
    """The plan and the hosts file do not fit together; the message names the node."""


@dataclass(frozen=True)
class HostAddress:
    """Where one node answers SSH (from the lease outputs)."""

    ssh_host: str
    ssh_port: int = 22
    ssh_user: str = "root"
    mesh_endpoint: str | None = None
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostsFile:
    hosts: dict[str, HostAddress]
    ssh_known_hosts: str | None = None
    ssh_private_key_file: str | None = None
    vars: dict[str, Any] = field(default_factory=dict)
    kubernetes_gateways: dict[str, str] = field(default_factory=dict)
    """Gateway node -> the host name its WireGuard port answers at (a Kubernetes pod, not an SSH host)."""


def load_hosts(path: Path) -> HostsFile:
    """Read the hosts file; a malformed entry raises InventoryError naming it."""
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InventoryError(f"{path}: no hosts file (the lease outputs: node -> SSH address)") from None
    except yaml.YAMLError as e:
        raise InventoryError(f"{path}: not valid YAML/JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), dict):
        raise InventoryError(f"{path}: expected a mapping with `hosts:` (node name -> ssh_host, ssh_port, ...)")
    hosts: dict[str, HostAddress] = {}
    known = {"ssh_host", "ssh_port", "ssh_user", "mesh_endpoint", "vars"}
    for name, entry in doc["hosts"].items():
        if isinstance(entry, str):
            entry = {"ssh_host": entry}
        if not isinstance(entry, dict) or "ssh_host" not in entry:
            raise InventoryError(f"{path}: hosts.{name}: needs ssh_host")
        unknown = set(entry) - known
        if unknown:
            raise InventoryError(f"{path}: hosts.{name}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        port = entry.get("ssh_port", 22)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise InventoryError(f"{path}: hosts.{name}.ssh_port: not a port number: {port!r}")
        hosts[str(name)] = HostAddress(
            ssh_host=str(entry["ssh_host"]), ssh_port=port, ssh_user=str(entry.get("ssh_user", "root")),
            mesh_endpoint=entry.get("mesh_endpoint"), vars=dict(entry.get("vars") or {}),
        )
    k8s = doc.get("kubernetes_gateways") or {}
    if not isinstance(k8s, dict) or not all(isinstance(v, str) and v for v in k8s.values()):
        raise InventoryError(f"{path}: kubernetes_gateways: expected gateway node -> host name (where workers "
                             "dial its WireGuard port)")
    both = sorted(set(k8s) & set(hosts))
    if both:
        raise InventoryError(f"{path}: {', '.join(both)}: under both hosts (an SSH host) and kubernetes_gateways "
                             "(a pod); a gateway is one or the other")
    return HostsFile(hosts=hosts, ssh_known_hosts=doc.get("ssh_known_hosts"),
                     ssh_private_key_file=doc.get("ssh_private_key_file"), vars=dict(doc.get("vars") or {}),
                     kubernetes_gateways={str(k): v for k, v in k8s.items()})


def interface_name(node: str) -> str:
    """A WireGuard interface name unique per node (Linux allows 15 characters).

    Unique names matter where several nodes share one kernel's /var/run/wireguard (hosts in
    network namespaces); on a real host it is just a readable name.
    """
    name = f"wg-{node}"
    if _IFNAME.match(name):
        return name
    return "wg-" + hashlib.sha256(node.encode()).hexdigest()[:12]


def keyed_nodes(plan: Plan) -> list[MeshNode]:
    """The nodes whose keys the playbooks read: every gateway (SSH host or pod), and the workers on SSH leases."""
    ssh_leases = {x.name for x in plan.leases if x.connection == "ssh"}
    return [n for n in plan.mesh if n.role == "gateway" or n.name in ssh_leases]


def bootstrapped_nodes(plan: Plan, kubernetes_gateways: Collection[str] = ()) -> list[MeshNode]:
    """The mesh nodes Ansible manages: the keyed nodes but the gateways on Kubernetes."""
    return [n for n in keyed_nodes(plan) if n.name not in kubernetes_gateways]


def endpoint_id(lease: Lease) -> str:
    """The worker's id in the gateway's routing config (fleet.routing: "<pool>/<replica>")."""
    return f"{lease.pool}/{lease.replica}"


def build_inventory(spec: Spec, plan: Plan, hosts: HostsFile, *, keys_file: Path,
                    worker_port: int = WORKER_PORT) -> dict[str, Any]:
    """The inventory as a dict (dump it as YAML or JSON). Raises InventoryError."""
    k8s = hosts.kubernetes_gateways
    plan_gateways = [n.name for n in plan.mesh if n.role == "gateway"]
    stray = sorted(set(k8s) - set(plan_gateways))
    if stray:
        raise InventoryError(f"hosts file: kubernetes_gateways names {', '.join(stray)}, which the plan does not "
                             f"have as a gateway; plan gateways: {', '.join(plan_gateways) or 'none'}")
    nodes = bootstrapped_nodes(plan, k8s)
    by_name = {n.name: n for n in plan.mesh}
    missing = [n.name for n in nodes if n.name not in hosts.hosts]
    if missing:
        raise InventoryError(f"no SSH address for {', '.join(missing)} in the hosts file "
                             f"(the lease outputs); known: {', '.join(sorted(hosts.hosts)) or 'none'}")
    unknown = sorted(set(hosts.hosts) - {n.name for n in plan.mesh})
    if unknown:
        raise InventoryError(f"hosts file names {', '.join(unknown)}, which the plan does not have; "
                             f"plan nodes: {', '.join(n.name for n in plan.mesh)}")
    if not plan_gateways:
        raise InventoryError("the plan has no gateway node")
    if not nodes:
        raise InventoryError("nothing to bootstrap: every gateway is a Kubernetes pod (kubernetes_gateways) and no "
                             "pool has `connection: ssh`")

    network = ipaddress.ip_network(spec.mesh.cidr)
    leases = {x.name: x for x in plan.leases}

    def mesh_endpoint(name: str) -> str | None:
        addr = hosts.hosts.get(name)
        if name in k8s:
            host = k8s[name]
        elif addr is None:
            return None
        else:
            host = addr.mesh_endpoint or addr.ssh_host
        return f"[{host}]:{spec.mesh.port}" if ":" in host else f"{host}:{spec.mesh.port}"

    def peers(node: MeshNode) -> list[dict[str, Any]]:
        out = []
        for peer_name in node.peers:
            peer = by_name[peer_name]
            entry: dict[str, Any] = {"name": peer.name, "address": peer.address, "keepalive": 0}
            if node.role == "worker":
                # Workers may sit behind NAT: they dial the gateways and keep the path open.
                endpoint = mesh_endpoint(peer.name)
                if endpoint is None:
                    raise InventoryError(f"gateway {peer.name} has no address in the hosts file; "
                                         f"worker {node.name} cannot dial it")
                entry["endpoint"] = endpoint
                entry["keepalive"] = spec.mesh.keepalive_s
            else:
                # Gateways learn a worker's endpoint from its handshake; a known one is a hint.
                given = hosts.hosts.get(peer.name)
                if given is not None and given.mesh_endpoint:
                    entry["endpoint"] = mesh_endpoint(peer.name)
            out.append(entry)
        return out

    gateway_names = [n.name for n in nodes if n.role == "gateway"]
    groups: dict[str, dict[str, Any]] = {GATEWAYS: {}, WORKERS: {}}
    for node in nodes:
        addr = hosts.hosts[node.name]
        hv: dict[str, Any] = {
            "ansible_host": addr.ssh_host,
            "ansible_port": addr.ssh_port,
            "ansible_user": addr.ssh_user,
            "mesh_node": node.name,
            "mesh_role": node.role,
            "mesh_address": node.address,
            "mesh_prefix_len": network.prefixlen,
            "mesh_interface": interface_name(node.name),
            "mesh_listen_port": spec.mesh.port,
            "mesh_peers": peers(node),
        }
        if node.role == "gateway":
            hv["preflight_gpu_type"] = ""
            hv["preflight_min_disk_gb"] = SIM_WORKER_DISK_GB
            # Where the playbooks ask this gateway what it sees (from the gateway host itself).
            hv["gateway_url"] = f"http://127.0.0.1:{spec.gateway.port}"
            hv["gateway_admin_token_file"] = GATEWAY_ADMIN_TOKEN_FILE
        else:
            lease = leases[node.name]
            pool = spec.pool(lease.pool)
            model = spec.model(lease.model)
            vram = spec.vram_gb(lease.gpu_type) or 0
            hv.update({
                "preflight_gpu_type": "" if lease.gpu_type == "cpu" else lease.gpu_type,
                "preflight_gpu_count": lease.gpu_count,
                "preflight_vram_gb": vram,
                "preflight_min_disk_gb": launch.disk_gb(spec, pool) if vram else SIM_WORKER_DISK_GB,
                "worker_pool": lease.pool,
                "worker_endpoint_id": endpoint_id(lease),
                "worker_model": model.id,
                "worker_weights": model.weights,
                "worker_weights_revision": model.revision,
                "worker_weights_sha256": model.sha256 or "",
                "worker_image": lease.image or "",
                "worker_port": worker_port,
                "worker_max_concurrency": pool.max_concurrency,
                "worker_max_model_len": pool.max_model_len or model.context_length,
                # the plan's launch (fleet/launch.py): SSH hosts are on the WireGuard channel, no TLS flags
                "worker_engine_args": launch.serving_flags(spec, pool, lease.gpu_count, None),
            })
            if gateway_names:       # an SSH-host gateway to ask whether it routes to the worker (not a pod)
                hv["worker_gateway_host"] = gateway_names[0]
            sim = pool.sim
            if sim is not None:
                hv["worker_sim_args"] = {"ttft_ms": sim.ttft_ms, "itl_ms": sim.itl_ms,
                                         "output_tokens": sim.output_tokens}
        hv.update(addr.vars)
        if not _IFNAME.match(str(hv["mesh_interface"])):
            raise InventoryError(f"hosts.{node.name}.vars.mesh_interface: {hv['mesh_interface']!r} is not a "
                                 "valid interface name (1-15 of A-Z a-z 0-9 _ = + . -)")
        groups[GATEWAYS if node.role == "gateway" else WORKERS][node.name] = hv

    routing, left_out = ssh_gateway_routing(plan.routing)
    all_vars: dict[str, Any] = {
        "ansible_python_interpreter": "auto_silent",
        "infermesh_stack": spec.stack,
        "mesh_keys_file": str(keys_file),
        "preflight_allow_sim": spec.allow_sim_workers,
        "routing_config": routing,
        "routing_left_out": left_out,
    }
    if k8s:
        all_vars["mesh_kubernetes_gateways"] = sorted(k8s)
    ssh_args = []
    if hosts.ssh_known_hosts:
        ssh_args += [f"-o UserKnownHostsFile={hosts.ssh_known_hosts}", "-o StrictHostKeyChecking=yes"]
    if ssh_args:
        all_vars["ansible_ssh_common_args"] = " ".join(ssh_args)
    if hosts.ssh_private_key_file:
        all_vars["ansible_ssh_private_key_file"] = hosts.ssh_private_key_file
    all_vars.update(hosts.vars)
    return {"all": {"vars": all_vars, "children": {
        GATEWAYS: {"hosts": groups[GATEWAYS]},
        WORKERS: {"hosts": groups[WORKERS]},
    }}}


def ssh_gateway_routing(routing: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The plan's routing as an SSH gateway can use it: without the mutual-TLS endpoints (container
    leases, whose address the plan does not know: see the module's text). Returns it and their ids."""
    left_out: list[str] = []
    models = []
    for model in routing.get("models", []):
        pools = []
        for pool in model.get("pools", []):
            keep = [ep for ep in pool.get("endpoints", []) if ep.get("channel") != "mtls"]
            left_out += [ep["id"] for ep in pool.get("endpoints", []) if ep.get("channel") == "mtls"]
            pools.append({**pool, "endpoints": keep})
        models.append({**model, "pools": pools})
    return {**routing, "models": models}, left_out


def write_inventory(inventory: dict[str, Any], path: Path) -> Path:
    """JSON is YAML: Ansible's yaml inventory plugin reads it, and it diffs cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(inventory, indent=1, sort_keys=True) + "\n")
    return path


def host_vars(inventory: dict[str, Any], node: str) -> dict[str, Any]:
    """One host's variables, group vars included (what Fabric needs to reach and inspect it)."""
    all_ = inventory["all"]
    for group in all_["children"].values():
        if node in group["hosts"]:
            return {**all_["vars"], **group["hosts"][node]}
    raise InventoryError(f"no node {node!r} in the inventory; nodes: {', '.join(nodes_of(inventory))}")


def nodes_of(inventory: dict[str, Any], group: str | None = None) -> list[str]:
    children = inventory["all"]["children"]
    names: list[str] = []
    for gname, g in children.items():
        if group is None or gname == group:
            names.extend(g["hosts"])
    return names


# ---- one stack's fleet, as the bootstrap and ops commands see it -----------------------------


@dataclass
class Fleet:
    """A stack's spec, plan, hosts and generated inventory, with the controller's state dir."""

    spec: Spec
    plan: Plan
    state_dir: Path
    hosts: HostsFile
    keys_file: Path
    inventory: dict[str, Any]

    @property
    def ansible_dir(self) -> Path:
        return self.state_dir / "ansible"

    def write_inventory(self) -> Path:
        return write_inventory(self.inventory, self.ansible_dir / "inventory" / "hosts.json")


def load_fleet(stack: str | None, *, stack_file: Path | None = None, stacks_dir: Path | None = None,
               state_dir: Path | None = None, hosts_file: Path | None = None, ensure_keys: bool = True) -> Fleet:
    """Spec -> plan -> inventory for one stack. Raises SpecError / InventoryError with one message.

    stack_file: a stack file outside stacks/ (its stack name is taken from ``Pulumi.<name>.yaml``).
    stacks_dir: the folder holding ``Pulumi.<stack>.yaml`` (default stacks/).
    state_dir: the controller's state for the stack (default fleet.paths.state_dir: .infermesh/<stack>).
    hosts_file: the lease outputs (default <state_dir>/hosts.yaml).
    """
    from fleet import mesh_keys
    from fleet.paths import state_dir as default_state_dir
    from fleet.plan import build_plan
    from fleet.spec import load, parse, read_config

    if stack_file is not None:
        name = stack or stack_file.name.removeprefix("Pulumi.").removesuffix(".yaml")
        spec = parse(read_config(stack_file), name, source=str(stack_file))
    elif stack:
        spec = load(stack, stacks_dir)
    else:
        raise InventoryError("name a stack (--stack) or a stack file (--stack-file)")
    plan = build_plan(spec)
    state = state_dir or default_state_dir(spec.stack)
    hosts = load_hosts(hosts_file or state / "hosts.yaml")
    keys_file = state / "mesh-keys.json"
    try:
        source = mesh_keys.read_source(keys_file)
    except ValueError as e:
        raise InventoryError(str(e)) from None
    if source is not None:
        # Pulumi's keys (`bootstrap --from-pulumi`): never made here, or the SSH hosts and the pods would hold two sets
        have = mesh_keys.read(keys_file)
        missing = [n.name for n in keyed_nodes(plan) if n.name not in have]
        if missing:
            raise InventoryError(f"{keys_file}: the mesh keys from {source} have none for {', '.join(missing)}; run "
                                 f"`pulumi up --stack {spec.stack}`, then `infermesh bootstrap --stack {spec.stack} "
                                 "--from-pulumi`")
    elif hosts.kubernetes_gateways:
        raise InventoryError(f"the gateways {', '.join(sorted(hosts.kubernetes_gateways))} are Kubernetes pods holding "
                             f"the Pulumi stack's mesh keys, and {keys_file} is not from it: run `infermesh bootstrap "
                             f"--stack {spec.stack} --from-pulumi`")
    elif ensure_keys:
        mesh_keys.ensure(keys_file, [n.name for n in plan.mesh])
    inventory = build_inventory(spec, plan, hosts, keys_file=keys_file)
    return Fleet(spec=spec, plan=plan, state_dir=state, hosts=hosts, keys_file=keys_file, inventory=inventory)
