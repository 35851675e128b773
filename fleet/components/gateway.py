"""GatewayFleet: the OpenAI-compatible gateway on Kubernetes (pulumi-kubernetes).

Namespace, Secrets (upstream keys, the gateways' mesh interfaces, the admin token, the channel's
TLS material), ConfigMap (the plan's gateway config and the mesh peer list), StatefulSet (with its
headless Service and a state volume per pod), ClusterIP Service, HorizontalPodAutoscaler,
PodDisruptionBudget, NetworkPolicies (deny all ingress; allow only the Gateway API controller to
the gateway port, and WireGuard's UDP port where the pods are mesh peers), the public entry on the
Gateway API (ingress-nginx is retired): a Gateway with an HTTPS listener whose certificate
cert-manager issues, and an HTTPRoute for the customers' paths only (/v1, /status); and, where the
plan has WireGuard workers (SSH hosts), the pods' mesh data path (below, and docs/mesh.md).

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

The gateway pods as WireGuard mesh peers (only when a worker is on the mesh: marketplace
containers are on mutual TLS, and without a WireGuard peer the pods get no sidecar, no NET_ADMIN
and no UDP endpoint):
- identity: pod N is mesh node ``gateway-N``. The plan declares one identity per pod the HPA may
  start (gateway.max_replicas = maxReplicas), each with its key, address and place in every
  worker's peer list, so a scale-out never waits on a worker's config.
- its own key only: one Secret holds every identity's [Interface] (a StatefulSet's pods share one
  template, so Kubernetes cannot give pod N a Secret of its own). Only a run-once init container
  (``mesh-identity``) mounts it; it copies the [Interface] of its own ordinal (the pod-index label,
  else the pod name) to a memory-backed emptyDir and exits. The WireGuard sidecar reads that one;
  the gateway container mounts neither. A rotated key changes the template's ``infermesh/mesh-keys``
  annotation, so the pods restart onto their new identity.
- the data path: a native sidecar (``mesh``: an init container with restartPolicy Always, up before
  the gateway starts and after it has drained) runs images/mesh/mesh-sidecar, which brings the
  interface up in the pod's network namespace with the kernel's WireGuard, or wireguard-go on the
  node's /dev/net/tun where the stack sets mesh.userspace (nodes without the module). NET_ADMIN is
  that container's only capability, the pod's only one; the gateway container stays non-root,
  read-only, with every capability dropped. Its readiness is "the interface is up with this
  pod's key"; the gateway's readiness is unchanged. It applies the ConfigMap's peer list
  (``wg-peers.conf``) live with ``wg syncconf``, so a worker coming or going rolls no pod.
- reachability: workers dial the gateways (they may sit behind NAT), so each identity has a UDP
  LoadBalancer Service selecting exactly its pod (statefulset.kubernetes.io/pod-name), named by
  external-dns as ``gateway-N.mesh.<host>``, the name in the workers' configs. externalTrafficPolicy
  Local keeps the worker's own address (no SNAT, no second hop); publishNotReadyAddresses keeps the
  tunnel up while a pod starts or drains. One load balancer per identity costs what it costs: it
  is what lets a worker behind NAT reach exactly one pod (a shared UDP port cannot tell pods apart).
- filtering: the NetworkPolicy opens WireGuard's UDP port (the key is the guard). What leaves the
  tunnel is decrypted inside the pod's namespace, where no NetworkPolicy sees it, so a rule for the
  mesh CIDR there would match nothing of the mesh (only look-alike addresses off it); the sidecar
  filters the tunnel itself: mesh peers may open the gateway port, nothing else.

Secure defaults: no LoadBalancer or NodePort of ours but the mesh's UDP endpoints (the Gateway is
the only way in over HTTP), TLS required (``tls_issuer`` must be set), the gateway container runs as
non-root with a read-only root filesystem, and the gateway config is reloaded live, so a failover
changes the ConfigMap only and rolls no pod.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s

from fleet.components.mesh import peers_config
from fleet.routing import secret_env_name

CONFIG_KEY = "gateway.json"                     # the plan's gateway config (fleet.routing.gateway_config)
ROUTING_KEY = CONFIG_KEY                        # the routing is part of it (models, pools, endpoints)
CONFIG_DIR = "/etc/infermesh/config"
PEERS_KEY = "mesh-peers.json"
PEERS_CONF_KEY = "wg-peers.conf"                # the same peers in wg(8) syntax: what the mesh sidecar applies
TLS_DIR = "/etc/infermesh/tls"                  # the channel's TLS material (Secret infermesh-channel-tls)
ADMIN_TOKEN_KEY = "INFERMESH_ADMIN_TOKEN"       # what gateway/app.py reads
# what the public ingress routes to the gateway: the API and the status page, nothing operator-only
PUBLIC_PATHS = (("/v1", "Prefix"), ("/status", "Exact"), ("/status.json", "Exact"))
PRESTOP_S = 10          # seconds a terminating pod keeps serving while endpoints and the Gateway forget it
STATE_DIR = "/var/lib/infermesh"                # the gateway's --state-dir: each pod's own PersistentVolume
PODS_SERVICE = "infermesh-gateway-pods"         # the StatefulSet's headless Service
STATEFULSET = "infermesh-gateway"               # pod N is infermesh-gateway-N, mesh node gateway-N
MESH_SECRET = "infermesh-mesh"                  # every identity's [Interface], wg-gateway-N.conf (secret)
MESH_RUN = "/run"                               # the mesh containers' memory-backed scratch (emptyDir)
MESH_RUN_DIR = f"{MESH_RUN}/infermesh-mesh"     # where the identity step leaves this pod's own [Interface]
MESH_IDENTITIES_DIR = "/etc/infermesh/mesh-identities"
MESH_INTERFACE = "wg0"
MESH_SIDECAR = "/usr/local/bin/mesh-sidecar"    # images/mesh/mesh-sidecar
MESH_DNS_TTL_S = 60


def mesh_node(ordinal: int) -> str:
    """The plan's mesh node of StatefulSet pod ``ordinal``."""
    return f"gateway-{ordinal}"


def mesh_hostname(node: str, host: str) -> str:
    """The name workers dial for gateway ``node``'s WireGuard endpoint (its Service's DNS record)."""
    return f"{node}.mesh.{host}"


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
    """Per gateway node (``gateway-0`` .. ``gateway-<max_replicas - 1>``), its WireGuard [Interface] (secret)."""
    mesh_peers: NotRequired[pulumi.Input[list[Any]]]
    """The gateways' peer list (public keys, allowed IPs): not secret, changes with the workers."""
    mesh_cidr: NotRequired[str]
    """The mesh network."""
    mesh_port: NotRequired[int]
    """WireGuard's UDP port."""
    mesh_image: NotRequired[pulumi.Input[str]]
    """The mesh sidecar's image (images/mesh). Given: the pods are mesh peers (the data path below);
    absent (no WireGuard worker in the plan): no sidecar, no NET_ADMIN, no UDP endpoint."""
    mesh_public_keys: NotRequired[pulumi.Input[Mapping[str, str]]]
    """Per gateway node, its public key: their hash is a pod annotation, so a rotation restarts the pods
    (each takes its identity at start)."""
    mesh_userspace: NotRequired[bool]
    """Nodes without the WireGuard module: mount the node's /dev/net/tun into the sidecar for wireguard-go."""
    mesh_lb_annotations: NotRequired[Mapping[str, str]]
    """Annotations for the per-identity UDP LoadBalancer Services (the cloud's load balancer type)."""
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
            f"{name}-mesh", metadata=meta(MESH_SECRET), type="Opaque",
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
                            PEERS_KEY: json.dumps(pr[0], indent=1, sort_keys=True),
                            PEERS_CONF_KEY: peers_config(pr[0])}),
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
            # no mesh key here: the identities Secret is the identity step's only (below)
            "volumeMounts": [{"name": "routing", "mountPath": CONFIG_DIR, "readOnly": True},
                             *([{"name": "channel-tls", "mountPath": TLS_DIR, "readOnly": True}] if channel else []),
                             {"name": "state", "mountPath": STATE_DIR}],
        }
        selector = {"app.kubernetes.io/name": "infermesh-gateway"}
        on_mesh = args.get("mesh_image") is not None
        init_containers, mesh_volumes = (self._mesh_containers(args, port, mesh_port) if on_mesh else ([], []))
        pod_annotations = {}
        if on_mesh:
            # each pod takes its identity at start: a rotated key (or another identity count) restarts them
            pod_annotations["infermesh/mesh-keys"] = pulumi.Output.from_input(args.get("mesh_public_keys", {})).apply(
                lambda k: hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:16])
        # The headless Service the StatefulSet requires: stable per-pod DNS (infermesh-gateway-N.<it>).
        pods_service = k8s.core.v1.Service(
            f"{name}-pods", metadata=meta(PODS_SERVICE),
            spec={"type": "ClusterIP", "clusterIP": "None", "selector": selector,
                  "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
            opts=in_ns)
        statefulset = k8s.apps.v1.StatefulSet(
            f"{name}-statefulset", metadata=meta(STATEFULSET),
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
                    "metadata": {"labels": labels, **({"annotations": pod_annotations} if pod_annotations else {})},
                    "spec": {
                        # preStop, then the streams' drain (the stack's drain_timeout_s), then a margin
                        "terminationGracePeriodSeconds": PRESTOP_S + int(args.get("drain_timeout_s", 30)) + 10,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                                            "fsGroupChangePolicy": "OnRootMismatch",
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "automountServiceAccountToken": False,
                        **({"initContainers": init_containers} if init_containers else {}),
                        "containers": [container],
                        "volumes": [
                            {"name": "routing", "configMap": {"name": "infermesh-routing"}},
                            *([{"name": "channel-tls", "secret": {"secretName": "infermesh-channel-tls",
                                                                  "defaultMode": 0o440}}] if channel else []),
                            *mesh_volumes,
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
        # Workers dial the gateways (they may sit behind NAT): every identity the HPA may start has a UDP
        # endpoint of its own, a LoadBalancer Service selecting exactly its pod, under the name workers dial.
        self.mesh_services: dict[str, k8s.core.v1.Service] = {}
        for i in range(max_replicas if on_mesh else 0):
            node = mesh_node(i)
            self.mesh_services[node] = k8s.core.v1.Service(
                f"{name}-mesh-{i}", metadata={**meta(f"{STATEFULSET}-mesh-{i}"), "annotations": {
                    **dict(args.get("mesh_lb_annotations", {})),
                    # external-dns publishes the load balancer's address under the name workers dial
                    "external-dns.alpha.kubernetes.io/hostname": mesh_hostname(node, args["host"]),
                    "external-dns.alpha.kubernetes.io/ttl": str(MESH_DNS_TTL_S)}},
                spec={"type": "LoadBalancer",
                      # the worker's own address reaches the pod (no second hop, no SNAT), so WireGuard
                      # learns the worker's real endpoint
                      "externalTrafficPolicy": "Local",
                      # the tunnel carries the drain of a terminating pod and the start of a new one: it
                      # must not wait for the gateway's /ready
                      "publishNotReadyAddresses": True,
                      "selector": {**selector, "statefulset.kubernetes.io/pod-name": f"{STATEFULSET}-{i}"},
                      "ports": [{"name": "wireguard", "port": mesh_port, "targetPort": mesh_port,
                                 "protocol": "UDP"}]},
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
                    # WireGuard: workers dial in from wherever they are rented; the key is the guard. What
                    # comes out of the tunnel is decrypted inside the pod, where no NetworkPolicy sees
                    # it: the mesh sidecar filters it (the mesh to the gateway port, nothing else).
                    *([{"ports": [{"protocol": "UDP", "port": mesh_port}]}] if on_mesh else []),
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

    @staticmethod
    def _mesh_containers(args: GatewayFleetArgs, port: int, mesh_port: int) -> tuple[list[dict], list[dict]]:
        """The pod's mesh data path: the identity step and the WireGuard sidecar, and their volumes."""
        ordinal_env = [
            # the ordinal: the pod-index label (Kubernetes 1.28+), else the name's suffix
            {"name": "POD_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MESH_RUN_DIR", "value": MESH_RUN_DIR},
        ]
        # root for both, as the files they share are root's 0400/0600; no capability but the sidecar's NET_ADMIN
        root = {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True}
        userspace = bool(args.get("mesh_userspace"))
        probe = {"exec": {"command": [MESH_SIDECAR, "ready"]}, "timeoutSeconds": 2}
        identity = {
            # a run-once init container: the only one that mounts every identity; it leaves its own pod's
            # [Interface] in the memory-backed scratch and exits
            "name": "mesh-identity",
            "image": args["mesh_image"],
            "args": ["identity"],
            "env": [*ordinal_env, {"name": "MESH_IDENTITIES_DIR", "value": MESH_IDENTITIES_DIR}],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
            "securityContext": {**root, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "mesh-identities", "mountPath": MESH_IDENTITIES_DIR, "readOnly": True},
                             {"name": "mesh-run", "mountPath": MESH_RUN}],
        }
        sidecar = {
            # a native sidecar (an init container that keeps running): up before the gateway starts, down
            # after it has drained
            "name": "mesh",
            "image": args["mesh_image"],
            "restartPolicy": "Always",
            "args": ["run"],
            "env": [*ordinal_env,
                    {"name": "MESH_INTERFACE", "value": MESH_INTERFACE},
                    {"name": "MESH_PEERS_FILE", "value": f"{CONFIG_DIR}/{PEERS_CONF_KEY}"},
                    {"name": "MESH_WIREGUARD", "value": "auto"},
                    {"name": "MESH_ALLOW_TCP", "value": str(port)}],
            "ports": [{"name": "wireguard", "containerPort": mesh_port, "protocol": "UDP"}],
            # ready = the interface is up with this pod's key (the gateway's own readiness is unchanged)
            "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 30},
            "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
            "resources": {"requests": {"cpu": "50m" if userspace else "10m", "memory": "32Mi"},
                          "limits": {"memory": "128Mi"}},
            "securityContext": {**root, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}},
            "volumeMounts": [{"name": "routing", "mountPath": CONFIG_DIR, "readOnly": True},
                             {"name": "mesh-run", "mountPath": MESH_RUN},
                             *([{"name": "tun", "mountPath": "/dev/net/tun"}] if userspace else [])],
        }
        volumes = [
            {"name": "mesh-identities", "secret": {"secretName": MESH_SECRET, "defaultMode": 0o400}},
            {"name": "mesh-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            *([{"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}}] if userspace else []),
        ]
        return [identity, sidecar], volumes
