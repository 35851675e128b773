"""WorkerFleet: the plan's GPU leases as GpuLease resources, and the SSH ones as an Ansible hosts file.

Container leases run the worker image (vLLM behind the entrypoint that sets up the channel and
checks the weights) with the launch the plan decided (fleet/launch.py). SSH leases are rented the
same way but run nothing of ours yet: their addresses are exported in the hosts-file shape
``infermesh bootstrap`` reads (fleet/inventory.py), and Ansible bootstraps them over SSH.

The channel (fleet/kinds.py): a marketplace container cannot start WireGuard, so its worker
publishes vLLM's port (the marketplace forwards it) and serves mutual TLS there, the gateways'
client certificate required. Its key never leaves the container: the lease gets the stack CA (its
key a secret input, its certificate public) and the endpoint name, and the lease provider signs the
certificate request of the key the worker made at boot (fleet/marketplaces/worker_tls.py). SSH
hosts join the WireGuard mesh (UDP published where the marketplace forwards UDP) and serve on
their mesh address only; their WireGuard key is never in the lease (the marketplace would store
it): Ansible writes it over SSH, from the stack's ``mesh_keys`` output (docs/mesh.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

import pulumi

from fleet.channel import worker_server_name
from fleet.components.lease import GpuLease
from fleet.kinds import UDP_KINDS
from fleet.launch import WorkerLaunch, worker_launch
from fleet.plan import WORKER_PORT, Lease

__all__ = ["WorkerFleet", "WorkerFleetArgs", "WorkerLaunch", "inventory", "pace", "worker_launch"]

UDP_CAPABLE = UDP_KINDS      # marketplaces that forward a UDP port (fleet/kinds.py)


class WorkerFleetArgs(TypedDict):
    leases: Sequence[Lease]
    """The plan's leases."""
    launches: Mapping[str, WorkerLaunch]
    """Per lease name, what it runs (``worker_launch``)."""
    credentials: Mapping[str, str]
    """Per provider name, the name of its stack secret (never the key)."""
    mesh_port: int
    """WireGuard's UDP port."""
    default_image: NotRequired[pulumi.Input[str]]
    """The built worker image, for leases whose pool pins none."""
    base_urls: NotRequired[Mapping[str, str]]
    """Per provider kind, an API base URL other than the adapter's."""
    surge: NotRequired[Mapping[str, int]]
    """Per pool, how many of its leases are replaced at a time (default 1)."""
    registry: NotRequired[Mapping[str, pulumi.Input[str]]]
    """Per provider name, private-registry access for the worker image (secret)."""
    tls: NotRequired[Mapping[str, pulumi.Input[Any]]]
    """For the mTLS leases: the ``stack`` (their names), the stack CA's ``ca`` certificate and ``ca_key``
    (secret; fleet/components/certs.py), and the workers' certificate ``days`` and ``renew_days``."""


def pace(leases: Sequence[Lease], surge: Mapping[str, int]) -> dict[str, str | None]:
    """Lease name -> the lease of the same pool it waits for (``depends_on``), or None.

    Within a pool, lease i waits for lease i - surge: the engine registers a lease only after the one
    it depends on has finished its step, so at most ``surge`` of a pool's leases are being rented (or
    replaced) at once. A replacement is created before the old lease is deleted (GpuLease), and the
    engine deletes replaced resources after the update's other steps, so a pool never has fewer
    running leases than its replicas while it is replaced (docs/leases.md)."""
    by_pool: dict[str, list[Lease]] = {}
    for lease in leases:
        by_pool.setdefault(lease.pool, []).append(lease)
    after: dict[str, str | None] = {}
    for pool, members in by_pool.items():
        members = sorted(members, key=lambda x: x.replica)
        step = max(int(surge.get(pool, 1)), 1)
        for i, lease in enumerate(members):
            after[lease.name] = members[i - step].name if i >= step else None
    return after


class WorkerFleet(pulumi.ComponentResource):
    inventory: pulumi.Output[dict[str, Any]]
    leases: dict[str, GpuLease]
    endpoints: dict[str, pulumi.Output[list[Any]]]      # mTLS lease -> [forwarded host, port]

    def __init__(self, name: str, args: WorkerFleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:WorkerFleet", name, None, opts)
        self.leases = {}
        waits_for = pace(args["leases"], args.get("surge", {}))
        for lease in sorted(args["leases"], key=lambda x: (x.pool, x.replica)):
            launch = args["launches"][lease.name]
            image = lease.image or args.get("default_image")
            if image is None:
                raise ValueError(f"WorkerFleet: lease {lease.name} has no image (pool {lease.pool}.image) and no "
                                 "built worker image was given")
            channel: dict[str, Any] = {}
            env = dict(launch["env"])      # nothing secret: a marketplace stores what a lease is given
            if launch["channel"] == "mtls":
                # the API port, forwarded by the marketplace (the lease's endpoint): TLS with client certificates,
                # the certificate issued by the lease provider for the key the worker makes itself
                ports = [f"{WORKER_PORT}/tcp"]
                tls = args.get("tls")
                if not tls:
                    raise ValueError(f"WorkerFleet: lease {lease.name} is on the mtls channel and there is no stack CA")
                # (the CA certificate and the one-time token are added at create, by the lease provider)
                channel = {"tls_name": worker_server_name(tls["stack"], lease.name), "tls_ca": tls["ca"],
                           "tls_ca_key": tls["ca_key"], "tls_days": tls["days"], "tls_renew_days": tls["renew_days"]}
            else:
                # WireGuard (SSH hosts): no key in the lease; Ansible's mesh role writes the host's config over SSH
                # (`infermesh bootstrap --from-pulumi`, with this stack's keys: docs/mesh.md)
                ports = [f"{args['mesh_port']}/udp"] if lease.provider_kind in UDP_CAPABLE else []
            if lease.connection == "ssh":
                ports.append("22/tcp")
            self.leases[lease.name] = GpuLease(lease.name, {
                "provider_kind": lease.provider_kind,
                "credentials": args["credentials"][lease.provider],
                "gpu_type": lease.gpu_type, "gpu_count": lease.gpu_count, "region": lease.region,
                "countries": list(launch["countries"]), "image": image, "price_cap": lease.price_cap,
                "price_per_gpu_hour": lease.price_per_gpu_hour,
                "args": list(launch["args"]) if lease.connection == "container" else [],
                "env": env, "ports": ports, "disk_gb": launch["disk_gb"], "connection": lease.connection,
                **({"base_url": args["base_urls"][lease.provider_kind]}
                   if lease.provider_kind in args.get("base_urls", {}) else {}),
                **({"registry": args["registry"][lease.provider]}
                   if lease.provider in args.get("registry", {}) else {}),
                **channel,
                **({"ssh_keys": list(launch["ssh_keys"])} if launch.get("ssh_keys") else {}),
            }, pulumi.ResourceOptions(parent=self, depends_on=[self.leases[w]] if (w := waits_for[lease.name]) else []))
        ssh = [x for x in args["leases"] if x.connection == "ssh"]
        self.inventory = pulumi.Output.all(*[
            pulumi.Output.all(self.leases[x.name].ssh_host, self.leases[x.name].ssh_port, self.leases[x.name].ssh_user,
                              self.leases[x.name].endpoint_host)
            for x in ssh
        ]).apply(lambda rows: inventory(ssh, rows))
        self.endpoints = {n: pulumi.Output.all(g.endpoint_host, g.endpoint_port)
                          for n, g in self.leases.items() if args["launches"][n]["channel"] == "mtls"}
        self.register_outputs({"inventory": self.inventory,
                               "lease_ids": {n: g.lease_id for n, g in self.leases.items()}})


    def routing(self, routing: Mapping[str, Any], tls_dir: str) -> pulumi.Output[dict[str, Any]]:
        """The plan's routing with each mTLS endpoint at its lease's forwarded address (known once
        rented) and ``tls_dir`` where the gateways find the channel's material."""
        names = sorted(self.endpoints)
        return pulumi.Output.all(*[self.endpoints[n] for n in names]).apply(
            lambda addrs: with_endpoints(routing, dict(zip(names, addrs, strict=True)), tls_dir))


def with_endpoints(routing: Mapping[str, Any], addrs: Mapping[str, Sequence[Any]], tls_dir: str) -> dict[str, Any]:
    """A copy of `routing` whose mTLS endpoints (id ``<pool>/<i>``, lease ``<pool>-<i>``) point at `addrs`."""
    import copy
    out = copy.deepcopy(dict(routing))
    out["tls_dir"] = tls_dir
    for m in out["models"]:
        for p in m["pools"]:
            for e in p["endpoints"]:
                lease = e["id"].rsplit("/", 1)[0] + "-" + e["id"].rsplit("/", 1)[1]
                if e.get("channel") == "mtls" and lease in addrs:
                    host, port = addrs[lease]
                    e["url"] = f"https://{host}:{int(port)}"
    return out


def inventory(leases: Sequence[Lease], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The hosts file ``infermesh bootstrap --from-pulumi`` writes (``hosts``), with what each node is (``nodes``);
    the program adds the gateway pods' mesh names (``kubernetes_gateways``)."""
    hosts, nodes = {}, {}
    for lease, (ssh_host, ssh_port, ssh_user, mesh_host) in zip(leases, rows, strict=False):
        entry: dict[str, Any] = {"ssh_host": ssh_host, "ssh_port": int(ssh_port or 22), "ssh_user": ssh_user or "root"}
        if mesh_host:
            entry["mesh_endpoint"] = mesh_host
        hosts[lease.name] = entry
        nodes[lease.name] = {"mesh_address": lease.mesh_address, "pool": lease.pool, "model": lease.model,
                             "provider": lease.provider, "region": lease.region, "gpu_type": lease.gpu_type,
                             "gpu_count": lease.gpu_count}
    return {"hosts": hosts, "nodes": nodes}
