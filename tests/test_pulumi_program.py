"""The Pulumi program (__main__.py) under ``pulumi.runtime.set_mocks``, for every shipped stack.

No Pulumi CLI, no cluster, no marketplace: the mocks record every resource the program
registers (type, name, inputs, with secret markers kept) and answer with plausible outputs.
The tests assert policies over what was registered: leases per pool, secrets stay secret, the
routing ConfigMap is the plan's routing, the NetworkPolicies, no public worker Service, TLS on
the Ingress, and that draining a provider changes exactly the leases and the ConfigMap.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import runpy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pulumi.output import Unknown
from pulumi.runtime import rpc

from fleet import plan as plan_mod
from fleet import spec as spec_mod
from infermesh_cli.commands import failover
from fleet.components.gateway import PEERS_KEY, ROUTING_KEY, TLS_DIR
from fleet.components.workers import with_endpoints
from fleet.launch import lease_channel
from fleet.routing import gateway_config

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "__main__.py"
STACKS = ["local", "staging", "prod"]
LEASE_TYPE = "pulumi-python:dynamic/infermesh:GpuLease"
KEY_TYPE = "pulumi-python:dynamic/infermesh:WireGuardKey"
SECRET_SIG = rpc._special_secret_sig
SIG = rpc._special_sig_key


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SIG) == SECRET_SIG


def unwrap(value: Any) -> Any:
    if is_secret(value):
        return unwrap(value["value"])
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def stable_key(node: str) -> tuple[str, str]:
    """A deterministic key pair per node for the mocks, so two runs can be diffed."""
    key = X25519PrivateKey.from_private_bytes(hashlib.sha256(node.encode()).digest())
    raw = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return (raw(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())),
            raw(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)))


_MOCK_PEMS: dict[tuple[str, str], str] = {}


def mock_key(name: str) -> str:
    """A real ECDSA key for a mocked pulumi-tls PrivateKey, the same one for a name in every run of this process
    (so two runs of the program can be diffed)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if ("key", name) not in _MOCK_PEMS:
        key = ec.generate_private_key(ec.SECP256R1())
        _MOCK_PEMS["key", name] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()).decode()
    return _MOCK_PEMS["key", name]


def mock_ca(name: str, key_pem: str, common_name: str) -> str:
    """A real self-signed CA certificate for a mocked pulumi-tls SelfSignedCert (one per name and key)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    if ("ca", name + key_pem) not in _MOCK_PEMS:
        key = serialization.load_pem_private_key(key_pem.encode(), None)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, hashes.SHA256()))
        _MOCK_PEMS["ca", name + key_pem] = cert.public_bytes(serialization.Encoding.PEM).decode()
    return _MOCK_PEMS["ca", name + key_pem]


@dataclass
class Registered:
    typ: str
    name: str
    inputs: dict[str, Any]


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[Registered] = []
        self.deps: dict[str, list[str]] = {}      # resource name -> names of the resources it depends on

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.resources.append(Registered(args.typ, args.name, dict(args.inputs)))
        outs = dict(args.inputs)
        if args.typ == KEY_TYPE:
            private, public = stable_key(unwrap(args.inputs["node"]))
            outs.update(public_key=public, private_key={SIG: SECRET_SIG, "value": private})
        elif args.typ == LEASE_TYPE:
            n = int(hashlib.sha256(args.name.encode()).hexdigest()[:4], 16) % 250
            outs.update(lease_id=f"{args.name}-id", status="running", raw_status="running",
                        endpoint_host=f"198.51.100.{n}", endpoint_port=31820, ssh_host=f"198.51.100.{n}",
                        ssh_port=22022, ssh_user="root", price_per_hour=0.4)
        elif args.typ == "tls:index/privateKey:PrivateKey":        # pulumi-tls: real PEMs (the CA signs), secret
            outs.update(private_key_pem={SIG: SECRET_SIG, "value": mock_key(args.name)})
        elif args.typ == "tls:index/certRequest:CertRequest":
            outs.update(cert_request_pem=f"-----BEGIN CERTIFICATE REQUEST-----\n{args.name}\n")
        elif args.typ == "tls:index/selfSignedCert:SelfSignedCert":
            outs.update(cert_pem=mock_ca(args.name, unwrap(args.inputs["privateKeyPem"]),
                                         unwrap(args.inputs["subject"])["commonName"]))
        elif args.typ == "tls:index/locallySignedCert:LocallySignedCert":
            outs.update(cert_pem=f"-----BEGIN CERTIFICATE-----\n{args.name}\n")
        elif args.typ.startswith("docker-build:index:Image"):
            digest = "sha256:" + hashlib.sha256(json.dumps(args.inputs.get("tags")).encode()).hexdigest()
            outs.update(digest=digest, ref=f"{args.inputs['tags'][0]}@{digest}")
        return f"{args.name}-id", outs

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}

    def of_type(self, prefix: str) -> list[Registered]:
        return [r for r in self.resources if r.typ.startswith(prefix)]

    def one(self, prefix: str, name_part: str = "") -> Registered:
        found = [r for r in self.of_type(prefix) if name_part in r.name]
        assert len(found) == 1, f"expected one {prefix} {name_part!r}, got {[r.name for r in found]}"
        return found[0]


@dataclass
class Run:
    stack: str
    spec: spec_mod.Spec
    plan: plan_mod.Plan
    mocks: Mocks
    exports: dict[str, Any] = field(default_factory=dict)
    secret_exports: set[str] = field(default_factory=set)      # the exports Pulumi stores (and prints) as secrets


def stack_config(stack: str, stacks_dir: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """The stack file as Pulumi hands it to a program: every value as text (JSON for structured
    ones), secrets decrypted (here: stand-ins) and listed as secret keys."""
    raw = spec_mod.read_config(spec_mod.stack_path(stack, stacks_dir))
    config, secret_keys = {}, []
    for key, value in raw.items():
        full = f"{spec_mod.NAMESPACE}:{key}"
        if isinstance(value, dict) and set(value) == {"secure"}:
            config[full] = f"test-secret-{key}"
            secret_keys.append(full)
        else:
            config[full] = value if isinstance(value, str) else json.dumps(value)
    return config, secret_keys


def run_program(stack: str, monkeypatch: pytest.MonkeyPatch, stacks_dir: Path | None = None) -> Run:
    # The SDK runs the program on the thread's current event loop; an earlier async test may have
    # closed or unset it, so each run gets its own.
    asyncio.set_event_loop(asyncio.new_event_loop())
    mocks = Mocks()
    register = pulumi.runtime.mocks.MockMonitor.RegisterResource

    def recording(monitor, request):
        mocks.deps[request.name] = [urn.rsplit("::", 1)[-1] for urn in request.dependencies]
        return register(monitor, request)

    monkeypatch.setattr(pulumi.runtime.mocks.MockMonitor, "RegisterResource", recording)
    pulumi.runtime.set_mocks(mocks, project="infermesh", stack=stack, preview=False)
    config, secret_keys = stack_config(stack, stacks_dir)
    pulumi.runtime.set_all_config(config, secret_keys)
    exported: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", lambda name, value: exported.__setitem__(name, value))
    resolved: dict[str, Any] = {}
    secret: set[str] = set()

    async def secret_exports() -> None:
        secret.update([name for name, value in exported.items()
                       if isinstance(value, pulumi.Output) and await value.is_secret()])

    @pulumi.runtime.test
    def program():
        runpy.run_path(str(MAIN), run_name="__main__")
        return pulumi.Output.all(pulumi.Output.from_input(exported).apply(resolved.update),
                                 pulumi.Output.from_input(asyncio.ensure_future(secret_exports())))

    program()
    spec = spec_mod.load(stack, stacks_dir)
    return Run(stack, spec, plan_mod.build_plan(spec), mocks, resolved, secret)


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    mp = pytest.MonkeyPatch()
    try:
        return {s: run_program(s, mp) for s in STACKS if spec_mod.stack_path(s).exists()}
    finally:
        mp.undo()


def test_every_shipped_stack_runs(runs):
    assert set(runs) == set(STACKS)
    for run in runs.values():
        assert run.exports["routing_config"] == run.plan.routing
        assert run.exports["costs"]["monthly_total"] == run.plan.costs.monthly_total


def test_local_stack_rents_and_deploys_nothing(runs):
    run = runs["local"]
    assert run.plan.leases == ()
    assert [r.typ for r in run.mocks.resources] == []
    assert run.exports["endpoint"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_leases_per_pool(runs, stack):
    run = runs[stack]
    leases = run.mocks.of_type(LEASE_TYPE)
    per_pool = Counter(unwrap(r.inputs["name"]).rsplit("-", 1)[0] for r in leases)
    expected = {p.name: p.replicas for p in run.plan.pools if p.leased and p.role != "drained" and p.replicas}
    assert dict(per_pool) == expected
    assert sum(expected.values()) == len(run.plan.leases) > 0
    by_name = {unwrap(r.inputs["name"]): unwrap(r.inputs) for r in leases}
    for lease in run.plan.leases:
        props = by_name[lease.name]
        assert (props["provider_kind"], props["gpu_type"], props["gpu_count"], props["region"], props["price_cap"]) == \
            (lease.provider_kind, lease.gpu_type, lease.gpu_count, lease.region, lease.price_cap)
        assert props["image"] == lease.image and "@sha256:" in props["image"]
        args = props["args"]
        if lease_channel(lease) == "mtls":
            # a marketplace container: vLLM's port is the one published, and it serves mutual TLS only
            assert args[args.index("--host") + 1] == "0.0.0.0" and props["ports"] == ["8000/tcp"]
            assert args[args.index("--ssl-cert-reqs") + 1] == "2"
            assert {"--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs"} <= set(args)
        else:
            # WireGuard: the worker API is never published, only WireGuard's UDP port where the market has UDP
            assert args[args.index("--host") + 1] == lease.mesh_address
            assert all(p.endswith("/udp") or p == "22/tcp" for p in props["ports"])
            assert not any(p.startswith("8000") for p in props["ports"])
    # Every lease resource passes the policy pack's resource rules (digest-pinned, under the cap).
    from fleet import policy

    for r in leases:
        assert policy.check_resource(r.typ, unwrap(r.inputs), r.name) == []


def on_mesh(plan: plan_mod.Plan) -> list:
    """The WireGuard nodes: the gateways and the SSH leases (marketplace containers are on mutual TLS)."""
    return [n for n in plan.mesh if n.role == "gateway" or lease_channel(plan.lease(n.name)) == "wireguard"]


def r_env(run: Run, lease: str) -> Any:
    return next(r.inputs["env"] for r in run.mocks.of_type(LEASE_TYPE) if unwrap(r.inputs["name"]) == lease)


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_secrets_are_secret(runs, stack):
    run = runs[stack]
    from fleet.channel import worker_server_name

    for r in run.mocks.of_type(LEASE_TYPE):
        assert is_secret(r.inputs["env"]), f"{r.name}: env is not secret"
        env = unwrap(r.inputs["env"])
        if env["INFERMESH_CHANNEL"] == "mtls":
            # no key and no certificate in the env a marketplace stores: the worker makes its own key, and the
            # lease provider signs its request with the CA key (a secret input, never sent to the marketplace)
            assert not any(k.startswith("INFERMESH_TLS") or "PRIVATE KEY" in v for k, v in env.items())
            assert is_secret(r.inputs["tls_ca_key"]) and "PRIVATE KEY" in unwrap(r.inputs["tls_ca_key"])
            assert "BEGIN CERTIFICATE" in r.inputs["tls_ca"] and "PRIVATE" not in r.inputs["tls_ca"]
            assert r.inputs["tls_name"] == worker_server_name(stack, unwrap(r.inputs["name"]))
        else:
            assert "WG_CONFIG" not in env           # no WireGuard key in a lease (test_no_lease_carries_a_mesh_key)
            assert "tls_ca_key" not in r.inputs or r.inputs["tls_ca_key"] is None
        assert is_secret(r.inputs["__provider"])
        # Only the NAME of the marketplace secret travels; its value appears in no input.
        assert unwrap(r.inputs["credentials"]).endswith("-api-key")
    flat = json.dumps([unwrap(r.inputs) for r in run.mocks.resources if r.typ != "kubernetes:core/v1:Secret"])
    for key in ("vastai-api-key", "runpod-api-key", "akash-api-key", "gonkagate-api-key"):
        assert f"test-secret-{key}" not in flat
    for name in ("infermesh-upstreams", "infermesh-mesh"):
        secret = next(r for r in run.mocks.of_type("kubernetes:core/v1:Secret") if r.inputs["metadata"]["name"] == name)
        assert is_secret(secret.inputs["stringData"])
    mesh_secret = unwrap(next(r for r in run.mocks.of_type("kubernetes:core/v1:Secret")
                              if r.inputs["metadata"]["name"] == "infermesh-mesh").inputs["stringData"])
    # an identity for every pod the HPA may start, not only the minimum
    assert sorted(mesh_secret) == sorted(f"wg-gateway-{i}.conf" for i in range(run.spec.gateway.max_replicas))
    upstreams = unwrap(next(r for r in run.mocks.of_type("kubernetes:core/v1:Secret")
                            if r.inputs["metadata"]["name"] == "infermesh-upstreams").inputs["stringData"])
    want = {"INFERMESH_SECRET_GONKAGATE_API_KEY": "test-secret-gonkagate-api-key"} if stack == "prod" else {}
    assert upstreams == want
    keys = run.mocks.of_type(KEY_TYPE)
    assert len(keys) == len(on_mesh(run.plan))


def configmap_routing(run: Run) -> dict:
    """The plan's routing with each mTLS endpoint at its lease's forwarded address (the mocks' outputs)."""
    addrs = {}
    for r in run.mocks.of_type(LEASE_TYPE):
        name = unwrap(r.inputs["name"])
        n = int(hashlib.sha256(r.name.encode()).hexdigest()[:4], 16) % 250
        addrs[name] = (f"198.51.100.{n}", 31820)
    return gateway_config(run.spec, with_endpoints(run.plan.routing, addrs, TLS_DIR))


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_channel_certificates_are_pulumi_tls_resources(runs, stack):
    """The stack CA and the gateways' client certificate: pulumi-tls resources with the declared validity and
    renewal; keys only as secrets. Workers' certificates are not made here (no worker key in the state or
    a marketplace): each mTLS lease carries the CA and the declared validity, and its provider signs the
    request of the key the worker made (fleet/marketplaces/worker_tls.py)."""
    run = runs[stack]
    hours, renew = run.spec.channel.cert_validity_days * 24, run.spec.channel.renew_before_days * 24
    keys = run.mocks.of_type("tls:index/privateKey:PrivateKey")
    assert keys and all((unwrap(k.inputs)["algorithm"], unwrap(k.inputs)["ecdsaCurve"]) == ("ECDSA", "P256")
                        for k in keys)
    ca = run.mocks.one("tls:index/selfSignedCert:SelfSignedCert")
    assert ca.inputs["isCaCertificate"] is True and "cert_signing" in ca.inputs["allowedUses"]
    assert ca.inputs["validityPeriodHours"] == run.spec.channel.ca_validity_days * 24
    assert is_secret(ca.inputs["privateKeyPem"])
    certs = {c.name.removeprefix("infermesh-channel-"): c
             for c in run.mocks.of_type("tls:index/locallySignedCert:LocallySignedCert")}
    csrs = {c.name.removeprefix("infermesh-channel-"): c
            for c in run.mocks.of_type("tls:index/certRequest:CertRequest")}
    mtls = [x.name for x in run.plan.leases if lease_channel(x) == "mtls"]
    assert mtls and sorted(certs) == sorted(csrs) == ["gateway"] and len(keys) == 2      # the CA's, the gateways'
    cert = certs["gateway"]
    assert (cert.inputs["validityPeriodHours"], cert.inputs["earlyRenewalHours"]) == (hours, renew)
    assert is_secret(cert.inputs["caPrivateKeyPem"])
    assert "client_auth" in cert.inputs["allowedUses"] and "server_auth" not in cert.inputs["allowedUses"]
    leases = {unwrap(r.inputs["name"]): r.inputs for r in run.mocks.of_type(LEASE_TYPE)}
    for name in mtls:
        assert (leases[name]["tls_days"], leases[name]["tls_renew_days"]) == \
            (run.spec.channel.cert_validity_days, run.spec.channel.renew_before_days)
        assert unwrap(leases[name]["tls_ca_key"]) == unwrap(ca.inputs["privateKeyPem"])
    # the gateways get the CA and their client certificate as a Secret; no key in any ConfigMap
    tls_secret = next(r for r in run.mocks.of_type("kubernetes:core/v1:Secret")
                      if r.inputs["metadata"]["name"] == "infermesh-channel-tls")
    assert sorted(unwrap(tls_secret.inputs["stringData"])) == ["ca.crt", "gateway.crt", "gateway.key"]
    data = tls_secret.inputs["stringData"]
    assert is_secret(data) or all(is_secret(v) for v in data.values())
    assert "PRIVATE KEY" not in json.dumps(unwrap(run.mocks.one("kubernetes:core/v1:ConfigMap").inputs))


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_configmap_is_the_plans_routing(runs, stack):
    run = runs[stack]
    cm = run.mocks.one("kubernetes:core/v1:ConfigMap")
    assert json.loads(cm.inputs["data"][ROUTING_KEY]) == configmap_routing(run)
    peers = json.loads(cm.inputs["data"][PEERS_KEY])
    assert sorted(p["name"] for p in peers) == sorted(x.name for x in run.plan.leases
                                                      if lease_channel(x) == "wireguard")     # SSH hosts only
    assert all("private" not in json.dumps(p).lower() for p in peers)


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_network_policies(runs, stack):
    run = runs[stack]
    policies = {r.inputs["metadata"]["name"]: r.inputs["spec"]
                for r in run.mocks.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")}
    deny = policies["deny-all-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and deny.get("ingress", []) == []
    allow = policies["gateway-ingress"]
    assert allow["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "infermesh-gateway"}
    rules = allow["ingress"]
    port = run.spec.gateway.port
    # One door: the ingress controller to the gateway port. (No WireGuard worker in these stacks, so the pods
    # are no mesh peers and WireGuard's UDP port stays shut: tests/test_gateway_mesh.py has a stack that is.)
    assert len(rules) == 1
    assert rules[0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "envoy-gateway-system"}}}]
    assert rules[0]["ports"] == [{"protocol": "TCP", "port": port}]


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_no_public_service_and_tls_ingress(runs, stack):
    run = runs[stack]
    services = run.mocks.of_type("kubernetes:core/v1:Service")
    assert services and all(s.inputs["spec"]["type"] == "ClusterIP" for s in services)
    assert not any("externalIPs" in s.inputs["spec"] for s in services)
    from fleet import policy

    for r in run.mocks.resources:
        assert policy.check_resource(r.typ, unwrap(r.inputs), r.name) == [], r.name
    # the public entry is on the Gateway API: an HTTPS listener with cert-manager's certificate ...
    assert not run.mocks.of_type("kubernetes:networking.k8s.io/v1:Ingress")
    gw = run.mocks.one("kubernetes:gateway.networking.k8s.io/v1:Gateway")
    [listener] = gw.inputs["spec"]["listeners"]
    assert (listener["protocol"], listener["port"], listener["hostname"]) == ("HTTPS", 443, run.spec.gateway.host)
    assert listener["tls"] == {"mode": "Terminate", "certificateRefs": [{"kind": "Secret",
                                                                          "name": "infermesh-gateway-tls"}]}
    assert gw.inputs["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == run.spec.gateway.tls_issuer
    # ... and an HTTPRoute on it for the API and the status page only: never /metrics or /admin/*
    route = run.mocks.one("kubernetes:gateway.networking.k8s.io/v1:HTTPRoute")
    assert route.inputs["spec"]["parentRefs"] == [{"name": "infermesh-public", "sectionName": "https"}]
    paths = {(m["path"]["value"], m["path"]["type"]) for rule in route.inputs["spec"]["rules"] for m in rule["matches"]}
    assert paths == {("/v1", "PathPrefix"), ("/status", "Exact"), ("/status.json", "Exact")}
    assert all(b == [{"name": "infermesh-gateway", "port": 80}]
               for b in (rule["backendRefs"] for rule in route.inputs["spec"]["rules"]))
    assert run.exports["endpoint"] == f"https://{run.spec.gateway.host}/v1"


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_gateway_statefulset_hpa_pdb_images(runs, stack):
    run = runs[stack]
    sts = run.mocks.one("kubernetes:apps/v1:StatefulSet")
    pod = sts.inputs["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # the HPA owns replicas: the StatefulSet states none (Pulumi would reset the HPA's count on every update)
    assert "replicas" not in sts.inputs["spec"]
    # each pod keeps its own state volume (the spool, the key cache) at the gateway's --state-dir, retained
    from fleet.components.gateway import PODS_SERVICE, STATE_DIR
    [claim] = sts.inputs["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {"name": "state", "mountPath": STATE_DIR} in container["volumeMounts"]
    assert container["args"][container["args"].index("--state-dir") + 1] == STATE_DIR
    assert "state" not in {v["name"] for v in pod["volumes"]}          # no emptyDir shadowing the claim
    assert sts.inputs["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain",
                                                                          "whenScaled": "Retain"}
    headless = next(s for s in run.mocks.of_type("kubernetes:core/v1:Service")
                    if s.inputs["metadata"]["name"] == sts.inputs["spec"]["serviceName"] == PODS_SERVICE)
    assert headless.inputs["spec"]["clusterIP"] == "None"
    assert headless.inputs["spec"]["selector"].items() <= sts.inputs["spec"]["template"]["metadata"]["labels"].items()
    assert not run.mocks.of_type("kubernetes:apps/v1:Deployment")
    # no WireGuard worker in these stacks: the pods are no mesh peers (no sidecar, no NET_ADMIN, no mesh key
    # mounted anywhere; tests/test_gateway_mesh.py has a stack that is)
    assert "initContainers" not in pod and {v["name"] for v in pod["volumes"]} <= {"routing", "channel-tls"}
    # a terminating pod keeps serving through preStop, then drains its streams within the grace period
    from fleet.components.gateway import PRESTOP_S
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": PRESTOP_S}}
    assert pod["terminationGracePeriodSeconds"] >= PRESTOP_S + run.spec.gateway.drain_timeout_s + 5
    # probes as the gateway means them: ready once it has keys, alive while it answers
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert "@sha256:" in container["image"] and container["image"] == run.exports["images"]["gateway"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    hpa = run.mocks.one("kubernetes:autoscaling/v2:HorizontalPodAutoscaler")
    assert hpa.inputs["spec"]["minReplicas"] == run.spec.gateway.replicas
    assert hpa.inputs["spec"]["maxReplicas"] == run.spec.gateway.max_replicas == \
        len([n for n in run.plan.mesh if n.role == "gateway"])
    assert hpa.inputs["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                    "name": sts.inputs["metadata"]["name"]}
    assert run.mocks.one("kubernetes:policy/v1:PodDisruptionBudget").inputs["spec"]["maxUnavailable"] == 1
    images = run.mocks.of_type("docker-build:index:Image")
    assert sorted(i.name for i in images) == ["infermesh-images-gateway", "infermesh-images-mesh",
                                              "infermesh-images-worker"]
    for image in images:
        [tag] = image.inputs["tags"]
        assert not tag.endswith(":latest") and len(tag.rsplit(":", 1)[1]) == 16    # content-addressed


def test_ansible_inventory_for_ssh_leases(monkeypatch, tmp_path):
    """A stack with an SSH pool: its leases come back as the hosts file `infermesh bootstrap` reads."""
    text = (ROOT / "stacks" / "Pulumi.staging.yaml").read_text()
    doc = yaml.safe_load(text)
    pools = doc["config"]["infermesh:pools"]
    pools[0]["connection"] = "ssh"
    (tmp_path / "Pulumi.sshtest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run = run_program("sshtest", monkeypatch, stacks_dir=tmp_path)
    inv = run.exports["ansible_inventory"]
    ssh = [x for x in run.plan.leases if x.connection == "ssh"]
    assert ssh and sorted(inv["hosts"]) == sorted(x.name for x in ssh)
    for lease in ssh:
        assert inv["hosts"][lease.name]["ssh_port"] == 22022
        assert inv["nodes"][lease.name] == {"mesh_address": lease.mesh_address, "pool": lease.pool,
                                            "model": lease.model, "provider": lease.provider, "region": lease.region,
                                            "gpu_type": lease.gpu_type, "gpu_count": lease.gpu_count}
    from fleet.inventory import load_hosts

    hosts_file = tmp_path / "hosts.json"
    hosts_file.write_text(json.dumps(inv))
    assert set(load_hosts(hosts_file).hosts) == {x.name for x in ssh}


# ---- the mesh keys: one source (Pulumi), never in a lease ----------------------------------------------------

def mesh_key_holders(run: Run) -> dict[str, list[str]]:
    """Per resource type, the resources whose inputs hold a mesh node's WireGuard private key (as the mocks made
    them: ``stable_key``) or a wg-quick ``PrivateKey`` line; the WireGuardKey resources themselves left out."""
    privates = [stable_key(n.name)[0] for n in run.plan.mesh]
    holders: dict[str, list[str]] = {}
    for r in run.mocks.resources:
        if r.typ == KEY_TYPE:
            continue
        text = json.dumps(unwrap({k: v for k, v in r.inputs.items() if k != "__provider"}), default=str)
        wg_text = "PrivateKey" in text if r.typ == LEASE_TYPE else "PrivateKey =" in text    # a lease: anywhere
        if wg_text or "WG_CONFIG" in text or any(p in text for p in privates):
            holders.setdefault(r.typ, []).append(r.name)
    return holders


def assert_no_lease_holds_a_mesh_key(run: Run) -> None:
    """No lease (what a marketplace stores: env, args, every input) carries a WireGuard key: the only holder is
    the gateway pods' identities Secret (Kubernetes, never a marketplace)."""
    assert run.mocks.of_type(LEASE_TYPE)
    holders = mesh_key_holders(run)
    assert LEASE_TYPE not in holders and "infermesh:fleet:GpuLease" not in holders, holders
    assert set(holders) <= {"kubernetes:core/v1:Secret"}, holders
    for r in run.mocks.of_type(LEASE_TYPE):
        assert "WG_CONFIG" not in unwrap(r.inputs["env"])


def mesh_keys_expected(run: Run) -> dict[str, dict[str, str]]:
    return {n.name: {"private_key": stable_key(n.name)[0], "public_key": stable_key(n.name)[1]}
            for n in on_mesh(run.plan)}


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_no_lease_carries_a_mesh_key(runs, stack):
    assert_no_lease_holds_a_mesh_key(runs[stack])


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_mesh_keys_output_is_every_mesh_nodes_pair_as_a_secret(runs, stack):
    """The one key source for `infermesh bootstrap --from-pulumi`: every node on the mesh (the gateway identities
    and the SSH-host workers), as fleet/mesh_keys.py's key file, exported as a secret (`--show-secrets` only)."""
    run = runs[stack]
    assert run.exports["mesh_keys"] == mesh_keys_expected(run)
    assert {n for n, _ in run.exports["mesh_keys"].items()} == {k.name.removesuffix("-wg") for k in
                                                                 run.mocks.of_type(KEY_TYPE)}
    assert "mesh_keys" in run.secret_exports
    # no other export holds a private key
    privates = [pair["private_key"] for pair in run.exports["mesh_keys"].values()]
    for name, value in run.exports.items():
        if name != "mesh_keys":
            assert not any(p in json.dumps(value, default=str) for p in privates), name
    # the gateways: Kubernetes pods, each at the name its UDP load balancer has (not SSH hosts)
    from fleet.components.gateway import mesh_hostname

    assert run.exports["ansible_inventory"]["kubernetes_gateways"] == {
        n.name: mesh_hostname(n.name, run.spec.gateway.host) for n in run.plan.mesh if n.role == "gateway"}
    assert "mesh_keys" not in runs["local"].exports           # a local stack has no mesh


def test_bumping_mesh_rotation_replaces_every_key(monkeypatch, tmp_path):
    """`mesh.rotation` in the stack file reaches every WireGuardKey, and the provider, fed the inputs as the engine
    sends them, replaces each one (the Pulumi stack's rotation; bootstrap's rotate-keys refuses such stacks)."""
    from tests.engine import EngineHost

    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.prod.yaml").read_text())
    doc["config"]["infermesh:pools"][0]["connection"] = "ssh"               # workers on the mesh too
    for folder, rotation in (("now", None), ("next", 1)):
        if rotation is not None:
            doc["config"].setdefault("infermesh:mesh", {})["rotation"] = rotation
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "Pulumi.rot.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    before = run_program("rot", monkeypatch, stacks_dir=tmp_path / "now")
    after = run_program("rot", monkeypatch, stacks_dir=tmp_path / "next")
    assert before.spec.mesh.rotation == 0 and after.spec.mesh.rotation == 1
    old = {r.name: {k: v for k, v in r.inputs.items() if v is not None} for r in before.mocks.of_type(KEY_TYPE)}
    new = {r.name: {k: v for k, v in r.inputs.items() if v is not None} for r in after.mocks.of_type(KEY_TYPE)}
    assert sorted(old) == sorted(new) == sorted(f"{n.name}-wg" for n in on_mesh(before.plan))
    assert any(n.role == "worker" for n in on_mesh(before.plan))
    host = EngineHost(stack_config("prod")[0])
    for name, props in old.items():
        assert unwrap(props["rotation"]) == 0 and unwrap(new[name]["rotation"]) == 1
        inputs, failures = host.check({}, props)
        assert failures == []
        key_id, outs = host.create(inputs)
        next_inputs, failures = host.check(outs, new[name])
        assert failures == []
        assert host.diff(key_id, outs, next_inputs).replaces == ["rotation"], name
        assert host.diff(key_id, outs, inputs).changes is False
    # nothing but the keys (and what is made of them) changes: no lease is replaced for a rotation
    leases_before = {r.name: unwrap(r.inputs) for r in before.mocks.of_type(LEASE_TYPE)}
    leases_after = {r.name: unwrap(r.inputs) for r in after.mocks.of_type(LEASE_TYPE)}
    strip = lambda d: {k: v for k, v in d.items() if k != "__provider"}  # noqa: E731
    assert {n: strip(v) for n, v in leases_before.items()} == {n: strip(v) for n, v in leases_after.items()}


def test_bad_stack_is_one_clear_error(monkeypatch, tmp_path):
    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.staging.yaml").read_text())
    del doc["config"]["infermesh:runpod-api-key"]
    (tmp_path / "Pulumi.bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception) as e:
        run_program("bad", monkeypatch, stacks_dir=tmp_path)
    assert "infermesh:runpod-api-key is not set" in str(e.value)


# ---- declarative failover ---------------------------------------------------------------------------------

def fingerprint(mocks: Mocks) -> dict[tuple[str, str], str]:
    """type+name -> inputs (the serialized dynamic provider excluded: it is code, not intent)."""
    return {(r.typ, r.name): json.dumps(unwrap({k: v for k, v in r.inputs.items() if k != "__provider"}),
                                        sort_keys=True, default=str) for r in mocks.resources}


def test_failover_drain_changes_only_leases_and_configmap(runs, monkeypatch, tmp_path):
    before = runs["prod"]
    text = (ROOT / "stacks" / "Pulumi.prod.yaml").read_text()
    drained = failover.drain_text(text, before.spec, "akash")       # what `infermesh failover drain akash` writes
    (tmp_path / "Pulumi.prod.yaml").write_text(drained)
    after = run_program("prod", monkeypatch, stacks_dir=tmp_path)
    a, b = fingerprint(before.mocks), fingerprint(after.mocks)

    d = plan_mod.diff(before.plan, after.plan)
    removed_leases = {x["name"] for x in d["leases"]["removed"]}
    added_leases = {x["name"] for x in d["leases"]["added"]}
    assert removed_leases == {x.name for x in before.plan.leases if x.provider == "akash"}
    assert added_leases and all(not n.startswith(tuple(p for p in removed_leases)) for n in added_leases)

    def lease_of(key: tuple[str, str]) -> str | None:
        name = key[1].removeprefix("infermesh-channel-")        # the lease's certificate (pulumi-tls)
        for suffix in ("-lease", "-wg"):
            name = name.removesuffix(suffix)
        return name if name in removed_leases | added_leases else None

    gone, new = set(a) - set(b), set(b) - set(a)
    changed = {k for k in set(a) & set(b) if a[k] != b[k]}
    # Removed: each drained lease's component, lease resource and mesh key; added: the replacements'.
    assert {lease_of(k) for k in gone} == removed_leases and None not in {lease_of(k) for k in gone}
    assert {lease_of(k) for k in new} == added_leases and None not in {lease_of(k) for k in new}
    mtls = sum(1 for x in before.plan.leases if x.name in removed_leases and lease_channel(x) == "mtls")
    wg = len(removed_leases) - mtls
    # (an mTLS lease has no certificate resources of its own: its worker's certificate is issued at create)
    assert Counter(k[0] for k in gone) == +Counter({"infermesh:fleet:GpuLease": len(removed_leases),
                                                   LEASE_TYPE: len(removed_leases), KEY_TYPE: wg})
    # Changed: the routing ConfigMap, and nothing else (no StatefulSet roll, no Secret, no other lease).
    assert changed == {("kubernetes:core/v1:ConfigMap", "infermesh-gateway-routing")}
    # the gateway StatefulSet's spec and image, and the image builds, are identical: no rebuild, no roll
    dep_a, dep_b = before.mocks.one("kubernetes:apps/v1:StatefulSet"), after.mocks.one("kubernetes:apps/v1:StatefulSet")
    assert unwrap(dep_a.inputs["spec"]) == unwrap(dep_b.inputs["spec"])
    assert before.exports["images"] == after.exports["images"]
    assert {i.name: unwrap(i.inputs) for i in before.mocks.of_type("docker-build:index:Image")} == \
        {i.name: unwrap(i.inputs) for i in after.mocks.of_type("docker-build:index:Image")}
    cm = after.mocks.one("kubernetes:core/v1:ConfigMap")
    assert json.loads(cm.inputs["data"][ROUTING_KEY]) == configmap_routing(after) != configmap_routing(before)


# ---- the dynamic providers' methods (no engine) ---------------------------------------------------------------

def test_wireguard_key_provider_makes_a_real_stable_pair(runs):
    """Every mesh key of prod, through the SDK's provider host with engine-shaped inputs (rotation 0.0)."""
    from fleet.mesh_keys import public_key
    from tests.engine import EngineHost

    host = EngineHost(stack_config("prod")[0])
    keys = [{k: v for k, v in r.inputs.items() if v is not None} for r in runs["prod"].mocks.of_type(KEY_TYPE)]
    assert len(keys) == len(on_mesh(runs["prod"].plan))
    for props in keys:
        inputs, failures = host.check({}, props)
        assert failures == []
        key_id, outs = host.create(inputs)
        assert public_key(outs["private_key"]) == outs["public_key"] and key_id.startswith("wg-")
        assert outs["rotation"] == 0 and isinstance(outs["rotation"], float)          # as the engine stores it
        assert host.diff(key_id, outs, inputs).changes is False
        assert host.diff(key_id, outs, {**inputs, "rotation": 1}).replaces == ["rotation"]
        assert host.read(key_id, outs, inputs) == (key_id, outs)


# ---- the lease providers as the engine drives them (tests/engine.py) --------------------------------------------

def recorded_leases(run: Run) -> list[dict[str, Any]]:
    """Each GpuLease registration's inputs as the program sent them (secrets still marked, the provider
    serialized in ``__provider``), without the output slots the resource registers as None."""
    return [{k: v for k, v in r.inputs.items() if v is not None} for r in run.mocks.of_type(LEASE_TYPE)]


@pytest.fixture
def fakes(monkeypatch):
    """One FAKE of each leasing marketplace, stocked for every lease of the shipped stacks, with the keys
    the stack config holds (tests/test_pulumi_program.stack_config's stand-ins)."""
    from fleet.marketplaces.base import forget_listings
    from tests.fakes.marketplaces import FakeAkash, FakeRunPod, FakeVastAi, vast_offer

    forget_listings()
    vast = FakeVastAi("test-secret-vastai-api-key")
    vast.offers = [vast_offer(200 + i, gpu_name=gpu, dph_total=0.5, geolocation=geo)
                   for i, (gpu, geo) in enumerate((g, c) for g in ("RTX 4090", "L40S")
                                                  for c in ("Amsterdam, NL", "Texas, US"))]
    vast.keep_offers = True
    runpod = FakeRunPod("test-secret-runpod-api-key")
    akash = FakeAkash("test-secret-akash-api-key")
    for m in akash.gpu_models:
        m["availability"]["available"] = 10
    started = {"vastai": vast.start(), "runpod": runpod.start(), "akash": akash.start()}
    for fake in started.values():
        fake.boot_polls = 0                 # running at the first read: no wall-clock polling in these tests
    monkeypatch.setenv("INFERMESH_VASTAI_BASE_URL", vast.url + "/api/v0")
    monkeypatch.setenv("INFERMESH_RUNPOD_BASE_URL", runpod.url)
    monkeypatch.setenv("INFERMESH_AKASH_BASE_URL", akash.url)
    for env in ("VASTAI_API_KEY", "RUNPOD_API_KEY", "AKASH_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    yield started
    for fake in started.values():
        fake.stop()
    forget_listings()


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_every_lease_passes_check_as_the_engine_sends_it(runs, stack):
    """Check receives numbers as floats (gpu_count 1.0) and, in preview, unknowns as rpc.UNKNOWN."""
    from tests.engine import EngineHost

    run = runs[stack]
    leases = recorded_leases(run)
    assert len(leases) == len(run.plan.leases) == {"staging": 4, "prod": 16}[stack]
    host = EngineHost(stack_config(stack)[0])
    for props in leases:
        inputs, failures = host.check({}, props)
        assert failures == [], (props["name"], failures)
        assert inputs["gpu_count"] == 1 and inputs["label"].startswith(f"infermesh--{stack}--{props['name']}--")
        # Preview of a new lease: the mesh key (env) and a built image are not known yet.
        inputs, failures = host.check({}, {**props, "env": rpc.UNKNOWN, "image": rpc.UNKNOWN})
        assert failures == [] and isinstance(inputs["label"], Unknown)
        if props.get("tls_name"):
            # the first preview of a stack: the CA (a pulumi-tls resource) is not made yet
            inputs, failures = host.check({}, {**props, "tls_ca": rpc.UNKNOWN, "tls_ca_key": rpc.UNKNOWN})
            assert failures == [] and isinstance(inputs["label"], Unknown)
        # A real mistake is still caught with engine-shaped numbers.
        _, failures = host.check({}, {**props, "gpu_count": 1.5})
        assert failures == [("gpu_count", "must be a whole number >= 1, got 1.5")]


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_every_lease_diff_against_stored_state(runs, stack):
    """Olds are what the engine stored (floats); an unchanged lease has no diff, a new image replaces it
    create-before-delete (a new label), a new cap updates it in place, an unknown image may replace."""
    from tests.engine import EngineHost, engine_view

    host = EngineHost(stack_config(stack)[0])
    for props in recorded_leases(runs[stack]):
        inputs, _ = host.check({}, props)
        stored = engine_view({**inputs, "lease_id": "L1", "status": "running", "price_per_hour": 0.4},
                             keep_unknowns=False)
        d = host.diff("L1", stored, inputs)
        assert d.changes is False and d.replaces == [], (props["name"], d)
        new_image = host.check(stored, {**props, "image": "r/w@sha256:" + "c" * 64})[0]
        d = host.diff("L1", stored, new_image)
        assert d.replaces == ["image"] and d.delete_before_replace is False
        assert new_image["label"] != inputs["label"] and new_image["label"].rsplit("--", 1)[0] == \
            inputs["label"].rsplit("--", 1)[0]
        d = host.diff("L1", stored, host.check(stored, {**props, "price_cap": 0.9})[0])
        assert d.changes is True and d.replaces == []
        d = host.diff("L1", stored, host.check(stored, {**props, "image": rpc.UNKNOWN})[0])
        assert d.replaces == ["image"]


def test_an_mtls_lease_is_replaced_in_its_certificates_next_renewal_period(runs, monkeypatch):
    """The worker's certificate is issued at create for cert_validity_days; the first `pulumi up` of the next
    renewal period (validity minus renew_before_days) replaces the lease (a new label: create-before-delete),
    before the certificate is within renew_before_days of its end. WireGuard leases have no tls_epoch."""
    from fleet.components import lease as lease_mod
    from tests.engine import EngineHost, engine_view

    host = EngineHost(stack_config("prod")[0])
    props = next(p for p in recorded_leases(runs["prod"]) if p.get("tls_name"))
    period = (props["tls_days"] - props["tls_renew_days"]) * 86400
    now = 1_800_000_000.0 - 1_800_000_000.0 % period                     # the start of a period
    monkeypatch.setattr(lease_mod.time, "time", lambda: now)
    inputs, _ = host.check({}, props)
    stored = engine_view({**inputs, "lease_id": "L1", "status": "running"}, keep_unknowns=False)
    monkeypatch.setattr(lease_mod.time, "time", lambda: now + period - 1)
    later = host.check(stored, props)[0]
    assert later["label"] == inputs["label"] and host.diff("L1", stored, later).changes is False
    monkeypatch.setattr(lease_mod.time, "time", lambda: now + period)
    renewal = host.check(stored, props)[0]
    d = host.diff("L1", stored, renewal)
    assert d.replaces == ["tls_epoch"] and d.delete_before_replace is False and renewal["label"] != inputs["label"]
    _, failures = host.check({}, {**props, "tls_renew_days": props["tls_days"]})
    assert failures == [("tls_renew_days", f"must be a whole number from 0 to tls_days - 1, got "
                                           f"{float(props['tls_days'])!r}")]


def test_a_lease_from_provider_version_1_is_updated_not_replaced(runs):
    """State written before labels carried the stack: no project, stack or label, version "1"."""
    from tests.engine import EngineHost, engine_view

    host = EngineHost(stack_config("prod")[0])
    for props in recorded_leases(runs["prod"]):
        inputs, _ = host.check({}, props)
        legacy = {k: v for k, v in inputs.items() if k not in ("project", "stack", "label")}
        stored = engine_view({**legacy, "provider_version": "1", "lease_id": "L1", "status": "running"},
                             keep_unknowns=False)
        d = host.diff("L1", stored, inputs)
        assert d.replaces == [] and d.changes is True, (props["name"], d)


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_every_lease_lifecycle_against_the_fakes(runs, stack, fakes):
    """check -> create -> read -> update -> delete for every lease of the stack, each call through the SDK's
    provider host with engine-shaped properties, against the FAKE marketplaces."""
    from tests.engine import EngineHost

    host = EngineHost(stack_config(stack)[0])
    made = []
    for props in recorded_leases(runs[stack]):
        inputs, failures = host.check({}, {**props, "wait_s": 60})
        assert failures == []
        lease_id, outs = host.create(inputs)
        kind = props["provider_kind"]
        assert outs["status"] == "running" and outs["lease_id"] == lease_id and outs["label"] == inputs["label"]
        assert fakes[kind].live()[lease_id] == inputs["label"]
        again_id, _ = host.create(inputs)                 # a retried create adopts, never rents twice
        assert again_id == lease_id and list(fakes[kind].live().values()).count(inputs["label"]) == 1
        read_id, read = host.read(lease_id, outs, inputs)
        assert read_id == lease_id and read["status"] == "running"
        news = host.check(inputs, {**props, "wait_s": 60, "price_cap": float(props["price_cap"]) + 0.1})[0]
        updated = host.update(lease_id, outs, news)
        assert updated["price_cap"] == pytest.approx(float(props["price_cap"]) + 0.1)
        assert updated["lease_id"] == lease_id
        made.append((lease_id, outs))
        if props.get("tls_name"):
            # its worker (a FAKE one running the image's bootstrap) made its key and took one certificate
            worker = fakes[kind].workers[lease_id]
            assert worker.boot.done.is_set() and worker.tls is not None
    assert sum(len(f.live()) for f in fakes.values()) == len(made)
    # Nothing a marketplace was sent or keeps holds a TLS private key: not the workers' (they make their own),
    # not the CA's (it stays with the lease provider). (SSH hosts' env still carries their wg-quick config.)
    ca_key = next(unwrap(p["tls_ca_key"]) for p in recorded_leases(runs[stack]) if p.get("tls_name"))
    for kind, fake in fakes.items():
        stored = json.dumps([r["body"] for r in fake.requests]) + json.dumps(getattr(fake, "sdl_texts", {}))
        assert "PRIVATE KEY" not in stored and ca_key.splitlines()[1] not in stored, kind
    for lease_id, outs in made:
        host.delete(lease_id, outs)
    assert all(f.live() == {} for f in fakes.values())
    for lease_id, outs in made:                            # refresh after the marketplace forgot them: gone
        assert host.read(lease_id, outs, outs)[0] == ""


def test_refresh_drops_a_dead_lease_and_gives_it_back(runs, fakes):
    from tests.engine import EngineHost

    host = EngineHost(stack_config("staging")[0])
    props = next(p for p in recorded_leases(runs["staging"]) if p["provider_kind"] == "vastai")
    inputs, _ = host.check({}, props)
    lease_id, outs = host.create(inputs)
    fakes["vastai"].kill(lease_id, "exited")
    assert host.read(lease_id, outs, inputs)[0] == ""        # gone from the state after `pulumi refresh`
    assert fakes["vastai"].live() == {}                      # and the dead one bills nothing
    new_id, new_outs = host.create(inputs)                   # the next `pulumi up` rents a replacement
    assert new_id != lease_id and new_outs["status"] == "running" and list(fakes["vastai"].live()) == [new_id]


def test_lease_errors_reach_the_operator_as_one_line(runs, fakes, monkeypatch):
    """In the provider host the SDK reports a failed call with traceback.format_exc(): ours is one line
    naming the marketplace, the lease and its pool, and what to do."""
    import sys

    from fleet.components import lease as lease_mod
    from tests.engine import EngineError, EngineHost

    monkeypatch.setattr(lease_mod, "_in_provider_host", lambda: True)
    monkeypatch.setattr(sys, "tracebacklimit", 1000, raising=False)    # restored (removed) after the test
    host = EngineHost(stack_config("staging")[0])
    props = next(p for p in recorded_leases(runs["staging"]) if p["name"] == "qwen-runpod-0")
    inputs, _ = host.check({}, props)
    fakes["runpod"].gpus = []
    with pytest.raises(EngineError) as e:
        host.create(inputs)
    assert "Traceback" not in e.value.details and len(e.value.details.strip().splitlines()) == 1
    assert e.value.details.startswith("fleet.components.lease.LeaseError: runpod: lease qwen-runpod-0 "
                                      "(pool qwen-runpod), create: ")
    assert "What to do:" in e.value.details and fakes["runpod"].live() == {}


def test_lease_without_a_key_says_which_secret(runs, fakes):
    from tests.engine import EngineError, EngineHost

    host = EngineHost({})          # the stack config lacks the marketplace key
    props = next(p for p in recorded_leases(runs["staging"]) if p["provider_kind"] == "vastai")
    inputs, _ = host.check({}, props)
    with pytest.raises(EngineError, match=r"vastai: no API key\. What to do: set a valid key: pulumi config set "
                                          r"--secret infermesh:vastai-api-key "):
        host.create(inputs)


# ---- the Dockerfiles (they cannot be built here; they must be pinned and sane) -----------------------------

@pytest.mark.parametrize("image", ["gateway", "worker"])
def test_dockerfiles_pinned_non_root_healthchecked(image):
    text = (ROOT / "images" / image / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert froms
    for ref in froms:
        name, _, tag = ref.split("@")[0].partition(":")
        assert tag and tag != "latest" and any(c.isdigit() for c in tag), f"{ref}: not pinned to a version"
    if image == "worker":
        assert any(f.startswith("vllm/vllm-openai:v0.") and "@sha256:" in f for f in froms)
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    assert "STOPSIGNAL SIGTERM" in lines
    user_lines = [ln for ln in lines if ln.startswith("USER ")]
    if image == "gateway":
        assert user_lines and user_lines[-1].split()[1].split(":")[0] == "10001"
    else:
        # Root only for wg-quick (NET_ADMIN); the entrypoint runs vLLM as 10001.
        assert "INFERMESH_RUN_AS=10001" in text
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT "))
    assert json.loads(entry[len("ENTRYPOINT "):])       # exec form


def test_worker_entrypoint_checksum_and_args(tmp_path):
    spec = __import__("importlib.util").util.spec_from_file_location("entry", ROOT / "images/worker/entrypoint.py")
    entry = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    (tmp_path / "a").write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"more")
    first = entry.snapshot_sha256(tmp_path)
    assert first == entry.snapshot_sha256(tmp_path) and len(first) == 64
    (tmp_path / "sub" / "b").write_bytes(b"tampered")
    assert entry.snapshot_sha256(tmp_path) != first
    assert entry.arg(["--model", "m", "--revision", "r"], "--revision") == "r"
    assert entry.arg(["--model", "m"], "--revision", "main") == "main"


# ---- faults: bounded retries, then one clear line; never a second lease ----------------------------------------

LIST_CALL = {"vastai": r"/instances/$", "runpod": r"/v2/pods$", "akash": r"/v1/deployments$"}


@pytest.fixture
def no_wall_clock(monkeypatch):
    """The adapters the provider builds wait through a recorder instead of time.sleep."""
    from fleet.components import lease as lease_mod

    waits: list[float] = []
    build = lease_mod.LeaseProvider.adapter

    def adapter(self, props):
        a = build(self, props)
        a.sleep = a.http.sleep = waits.append
        return a

    monkeypatch.setattr(lease_mod.LeaseProvider, "adapter", adapter)
    return waits


@pytest.mark.parametrize("kind", ["vastai", "runpod", "akash"])
@pytest.mark.parametrize("fault", ["503", "429 with Retry-After", "429 without Retry-After", "malformed", "no answer"])
def test_marketplace_faults_end_in_one_clear_line(runs, fakes, no_wall_clock, monkeypatch, kind, fault):
    import sys

    from fleet.components import lease as lease_mod
    from tests.engine import EngineError, EngineHost

    monkeypatch.setattr(lease_mod, "_in_provider_host", lambda: True)
    monkeypatch.setattr(sys, "tracebacklimit", 1000, raising=False)
    fake = fakes[kind]
    host = EngineHost(stack_config("prod")[0])
    props = next(p for p in recorded_leases(runs["prod"]) if p["provider_kind"] == kind)
    inputs, _ = host.check({}, props)

    def inject(n: int) -> None:
        if fault == "503":
            fake.fail_on("GET", LIST_CALL[kind], n=n, status=503)
        elif fault.startswith("429"):
            fake.rate_limit(n, retry_after="2" if "with " in fault else None)
        elif fault == "malformed":
            fake.malformed(n, "GET", LIST_CALL[kind])
        else:
            fake.drop(n, "GET", LIST_CALL[kind])

    inject(100)                                   # it never recovers: bounded, then one line
    with pytest.raises(EngineError) as e:
        host.create(inputs)
    line = e.value.details.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert line.startswith(f"fleet.components.lease.LeaseError: {kind}: lease {props['name']} "
                           f"(pool {props['name'].rsplit('-', 1)[0]}), create: ")
    assert "gave up after 5 tries" in line and "What to do: " in line and "pulumi up" in line
    assert len(fake.requests) == 5 and fake.live() == {}          # five tries, nothing rented
    if fault == "429 with Retry-After":
        assert no_wall_clock == [2.0] * 4                          # the marketplace's own hint
    else:
        assert len(no_wall_clock) == 4 and all(0 <= w <= 30 for w in no_wall_clock)

    fake.requests.clear()
    fake._faults.clear()
    fake.rate_limit(0)
    inject(2)                                     # it recovers: one lease, rented once
    lease_id, outs = host.create(inputs)
    assert list(fake.live()) == [lease_id] and outs["status"] == "running"
    assert host.create(inputs)[0] == lease_id and list(fake.live()) == [lease_id]


# ---- replacements without outage -------------------------------------------------------------------------------

@pytest.mark.parametrize("surge", [1, 2])
def test_pool_replacement_never_drops_below_its_replicas(monkeypatch, tmp_path, fakes, surge):
    """A pool of 3 gets a new image: its leases are replaced `surge` at a time, each new lease is running
    before any old one goes, and the FAKE's timeline never shows fewer than 3 running (engine model:
    tests/engine.apply_update)."""
    from tests.engine import EngineHost, apply_update

    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.staging.yaml").read_text())
    pool = next(p for p in doc["config"]["infermesh:pools"] if p["name"] == "qwen-vast")
    pool["replicas"], pool["surge"] = 3, surge

    def program(image: str) -> Run:
        pool["image"] = image
        (tmp_path / "Pulumi.rolltest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        return run_program("rolltest", monkeypatch, stacks_dir=tmp_path)

    def leases_of(run: Run) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
        regs = {r.name: {k: v for k, v in r.inputs.items() if v is not None} for r in run.mocks.of_type(LEASE_TYPE)}
        return regs, {name: run.mocks.deps.get(name, []) for name in regs}

    host = EngineHost(stack_config("staging")[0])
    first, deps = leases_of(program(pool["image"]))
    members = sorted(n for n in first if n.startswith("qwen-vast-"))
    assert len(members) == 3
    # The chain: replica i waits for replica i - surge.
    assert [[d for d in deps[n] if d in first] for n in members] == \
        [[members[i - surge]] if i >= surge else [] for i in range(3)]
    state, _ = apply_update(host, {}, first, deps)
    vast = fakes["vastai"]
    start = len(vast.timeline)
    new, deps = leases_of(program("registry.example/infermesh/worker@sha256:" + "9" * 64))
    state, waves = apply_update(host, state, new, deps)
    in_pool = [[n for n in wave if n in members] for wave in waves]
    assert max(len(w) for w in in_pool) == surge                 # never more than `surge` rented at once
    replaced = [state[n][0] for n in members]
    assert set(replaced).isdisjoint(x for _, ev, x, _ in vast.timeline[:start] if ev == "rented")
    # Running leases of the pool after each marketplace event of the replacement: never below 3.
    prefix = "infermesh--rolltest--qwen-vast-"
    counts = vast.running_at_each_step(prefix)[start:]
    before = vast.running_at_each_step(prefix)[start - 1]
    assert before == 3 and counts and min(counts) >= 3 and counts[-1] == 3
    assert sorted(x for x, label in vast.live().items() if label.startswith(prefix)) == sorted(replaced)


def test_two_stacks_with_the_same_pools_on_one_account(runs, monkeypatch, tmp_path, fakes):
    """staging and a copy of it named twin rent on the same FAKE accounts: each stack's audit sees its own
    leases only, and destroying twin leaves staging's running."""
    from infermesh_cli.commands import leases as leases_cmd
    from fleet.marketplaces import LEASE_ADAPTERS
    from tests.engine import EngineHost

    (tmp_path / "Pulumi.twin.yaml").write_text((ROOT / "stacks" / "Pulumi.staging.yaml").read_text())
    twin = run_program("twin", monkeypatch, stacks_dir=tmp_path)
    host = EngineHost(stack_config("staging")[0])
    made: dict[str, dict[str, dict[str, Any]]] = {"staging": {}, "twin": {}}
    for stack, run in (("staging", runs["staging"]), ("twin", twin)):
        for props in recorded_leases(run):
            inputs, _ = host.check({}, props)
            lease_id, outs = host.create(inputs)
            made[stack][lease_id] = outs
    assert len(made["staging"]) == len(made["twin"]) == 4 and not set(made["staging"]) & set(made["twin"])
    keys = dict(zip(("vastai", "runpod"), ("test-secret-vastai-api-key", "test-secret-runpod-api-key"), strict=True))
    adapters = {kind: (lambda kind=kind: LEASE_ADAPTERS[kind](keys[kind], fakes[kind].url
                                                              + ("/api/v0" if kind == "vastai" else "")))
                for kind in keys}
    for stack in ("staging", "twin"):
        assert leases_cmd.audit("infermesh", stack, set(made[stack]), set(), adapters).count == 0
        report = leases_cmd.audit("infermesh", stack, set(), set(), adapters)   # an empty state knows none
        assert {x.lease_id for v in report.unknown.values() for x in v} == set(made[stack])
    for lease_id, outs in made["twin"].items():
        host.delete(lease_id, outs)
    live = {**fakes["vastai"].live(), **fakes["runpod"].live()}
    assert set(live) == set(made["staging"])


def test_private_registry_access_reaches_the_marketplace_as_a_secret(monkeypatch, tmp_path, fakes):
    """providers[].registry_credentials names a stack secret; the vast leases carry it (secret) and the
    FAKE Vast receives it as image_login; a missing secret is one clear error."""
    from tests.engine import EngineHost

    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.staging.yaml").read_text())
    vast = next(p for p in doc["config"]["infermesh:providers"] if p["name"] == "vast")
    vast["registry_credentials"] = "vast-registry"
    (tmp_path / "Pulumi.private.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(Exception, match=r"providers\[0\]\.registry_credentials: secret infermesh:vast-registry is "
                                        r"not set in the stack file"):
        run_program("private", monkeypatch, stacks_dir=tmp_path)
    doc["config"]["infermesh:vast-registry"] = {"secure": "v1:placeholder"}
    (tmp_path / "Pulumi.private.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run = run_program("private", monkeypatch, stacks_dir=tmp_path)
    leases = recorded_leases(run)
    for props in leases:
        assert is_secret(props["registry"])
        want = "test-secret-vast-registry" if unwrap(props["provider_kind"]) == "vastai" else ""
        assert unwrap(props["registry"]) == want
    host = EngineHost(stack_config("private", tmp_path)[0])
    props = next(p for p in leases if p["provider_kind"] == "vastai")
    inputs, _ = host.check({}, props)
    host.create(inputs)
    [put] = fakes["vastai"].calls("PUT")
    assert put["body"]["image_login"] == "test-secret-vast-registry"


def test_an_ssh_pool_on_runpod_registers_the_operators_keys_and_drops_none(monkeypatch, tmp_path, fakes):
    """ssh_public_keys reach the RunPod SSH leases as an input; creating them adds the missing keys to the
    account (one PUT, every key already there kept) before the pod starts, and nothing when all are there."""
    from tests.engine import EngineHost
    from tests.test_marketplaces import openssh_key

    ours, theirs = openssh_key("op@laptop"), openssh_key("teammate@box")
    doc = yaml.safe_load((ROOT / "stacks" / "Pulumi.staging.yaml").read_text())
    runpod = next(p for p in doc["config"]["infermesh:providers"] if p["kind"] == "runpod")
    for pool in doc["config"]["infermesh:pools"]:
        if pool["provider"] == runpod["name"]:
            pool["connection"] = "ssh"
    doc["config"]["infermesh:ssh_public_keys"] = [ours]
    (tmp_path / "Pulumi.sshkeys.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run = run_program("sshkeys", monkeypatch, stacks_dir=tmp_path)
    leases = [p for p in recorded_leases(run) if p["provider_kind"] == "runpod"]
    assert leases and all(p["ssh_keys"] == [ours] and p["connection"] == "ssh" for p in leases)
    assert all("ssh_keys" not in p for p in recorded_leases(run) if p["provider_kind"] != "runpod")
    fakes["runpod"].ssh_keys = [theirs]
    host = EngineHost(stack_config("sshkeys", tmp_path)[0])
    for props in leases:
        inputs, failures = host.check({}, props)
        assert failures == []
        lease_id, outs = host.create(inputs)
        pod = fakes["runpod"].pods[lease_id]
        assert pod["env"]["PUBLIC_KEY"].splitlines() == [theirs, ours]
        assert host.update(lease_id, outs, inputs)["lease_id"] == lease_id       # keys there: nothing written
    [put] = fakes["runpod"].calls("PUT", r"/v2/account/ssh-keys$")
    assert put["body"] == {"keys": [theirs, ours]} and fakes["runpod"].ssh_keys == [theirs, ours]


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_prometheus_rule_is_the_stacks_alerts_and_prometheus_may_scrape_the_gateways(runs, stack):
    from fleet import alerts

    run = runs[stack]
    ns = run.spec.gateway.namespace
    rule = run.mocks.one("kubernetes:monitoring.coreos.com/v1:PrometheusRule")
    assert (rule.inputs["apiVersion"], rule.inputs["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule.inputs["metadata"]["namespace"] == ns and rule.inputs["metadata"]["name"] == "infermesh-alerts"
    groups = unwrap(rule.inputs["spec"])["groups"]
    assert groups == alerts.rule_groups(run.spec)
    # ... the very rules shipped in monitoring/alerts/<stack>.rules.yml (promtool-tested in tests/test_alerts.py)
    assert groups == yaml.safe_load((ROOT / "monitoring" / "alerts" / f"{stack}.rules.yml").read_text())["groups"]
    fast = [r for g in groups for r in g["rules"] if r.get("alert") == "InfermeshErrorBudgetFastBurn"]
    assert {r["labels"]["tier"] for r in fast} == {t.name for t in run.spec.tiers}
    # Prometheus reads every gateway pod: the PodMonitor selects the StatefulSet's pods by their labels
    pod_labels = run.mocks.one("kubernetes:apps/v1:StatefulSet").inputs["spec"]["template"]["metadata"]["labels"]
    monitor = run.mocks.one("kubernetes:monitoring.coreos.com/v1:PodMonitor")
    selector = monitor.inputs["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert monitor.inputs["spec"]["podMetricsEndpoints"] == [{
        "port": "http", "path": "/metrics", "interval": "15s",      # with the admin token: /metrics is the operator's
        "authorization": {"type": "Bearer",
                          "credentials": {"name": "infermesh-admin", "key": "INFERMESH_ADMIN_TOKEN"}}}]
    # ... through the deny-all: one more door, from Prometheus' namespace to the gateway port only
    policies = {r.inputs["metadata"]["name"]: r.inputs["spec"]
                for r in run.mocks.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")}
    scrape = policies["prometheus-scrape"]
    assert scrape["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert scrape["ingress"] == [{"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}], "ports": [{"protocol": "TCP", "port": run.spec.gateway.port}]}]
    # (the rules depend on the tiers' SLOs only: a failover leaves them unchanged, as
    # test_failover_drain_changes_only_leases_and_configmap checks over every resource)


def test_prometheus_rule_options_from_the_stack_config(monkeypatch, tmp_path):
    raw = (ROOT / "stacks" / "Pulumi.staging.yaml").read_text()
    doc = yaml.safe_load(raw)
    doc["config"].update({"infermesh:runbook-url": "https://git.example/infermesh/blob/main/docs/runbook.md",
                          "infermesh:prometheus-rule-labels": "release=kps,team=sre",
                          "infermesh:prometheus-namespace": "observability"})
    (tmp_path / "Pulumi.staging.yaml").write_text(yaml.safe_dump(doc))
    run = run_program("staging", monkeypatch, stacks_dir=tmp_path)
    rule = run.mocks.one("kubernetes:monitoring.coreos.com/v1:PrometheusRule")
    assert {"release": "kps", "team": "sre"}.items() <= rule.inputs["metadata"]["labels"].items()
    urls = {r["annotations"]["runbook_url"] for g in unwrap(rule.inputs["spec"])["groups"] for r in g["rules"]
            if "alert" in r}
    assert "https://git.example/infermesh/blob/main/docs/runbook.md#infermeshpooldown" in urls
    assert all(u.startswith("https://git.example/infermesh/blob/main/docs/runbook.md#") for u in urls)
    scrape = next(r for r in run.mocks.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")
                  if r.inputs["metadata"]["name"] == "prometheus-scrape")
    assert scrape.inputs["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]


def test_scaling_the_gateway_fleet_replaces_no_lease(runs, monkeypatch, tmp_path):
    """Issue 14: one more gateway replica changes no lease's inputs (container leases reach the
    gateways on mutual TLS: no worker carries a list of gateway peers), so `pulumi up` replaces none."""
    before = runs["prod"]
    text = (ROOT / "stacks" / "Pulumi.prod.yaml").read_text()
    n = before.spec.gateway.replicas
    block = "  infermesh:gateway:\n    replicas: {}\n"
    scaled = text.replace(block.format(n), block.format(n + 1), 1)
    assert scaled != text, "prod's gateway block no longer starts with replicas"
    (tmp_path / "Pulumi.prod.yaml").write_text(scaled)
    after = run_program("prod", monkeypatch, stacks_dir=tmp_path)
    assert after.spec.gateway.replicas == n + 1
    a, b = fingerprint(before.mocks), fingerprint(after.mocks)
    leases = {k for k in a if k[0] in (LEASE_TYPE, "infermesh:fleet:GpuLease")}
    assert leases and all(a[k] == b.get(k) for k in leases), [k for k in leases if a[k] != b.get(k)]
