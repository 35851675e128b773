"""The Pulumi program: stack config -> spec -> plan -> components. Thin on purpose.

Everything that decides something is in the plan (fleet/plan.py); this file reads the config
in one place, builds the plan, composes the components (fleet/components) and exports what the
operator and the next steps need: the public endpoint, the Ansible hosts file for SSH leases and
the mesh keys (both read by ``infermesh bootstrap --from-pulumi``), the routing config and the
plan's costs.

A stack whose supply is all local (sim, llama.cpp: the ``local`` stack) rents nothing and runs
no cluster: ``infermesh up`` runs it on one machine. Here it only exports its plan.
"""

from __future__ import annotations

from pathlib import Path

import pulumi

from fleet import alerts
from fleet import spec as spec_mod
from fleet.components import GatewayFleet, Images, WireGuardMesh, WorkerFleet, worker_launch
from fleet.components.certs import ChannelCerts
from fleet.components.gateway import TLS_DIR, mesh_hostname
from fleet.components.monitoring import Monitoring
from fleet.launch import lease_channel
from fleet.routing import gateway_config
from fleet.plan import build_plan, is_local_only

ROOT = Path(__file__).resolve().parent
SPEC_FIELDS = [name for name in spec_mod.Spec.model_fields if name not in ("stack", "secrets")]


def read_spec(stack: str, cfg: pulumi.Config) -> tuple[spec_mod.Spec, dict[str, pulumi.Output[str]]]:
    """The spec from structured config (Pulumi hands each key over as JSON text), and the secrets
    the providers name, as secret Outputs. The spec only learns *that* a secret is set."""
    data = {name: value for name in SPEC_FIELDS if (value := cfg.get_object(name)) is not None}
    secrets: dict[str, pulumi.Output[str]] = {}
    names = [p.get("credentials") if isinstance(p, dict) else None for p in data.get("providers") or []]
    names += [p.get("registry_credentials") if isinstance(p, dict) else None for p in data.get("providers") or []]
    delivery = data.get("delivery")
    names.append(delivery.get("admin_token") if isinstance(delivery, dict) else None)   # the gateway's
    for name in names:
        if name and (value := cfg.get_secret(name)) is not None:
            secrets[name] = value
    try:
        spec = spec_mod.parse(data, stack, source=f"stack {stack}", secrets={k: "(secret)" for k in secrets})
    except spec_mod.SpecError as e:
        raise pulumi.RunError(str(e)) from None
    return spec, secrets


def image_repository(cfg: pulumi.Config, spec: spec_mod.Spec) -> str:
    """Where images are pushed: the stack's ``delivery.registry`` (CI logs in to it, docs/ci.md#registry),
    else ``infermesh:image-registry``, else beside the pools' pinned worker image."""
    if spec.delivery.registry:
        return spec.delivery.registry
    explicit = cfg.get("image-registry")
    if explicit:
        return explicit.rstrip("/")
    pinned = [p.image for p in spec.pools if p.image and "@sha256:" in p.image]
    if not pinned:
        raise pulumi.RunError("set infermesh:image-registry (no pool pins a worker image to infer it from)")
    return pinned[0].split("@", 1)[0].rsplit("/", 1)[0]


def admin_token(spec: spec_mod.Spec, secrets: dict[str, pulumi.Output[str]]) -> pulumi.Output[str]:
    name = spec.delivery.admin_token
    if not name or name not in secrets:
        raise pulumi.RunError(f"stack {spec.stack}: delivery.admin_token names no stack secret; every gateway pod "
                              "needs the same admin token (docs/ci.md#admin-token)")
    return secrets[name]


stack = pulumi.get_stack()
cfg = pulumi.Config("infermesh")
spec, secrets = read_spec(stack, cfg)
plan = build_plan(spec)
costs = plan.to_json()["costs"]

if is_local_only(spec):
    pulumi.export("endpoint", f"http://127.0.0.1:{spec.gateway.port}/v1")
    pulumi.export("ansible_inventory", {"hosts": {}, "nodes": {}})
else:
    images = Images("infermesh-images", {"repository": image_repository(cfg, spec), "context": str(ROOT),
                                         "push": cfg.get_bool("push-images") is not False})
    gateways = [n for n in plan.mesh if n.role == "gateway"]
    # WireGuard only where it is the channel (SSH hosts): marketplace containers are on mutual TLS
    on_mesh = [n for n in plan.mesh if n.role == "gateway" or lease_channel(plan.lease(n.name)) == "wireguard"]
    # The one source of this stack's mesh keys (docs/mesh.md): the gateway pods take theirs from the mesh's
    # interfaces, the SSH hosts theirs through `infermesh bootstrap --from-pulumi` (the `mesh_keys` output).
    mesh = WireGuardMesh("infermesh-mesh", {
        "nodes": [{"name": n.name, "role": n.role, "address": n.address, "peers": list(n.peers)} for n in on_mesh],
        "cidr": spec.mesh.cidr, "port": spec.mesh.port, "rotation": spec.mesh.rotation,
    })
    # the channel: mutual TLS into marketplace containers (the plan's choice per lease, fleet/kinds.py); each
    # worker makes its own key, its lease's provider signs its certificate with the CA (no key in a marketplace)
    certs = ChannelCerts("infermesh-channel", {
        "stack": stack, "ca_validity_days": spec.channel.ca_validity_days,
        "cert_validity_days": spec.channel.cert_validity_days, "renew_before_days": spec.channel.renew_before_days})
    workers = WorkerFleet("infermesh-workers", {
        "tls": {"stack": stack, "ca": certs.ca_cert, "ca_key": certs.ca_key,
                "days": spec.channel.cert_validity_days, "renew_days": spec.channel.renew_before_days},
        "leases": list(plan.leases),
        "launches": {lease.name: worker_launch(spec, lease) for lease in plan.leases},
        "credentials": {p.name: p.credentials for p in spec.providers if p.credentials},
        "mesh_port": spec.mesh.port,
        "default_image": images.worker_ref,
        "surge": {p.name: p.surge for p in spec.pools},
        "registry": {p.name: secrets[p.registry_credentials] for p in spec.providers
                     if p.registry_credentials and p.registry_credentials in secrets},
    })
    gateway_names = [g.name for g in gateways]
    gateway = GatewayFleet("infermesh-gateway", {
        # the one gateway config (routing with the channel, tiers, limits, SLOs): a ConfigMap, never the image
        "stack": stack, "image": images.gateway_ref,
        "routing": workers.routing(plan.routing, TLS_DIR).apply(lambda r: gateway_config(spec, r)),
        "channel_tls": {"ca.crt": certs.ca_cert, "gateway.crt": certs.client_cert, "gateway.key": certs.client_key},
        "host": spec.gateway.host, "tls_issuer": spec.gateway.tls_issuer, "namespace": spec.gateway.namespace,
        "port": spec.gateway.port, "replicas": spec.gateway.replicas, "drain_timeout_s": spec.gateway.drain_timeout_s,
        "max_replicas": spec.gateway.identities,     # the HPA's ceiling: one mesh identity per pod it may start
        # The gateway calls external upstreams itself: it needs their keys (and only theirs).
        "secrets": {p.credentials: secrets[p.credentials] for p in spec.providers
                    if p.kind == "openai" and p.credentials in secrets},
        # One admin token for every pod (a stack secret), so /admin/* answers the same on each replica.
        "admin_token": admin_token(spec, secrets),
        "mesh_interfaces": mesh.interfaces.apply(lambda i: {g: i[g] for g in gateway_names}),
        "mesh_peers": mesh.gateway_peers, "mesh_cidr": spec.mesh.cidr, "mesh_port": spec.mesh.port,
        # the pods are mesh peers (a WireGuard sidecar, a UDP endpoint per identity) when a worker is on the mesh
        **({"mesh_image": images.mesh_ref, "mesh_userspace": spec.mesh.userspace,
            "mesh_lb_annotations": spec.mesh.lb_annotations,
            "mesh_public_keys": mesh.public_keys.apply(lambda k: {g: k[g] for g in gateway_names})}
           if any(n.role == "worker" for n in on_mesh) else {}),
    })
    # The stack's alerting rules (fleet/alerts.py) as a PrometheusRule, and a PodMonitor for the gateways.
    # infermesh:runbook-url: the runbook's web address; infermesh:prometheus-rule-labels: "release=kps,...".
    Monitoring("infermesh-monitoring", {
        "stack": stack, "groups": alerts.rule_groups(spec, cfg.get("runbook-url") or alerts.RUNBOOK),
        "namespace": spec.gateway.namespace, "port": spec.gateway.port,
        "prometheus_namespace": cfg.get("prometheus-namespace") or "monitoring",
        "rule_labels": dict(kv.split("=", 1) for kv in (cfg.get("prometheus-rule-labels") or "").split(",")
                            if "=" in kv),
    }, opts=pulumi.ResourceOptions(depends_on=[gateway]))
    pulumi.export("endpoint", gateway.url)
    # The hosts file `infermesh bootstrap --from-pulumi` writes: the SSH leases' addresses, and the gateways, which
    # are Kubernetes pods, not SSH hosts: each answers WireGuard at its own name (gateway-N is StatefulSet pod N,
    # behind a UDP load balancer of its own that external-dns names so: fleet/components/gateway.py).
    pulumi.export("ansible_inventory", workers.inventory.apply(lambda inv: {
        **inv, "kubernetes_gateways": {g: mesh_hostname(g, spec.gateway.host) for g in gateway_names}}))
    # Every mesh node's key pair (the SSH-host workers' and the gateway identities'), secret: Ansible's keys for
    # the SSH hosts, so that they and the pods hold one set (fleet/mesh_keys.py's key file shape).
    pulumi.export("mesh_keys", mesh.key_pairs)
    pulumi.export("images", {"gateway": images.gateway_ref, "worker": images.worker_ref, "mesh": images.mesh_ref})

pulumi.export("routing_config", plan.routing)
pulumi.export("costs", costs)
