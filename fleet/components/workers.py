"""WorkerFleet: the plan's GPU leases as GpuLease resources, and the SSH ones as an Ansible hosts file.

Container leases run the worker image (vLLM behind the entrypoint that brings up the mesh and
checks the weights). SSH leases are rented the same way but run nothing of ours yet: their
addresses are exported in the hosts-file shape ``infermesh bootstrap`` reads (fleet/inventory.py),
and Ansible bootstraps them over SSH.

No worker publishes its API: vLLM listens on the worker's mesh address only. The one published
port is WireGuard's (UDP) where the marketplace supports UDP (Vast.ai, Akash), so gateways can
also dial the worker; RunPod pods publish none and dial out with keepalive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

import pulumi

from fleet.components.lease import GpuLease
from fleet.marketplaces.base import countries_for
from fleet.plan import WORKER_PORT, Lease
from fleet.spec import Spec

UDP_CAPABLE = {"vastai", "akash"}
DISK_OVERHEAD_GB = 20          # image layers, CUDA caches, logs beyond the weights


class WorkerLaunch(TypedDict):
    args: Sequence[str]
    """vLLM server flags (the image's ENTRYPOINT is kept)."""
    env: Mapping[str, str]
    """Non-secret environment (the mesh config is added as a secret)."""
    disk_gb: int
    """Container disk: weights plus overhead."""
    countries: Sequence[str]
    """Countries the lease's region stands for."""


def worker_launch(spec: Spec, lease: Lease) -> WorkerLaunch:
    """What one lease runs: a pure function of the spec (same spec, same launch)."""
    pool, model = spec.pool(lease.pool), spec.model(lease.model)
    args = ["--model", model.weights, "--revision", model.revision, "--served-model-name", model.id,
            "--host", lease.mesh_address, "--port", str(WORKER_PORT),
            "--max-num-seqs", str(pool.max_concurrency),
            "--max-model-len", str(pool.max_model_len or model.context_length),
            "--tensor-parallel-size", str(lease.gpu_count),
            "--enable-prompt-tokens-details"]       # usage.prompt_tokens_details.cached_tokens (metered)
    if model.kind == "embedding":
        args += ["--runner", "pooling"]             # serves /v1/embeddings instead of generation
    if model.quantization:
        args += ["--quantization", model.quantization]
    env = {"INFERMESH_LEASE": lease.name, "INFERMESH_MODEL": model.id, "INFERMESH_MESH_ADDRESS": lease.mesh_address}
    if model.sha256:
        env["INFERMESH_WEIGHTS_SHA256"] = model.sha256
    region = next((r for r in spec.regions if r.name == lease.region), None)
    return WorkerLaunch(args=args, env=env, disk_gb=int(model.weights_gb * 1.1) + DISK_OVERHEAD_GB,
                        countries=list(countries_for(lease.region, region.location if region else "")))


class WorkerFleetArgs(TypedDict):
    leases: Sequence[Lease]
    """The plan's leases."""
    launches: Mapping[str, WorkerLaunch]
    """Per lease name, what it runs (``worker_launch``)."""
    credentials: Mapping[str, str]
    """Per provider name, the name of its stack secret (never the key)."""
    mesh_configs: pulumi.Input[Mapping[str, str]]
    """Per worker, its wg-quick config (secret)."""
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

    def __init__(self, name: str, args: WorkerFleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:WorkerFleet", name, None, opts)
        configs = pulumi.Output.secret(args["mesh_configs"])
        self.leases = {}
        waits_for = pace(args["leases"], args.get("surge", {}))
        for lease in sorted(args["leases"], key=lambda x: (x.pool, x.replica)):
            launch = args["launches"][lease.name]
            image = lease.image or args.get("default_image")
            if image is None:
                raise ValueError(f"WorkerFleet: lease {lease.name} has no image (pool {lease.pool}.image) and no "
                                 "built worker image was given")
            ports = [f"{args['mesh_port']}/udp"] if lease.provider_kind in UDP_CAPABLE else []
            if lease.connection == "ssh":
                ports.append("22/tcp")
            env = configs.apply(lambda c, lease=lease, launch=launch: {**launch["env"], "WG_CONFIG": c[lease.name]})
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
            }, pulumi.ResourceOptions(parent=self, depends_on=[self.leases[w]] if (w := waits_for[lease.name]) else []))
        ssh = [x for x in args["leases"] if x.connection == "ssh"]
        self.inventory = pulumi.Output.all(*[
            pulumi.Output.all(self.leases[x.name].ssh_host, self.leases[x.name].ssh_port, self.leases[x.name].ssh_user,
                              self.leases[x.name].endpoint_host)
            for x in ssh
        ]).apply(lambda rows: inventory(ssh, rows))
        self.register_outputs({"inventory": self.inventory,
                               "lease_ids": {n: g.lease_id for n, g in self.leases.items()}})


def inventory(leases: Sequence[Lease], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The hosts file ``infermesh bootstrap --hosts`` reads (``hosts``), with what each node is (``nodes``)."""
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
