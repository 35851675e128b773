"""GatewayFleet: the OpenAI-compatible gateway on Kubernetes (pulumi-kubernetes).

Namespace, Secrets (upstream keys, the gateways' mesh interfaces, the admin token, the channel's
TLS material), ConfigMap (the plan's gateway config and the mesh peer list), StatefulSet (with its
headless Service and a state volume per pod), ClusterIP Service, HorizontalPodAutoscaler,
PodDisruptionBudget, NetworkPolicies (deny all ingress; allow only the Gateway API controller to
the gateway port and WireGuard on the mesh port), and the public entry on the Gateway API
(ingress-nginx is retired): a Gateway with an HTTPS listener whose certificate cert-manager
issues, and an HTTPRoute for the customers' paths only (/v1, /status).

What an SRE asks of it:
- replicas: the HPA owns them (minReplicas = the stack's gateway.replicas); the StatefulSet states
  none, so a `pulumi up` never resets what the HPA scaled to.
- a StatefulSet, not a Deployment: pod N is ``infermesh-gateway-N`` for its whole life, so it keeps
  its own state volume (a PersistentVolumeClaim from the volumeClaimTemplate, mounted at the
  gateway's --state-dir: the spool and the key cache survive the pod; retained when the pod is
  deleted, scaled in, or the StatefulSet removed) and its own identity. Pods start in parallel
  (the HPA's steps are not serialised); a rollout replaces one pod at a time, highest ordinal first.
- rollouts and drains: a preStop sleep (``PRESTOP_S``) lets the endpoint leave the Service and the
  Gateway's backends before SIGTERM, then the gateway drains its streams for the stack's
  drain_timeout_s and ships its ledger spool to PostgreSQL (trying again for up to 5 s while it
  does not answer, gateway/state/pg_ledger.py); terminationGracePeriodSeconds covers them and a
  margin. Rows a failed last shipping leaves wait on the pod's retained claim for its ordinal.
- probes as the gateway means them: readiness is /ready (503 until this replica has a key set:
  it would refuse every key), liveness is /health (the process answers); a startupProbe gives
  the first key load time without the liveness probe killing it.
- /metrics and /admin/* are operator-only: the HTTPRoute routes /v1 and the status page, nothing else.

Secure defaults: no LoadBalancer or NodePort of ours (the Gateway is the only way in), TLS required
(``tls_issuer`` must be set), pods run as non-root with a read-only root filesystem, and the
gateway config is reloaded live, so a failover changes the ConfigMap only and rolls no pod.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from fleet.routing import secret_env_name

CONFIG_KEY = "gateway.json"                     # the plan's gateway config (fleet.routing.gateway_config)
ROUTING_KEY = CONFIG_KEY                        # the routing is part of it (models, pools, endpoints)
CONFIG_DIR = "/etc/infermesh/config"
PEERS_KEY = "mesh-peers.json"
TLS_DIR = "/etc/infermesh/tls"                  # the channel's TLS material (Secret infermesh-channel-tls)
ADMIN_TOKEN_KEY = "INFERMESH_ADMIN_TOKEN"       # what gateway/app.py reads
# what the public ingress routes to the gateway: the API and the status page, nothing operator-only
PUBLIC_PATHS = (("/v1", "Prefix"), ("/status", "Exact"), ("/status.json", "Exact"))
PRESTOP_S = 10          # seconds a terminating pod keeps serving while endpoints and the Gateway forget it
STATE_DIR = "/var/lib/infermesh"                # the gateway's --state-dir: each pod's own PersistentVolume
PODS_SERVICE = "infermesh-gateway-pods"         # the StatefulSet's headless Service


def routing_json(routing: Mapping[str, Any]) -> str:
    """The ConfigMap's text: ``json.loads`` of it equals the plan's routing exactly."""
    return json.dumps(routing, indent=1, sort_keys=True)


class GatewayFleetArgs(TypedDict):
    stack: str
    """The stack the gateway serves (it reads stacks/Pulumi.<stack>.yaml from its image)."""
    image: pulumi.Input[str]
    """The gateway image, pinned by digest."""
    routing: pulumi.Input[Mapping[str, Any]]
    """The plan's gateway config (fleet.routing.gateway_config: routing with mTLS endpoints at their
    leases' addresses, and the spec's tiers, limits and SLOs), the ConfigMap's ``gateway.json``."""
    channel_tls: NotRequired[Mapping[str, pulumi.Input[str]]]
    """The gateways' side of the mTLS channel: ``ca.crt``, ``gateway.crt``, ``gateway.key`` (secret),
    mounted at TLS_DIR, where the routing config's ``tls_dir`` points."""
    host: str
    """The public ingress host."""
    tls_issuer: str | None
    """cert-manager ClusterIssuer; required: the ingress never serves plain HTTP."""
    namespace: NotRequired[str]
    """Kubernetes namespace (default ``infermesh``)."""
    port: NotRequired[int]
    """The gateway's container port (default 8080)."""
    replicas: NotRequired[int]
    """Minimum replicas (the HPA's minReplicas)."""
    max_replicas: NotRequired[int]
    """The most replicas (the HPA's maxReplicas; default ``replicas``): the plan declares one mesh identity
    per pod up to it (``gateway-0`` .. ``gateway-<max_replicas - 1>``)."""
    secrets: NotRequired[pulumi.Input[Mapping[str, str]]]
    """Upstream credentials by stack-secret name (secret values)."""
    admin_token: NotRequired[pulumi.Input[str]]
    """The admin token for /admin/* (a stack secret): every pod gets the same one, as
    ``INFERMESH_ADMIN_TOKEN`` from the Secret ``infermesh-admin``. Without it each pod makes its own."""
    mesh_interfaces: NotRequired[pulumi.Input[Mapping[str, str]]]
    """Per gateway node, its WireGuard [Interface] (secret)."""
    mesh_peers: NotRequired[pulumi.Input[list[Any]]]
    """The gateways' peer list (public keys, allowed IPs): not secret, changes with the workers."""
    mesh_cidr: NotRequired[str]
    """The mesh network (allowed to reach the gateway port)."""
    mesh_port: NotRequired[int]
    """WireGuard's UDP port."""
    drain_timeout_s: NotRequired[float]
    """Grace for in-flight streams on SIGTERM."""
    ingress_namespace: NotRequired[str]
    """Namespace of the Gateway API controller's proxies allowed to reach the gateway
    (default ``envoy-gateway-system``, Envoy Gateway's)."""
    gateway_class: NotRequired[str]
    """GatewayClass of the public Gateway (default ``envoy-gateway``)."""
    state_size: NotRequired[str]
    """Each pod's state volume (its spool, key cache): a PersistentVolumeClaim of this size (default 1Gi)."""
    state_storage_class: NotRequired[str]
    """StorageClass of the state volumes (default: the cluster's default class)."""


class GatewayFleet(pulumi.ComponentResource):
    url: pulumi.Output[str]
    namespace: pulumi.Output[str]

    def __init__(self, name: str, args: GatewayFleetArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:GatewayFleet", name, None, opts)
        if not args.get("tls_issuer"):
            raise ValueError("GatewayFleet: tls_issuer is required (gateway.tls_issuer in the stack file): "
                             "the public endpoint is served over TLS only")
        if not args["host"] or args["host"] in ("localhost", "127.0.0.1"):
            raise ValueError(f"GatewayFleet: host {args['host']!r} is not a public ingress host (gateway.host)")
        ns_name = args.get("namespace", "infermesh")
        port = args.get("port", 8080)
        replicas = args.get("replicas", 1)
        max_replicas = max(args.get("max_replicas", replicas), replicas)
        mesh_port = args.get("mesh_port", 51820)
        gw_ns = args.get("ingress_namespace", "envoy-gateway-system")   # the Gateway API proxies' namespace
        labels = {"app.kubernetes.io/name": "infermesh-gateway", "app.kubernetes.io/component": "gateway",
                  "app.kubernetes.io/part-of": "infermesh", "infermesh/stack": args["stack"]}
        child = pulumi.ResourceOptions(parent=self)

        ns = k8s.core.v1.Namespace(f"{name}-namespace", metadata={"name": ns_name, "labels": labels}, opts=child)
        in_ns = pulumi.ResourceOptions(parent=self, depends_on=[ns])
        meta = lambda n: {"name": n, "namespace": ns_name, "labels": labels}  # noqa: E731

        # Two Secrets: upstream keys reach the process as env vars; mesh interfaces are mounted as files.
        upstreams = k8s.core.v1.Secret(
            f"{name}-upstreams", metadata=meta("infermesh-upstreams"), type="Opaque",
            string_data=pulumi.Output.secret(pulumi.Output.from_input(args.get("secrets", {})).apply(
                lambda s: {secret_env_name(k): v for k, v in sorted(s.items())})), opts=in_ns)
        mesh = k8s.core.v1.Secret(
            f"{name}-mesh", metadata=meta("infermesh-mesh"), type="Opaque",
            string_data=pulumi.Output.secret(pulumi.Output.from_input(args.get("mesh_interfaces", {})).apply(
                lambda m: {f"wg-{n}.conf": c for n, c in sorted(m.items())})), opts=in_ns)
        admin = None
        if args.get("admin_token") is not None:
            admin = k8s.core.v1.Secret(
                f"{name}-admin", metadata=meta("infermesh-admin"), type="Opaque",
                string_data={ADMIN_TOKEN_KEY: pulumi.Output.secret(args["admin_token"])}, opts=in_ns)
        channel = None
        if args.get("channel_tls"):
            channel = k8s.core.v1.Secret(
                f"{name}-channel-tls", metadata=meta("infermesh-channel-tls"), type="Opaque",
                string_data={k: pulumi.Output.secret(v) for k, v in sorted(args["channel_tls"].items())},
                opts=in_ns)
        config = k8s.core.v1.ConfigMap(
            f"{name}-routing", metadata=meta("infermesh-routing"),
            data=pulumi.Output.all(pulumi.Output.from_input(args.get("mesh_peers", [])),
                                   pulumi.Output.from_input(args["routing"])).apply(
                lambda pr: {ROUTING_KEY: routing_json(pr[1]),
                            PEERS_KEY: json.dumps(pr[0], indent=1, sort_keys=True)}),
            opts=in_ns)

        container = {
            "name": "gateway",
            "image": args["image"],
            "args": ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}",
                     "--host", "0.0.0.0", "--port", str(port), "--state-dir", STATE_DIR],
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            "envFrom": [{"secretRef": {"name": "infermesh-upstreams"}}],
            "env": [{"name": ADMIN_TOKEN_KEY, "valueFrom": {"secretKeyRef": {
                "name": "infermesh-admin", "key": ADMIN_TOKEN_KEY}}}] if admin is not None else [],
            # readiness: /ready (a key set loaded); liveness: /health; startup: the first key load may be slow
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5,
                               "timeoutSeconds": 2, "failureThreshold": 2},
            "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                              "timeoutSeconds": 5, "failureThreshold": 6},
            "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2,
                             "timeoutSeconds": 2, "failureThreshold": 60},
            # endpoints and the Gateway's proxies stop sending before SIGTERM starts the drain
            "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_S}}},
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "routing", "mountPath": CONFIG_DIR, "readOnly": True},
                             {"name": "mesh", "mountPath": "/etc/infermesh/mesh", "readOnly": True},
                             *([{"name": "channel-tls", "mountPath": TLS_DIR, "readOnly": True}] if channel else []),
                             {"name": "state", "mountPath": STATE_DIR}],
        }
        selector = {"app.kubernetes.io/name": "infermesh-gateway"}
        # The headless Service the StatefulSet requires: stable per-pod DNS (infermesh-gateway-N.<it>).
        pods_service = k8s.core.v1.Service(
            f"{name}-pods", metadata=meta(PODS_SERVICE),
            spec={"type": "ClusterIP", "clusterIP": "None", "selector": selector,
                  "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
            opts=in_ns)
        statefulset = k8s.apps.v1.StatefulSet(
            f"{name}-statefulset", metadata=meta("infermesh-gateway"),
            spec={
                # no "replicas": the HPA owns them (minReplicas below); Pulumi stating them too would
                # reset the HPA's count on every update
                "serviceName": PODS_SERVICE,
                "selector": {"matchLabels": selector},
                # pods start and stop together (the HPA's steps are not serialised); the ordinals, and
                # so each pod's name, state volume and mesh identity, stay stable all the same
                "podManagementPolicy": "Parallel",
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
                # a pod's state volume outlives the pod, a scale-in and the StatefulSet itself: its spool
                # is there when the ordinal returns (or for an operator to read)
                "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                "volumeClaimTemplates": [{
                    "metadata": {"name": "state", "labels": labels},
                    "spec": {"accessModes": ["ReadWriteOnce"],
                             **({"storageClassName": args["state_storage_class"]}
                                if args.get("state_storage_class") else {}),
                             "resources": {"requests": {"storage": args.get("state_size", "1Gi")}}},
                }],
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        # preStop, then the streams' drain (the stack's drain_timeout_s), then a margin
                        "terminationGracePeriodSeconds": PRESTOP_S + int(args.get("drain_timeout_s", 30)) + 10,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                                            "fsGroupChangePolicy": "OnRootMismatch",
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "automountServiceAccountToken": False,
                        "containers": [container],
                        "volumes": [
                            {"name": "routing", "configMap": {"name": "infermesh-routing"}},
                            {"name": "mesh", "secret": {"secretName": "infermesh-mesh", "defaultMode": 0o400}},
                            *([{"name": "channel-tls", "secret": {"secretName": "infermesh-channel-tls",
                                                                  "defaultMode": 0o440}}] if channel else []),
                        ],
                    },
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[ns, upstreams, mesh, config, pods_service,
                                                                 *([admin] if admin is not None else []),
                                                                 *([channel] if channel is not None else [])]))
        service = k8s.core.v1.Service(
            f"{name}-service", metadata=meta("infermesh-gateway"),
            spec={"type": "ClusterIP", "selector": selector,
                  "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
            opts=in_ns)
        k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{name}-hpa", metadata=meta("infermesh-gateway"),
            spec={"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "infermesh-gateway"},
                  "minReplicas": replicas, "maxReplicas": max_replicas,
                  "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                      "type": "Utilization", "averageUtilization": 70}}}]},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[statefulset]))
        k8s.policy.v1.PodDisruptionBudget(
            f"{name}-pdb", metadata=meta("infermesh-gateway"),
            spec={"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "infermesh-gateway"}}},
            opts=in_ns)
        k8s.networking.v1.NetworkPolicy(
            f"{name}-deny-all", metadata=meta("deny-all-ingress"),
            spec={"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}, opts=in_ns)
        k8s.networking.v1.NetworkPolicy(
            f"{name}-allow-gateway", metadata=meta("gateway-ingress"),
            spec={
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "infermesh-gateway"}},
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": [{"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": gw_ns}}}],
                     "ports": [{"protocol": "TCP", "port": port}]},
                    # WireGuard: workers dial in from wherever they are rented; the key is the guard.
                    {"ports": [{"protocol": "UDP", "port": mesh_port}]},
                    # Over the mesh (probes, workers' callbacks): the gateway port, nothing else.
                    {"from": [{"ipBlock": {"cidr": args.get("mesh_cidr", "10.90.0.0/16")}}],
                     "ports": [{"protocol": "TCP", "port": port}]},
                ],
            },
            opts=in_ns)
        public = k8s.apiextensions.CustomResource(
            f"{name}-gateway", api_version="gateway.networking.k8s.io/v1", kind="Gateway",
            metadata={**meta("infermesh-public"), "annotations": {
                # cert-manager's gateway-shim issues the listener's certificate into the Secret it names
                "cert-manager.io/cluster-issuer": args["tls_issuer"]}},
            spec={"gatewayClassName": args.get("gateway_class", "envoy-gateway"),
                  "listeners": [{"name": "https", "protocol": "HTTPS", "port": 443, "hostname": args["host"],
                                 "tls": {"mode": "Terminate", "certificateRefs": [
                                     {"kind": "Secret", "name": "infermesh-gateway-tls"}]},
                                 "allowedRoutes": {"namespaces": {"from": "Same"}}}]},
            opts=in_ns)
        k8s.apiextensions.CustomResource(
            f"{name}-route", api_version="gateway.networking.k8s.io/v1", kind="HTTPRoute",
            metadata=meta("infermesh-gateway"),
            spec={"parentRefs": [{"name": "infermesh-public", "sectionName": "https"}],
                  "hostnames": [args["host"]],
                  # the customers' routes only: /metrics and /admin/* never leave the cluster
                  "rules": [{"matches": [{"path": {"type": "PathPrefix" if kind == "Prefix" else "Exact",
                                                   "value": path}}],
                             "backendRefs": [{"name": "infermesh-gateway", "port": 80}],
                             # streams: no request deadline at the proxy (the gateway keeps its own per tier)
                             "timeouts": {"request": "0s"}}
                            for path, kind in PUBLIC_PATHS]},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[service, public]))
        self.url = pulumi.Output.from_input(f"https://{args['host']}/v1")
        self.namespace = pulumi.Output.from_input(ns_name)
        self.register_outputs({"url": self.url, "namespace": self.namespace})
