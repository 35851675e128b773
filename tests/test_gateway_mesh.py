"""The Kubernetes gateway pods as WireGuard mesh peers, as the Pulumi program renders them (mocks).

A stack with a WireGuard worker (a pool on SSH hosts) makes every gateway pod a mesh peer: pod N
of the StatefulSet is mesh node gateway-N, for every N the HPA may start; it takes only its own
[Interface] at start (the identity step), a native WireGuard sidecar holds the interface with
NET_ADMIN (the only capability in the pod), and a UDP load balancer per identity answers under the
name the workers dial. The shipped prod and staging stacks have no WireGuard worker: their pods
stay unprivileged and expose no UDP (tests/test_pulumi_program.py). The sidecar's script itself is
run for real in network namespaces by tests/test_mesh_sidecar.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from fleet.components.gateway import (MESH_RUN, MESH_SECRET, PEERS_CONF_KEY, PEERS_KEY, STATEFULSET, mesh_hostname,
                                      mesh_node)
from fleet.components.mesh import interface_config, peers_config
from tests.test_k8s_schemas import CUSTOM, manifests, validate_all
from tests.test_pulumi_program import (ROOT, Run, assert_no_lease_holds_a_mesh_key, is_secret, mesh_keys_expected,
                                       run_program, stable_key, unwrap)

SCRIPT = ROOT / "images" / "mesh" / "mesh-sidecar"
VARIANTS = {"prod-ssh": ("prod", False), "staging-ssh": ("staging", False), "prod-userspace": ("prod", True)}
NLB = {"service.beta.kubernetes.io/aws-load-balancer-type": "external",
       "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "ip"}


def ssh_variant(base: str, userspace: bool, stacks_dir: Path, name: str) -> None:
    """The shipped stack with its first pool on SSH hosts (so on the WireGuard mesh)."""
    doc = yaml.safe_load((ROOT / "stacks" / f"Pulumi.{base}.yaml").read_text())
    doc["config"]["infermesh:pools"][0]["connection"] = "ssh"
    if userspace:
        doc["config"].setdefault("infermesh:mesh", {}).update(userspace=True, lb_annotations=NLB)
    (stacks_dir / f"Pulumi.{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory) -> dict[str, Run]:
    stacks_dir = tmp_path_factory.mktemp("stacks")
    mp = pytest.MonkeyPatch()
    try:
        out = {}
        for name, (base, userspace) in VARIANTS.items():
            ssh_variant(base, userspace, stacks_dir, name)
            out[name] = run_program(name, mp, stacks_dir=stacks_dir)
        return out
    finally:
        mp.undo()


def statefulset(run: Run) -> dict:
    return unwrap(run.mocks.one("kubernetes:apps/v1:StatefulSet").inputs)


def containers(run: Run) -> dict[str, dict]:
    pod = statefulset(run)["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def mesh_secret(run: Run):
    return next(s for s in run.mocks.of_type("kubernetes:core/v1:Secret")
                if s.inputs["metadata"]["name"] == MESH_SECRET)


def gateways(run: Run) -> list:
    return [n for n in run.plan.mesh if n.role == "gateway"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_pod_the_hpa_may_start_has_an_identity_and_a_udp_endpoint(mesh_runs, variant):
    run = mesh_runs[variant]
    gws = gateways(run)
    max_replicas = run.spec.gateway.max_replicas
    hpa = run.mocks.one("kubernetes:autoscaling/v2:HorizontalPodAutoscaler").inputs["spec"]
    assert hpa["maxReplicas"] == max_replicas == len(gws) > run.spec.gateway.replicas
    assert [g.name for g in gws] == [mesh_node(i) for i in range(max_replicas)]
    # the identities Secret: every identity's [Interface], its key, its plan address and the mesh port
    secret = mesh_secret(run)
    assert is_secret(secret.inputs["stringData"])
    prefix = int(run.spec.mesh.cidr.rsplit("/", 1)[1])
    assert unwrap(secret.inputs["stringData"]) == {
        f"wg-{g.name}.conf": interface_config(stable_key(g.name)[0], g.address, prefix, run.spec.mesh.port)
        for g in gws}
    # a UDP load balancer per identity, selecting exactly its pod, named as the workers dial it
    services = {r.inputs["metadata"]["name"]: unwrap(r.inputs) for r in run.mocks.of_type("kubernetes:core/v1:Service")}
    public = {n: s for n, s in services.items() if s["spec"]["type"] != "ClusterIP"}
    assert sorted(public) == sorted(f"{STATEFULSET}-mesh-{i}" for i in range(max_replicas))
    for i in range(max_replicas):
        svc = public[f"{STATEFULSET}-mesh-{i}"]
        assert svc["spec"]["type"] == "LoadBalancer"
        assert svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == f"{STATEFULSET}-{i}"
        assert svc["spec"]["ports"] == [{"name": "wireguard", "port": run.spec.mesh.port,
                                         "targetPort": run.spec.mesh.port, "protocol": "UDP"}]
        assert svc["spec"]["externalTrafficPolicy"] == "Local" and svc["spec"]["publishNotReadyAddresses"] is True
        assert svc["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/hostname"] == \
            mesh_hostname(mesh_node(i), run.spec.gateway.host)
        # the stack's load balancer annotations (the cloud's UDP-capable kind) on each
        assert svc["metadata"]["annotations"].items() >= (NLB.items() if VARIANTS[variant][1] else set())
    from fleet import policy

    for r in run.mocks.resources:                   # a gateway's UDP endpoint is no worker Service
        assert policy.check_resource(r.typ, unwrap(r.inputs), r.name) == [], r.name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_lease_carries_a_mesh_key(mesh_runs, variant):
    """SSH hosts are on the mesh, and still no lease (what the marketplace stores) holds a WireGuard key: Ansible
    writes a host's config over SSH (`infermesh bootstrap --from-pulumi`, tests/test_bootstrap_pulumi.py)."""
    run = mesh_runs[variant]
    assert any(x.connection == "ssh" for x in run.plan.leases)
    assert_no_lease_holds_a_mesh_key(run)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mesh_keys_output_is_the_pods_keys_and_each_worker_dials_every_identity(mesh_runs, variant, tmp_path):
    """The `mesh_keys` output (the SSH hosts' key source) covers every mesh node and is the keys the pods hold; the
    inventory built from the outputs has each worker dial every identity at its Service's name with that key."""
    from fleet.inventory import build_inventory, host_vars, load_hosts

    run = mesh_runs[variant]
    keys = run.exports["mesh_keys"]
    assert keys == mesh_keys_expected(run) and "mesh_keys" in run.secret_exports
    gws = gateways(run)
    ssh = [x for x in run.plan.leases if x.connection == "ssh"]
    assert set(keys) == {g.name for g in gws} | {x.name for x in ssh}
    prefix = int(run.spec.mesh.cidr.rsplit("/", 1)[1])
    assert unwrap(mesh_secret(run).inputs["stringData"]) == {
        f"wg-{g.name}.conf": interface_config(keys[g.name]["private_key"], g.address, prefix, run.spec.mesh.port)
        for g in gws}
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps(run.exports["ansible_inventory"]))
    inv = build_inventory(run.spec, run.plan, load_hosts(hosts), keys_file=tmp_path / "mesh-keys.json")
    for lease in ssh:
        peers = host_vars(inv, lease.name)["mesh_peers"]
        assert [(p["name"], p["address"], p["endpoint"]) for p in peers] == [
            (g.name, g.address, f"{mesh_hostname(g.name, run.spec.gateway.host)}:{run.spec.mesh.port}") for g in gws]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_pods_peer_list_is_in_the_configmap_in_wg_syntax(mesh_runs, variant):
    run = mesh_runs[variant]
    data = run.mocks.one("kubernetes:core/v1:ConfigMap").inputs["data"]
    peers = json.loads(data[PEERS_KEY])
    assert data[PEERS_CONF_KEY] == peers_config(peers)
    wg_workers = {x.name: x for x in run.plan.leases if x.connection == "ssh"}
    assert sorted(p["name"] for p in peers) == sorted(wg_workers)
    for p in peers:
        assert f"PublicKey = {stable_key(p['name'])[1]}\nAllowedIPs = {wg_workers[p['name']].mesh_address}/32\n" \
            in data[PEERS_CONF_KEY]
    assert "PrivateKey" not in data[PEERS_CONF_KEY]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_net_admin_only_on_the_sidecar_and_each_pod_sees_only_its_own_key(mesh_runs, variant):
    run = mesh_runs[variant]
    sts = statefulset(run)
    pod = sts["spec"]["template"]["spec"]
    c = containers(run)
    assert [x["name"] for x in pod["initContainers"]] == ["mesh-identity", "mesh"]
    assert [x["name"] for x in pod["containers"]] == ["gateway"]
    gateway, sidecar, identity = c["gateway"], c["mesh"], c["mesh-identity"]
    # the gateway container: unprivileged as before (non-root, read-only root, every capability dropped)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert gateway["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                          "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"          # its readiness unchanged
    # NET_ADMIN on the sidecar alone; nothing privileged anywhere
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert identity["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for x in c.values():
        sc = x["securityContext"]
        assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
    # a native sidecar, ready when its interface is up
    assert sidecar["restartPolicy"] == "Always" and "restartPolicy" not in identity
    for probe in ("startupProbe", "readinessProbe"):
        assert sidecar[probe]["exec"]["command"] == ["/usr/local/bin/mesh-sidecar", "ready"]
    assert sidecar["image"] == identity["image"] == run.exports["images"]["mesh"] and "@sha256:" in sidecar["image"]
    # the identities Secret is mounted by the identity step only; the sidecar reads its own from the
    # memory-backed scratch; the gateway container mounts neither
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["mesh-identities"]["secret"] == {"secretName": MESH_SECRET, "defaultMode": 0o400}
    assert volumes["mesh-run"]["emptyDir"]["medium"] == "Memory"
    mounts = {name: {m["name"] for m in x["volumeMounts"]} for name, x in c.items()}
    assert [n for n, m in mounts.items() if "mesh-identities" in m] == ["mesh-identity"]
    assert {n for n, m in mounts.items() if "mesh-run" in m} == {"mesh-identity", "mesh"}
    assert not mounts["gateway"] & {"mesh-identities", "mesh-run", "tun"}
    # the ordinal from the pod-index label (else the pod's name)
    env = {e["name"]: e for e in identity["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # wireguard-go's /dev/net/tun only where the stack asks for it, and only in the sidecar
    userspace = VARIANTS[variant][1]
    assert ("tun" in volumes) is userspace and [n for n, m in mounts.items() if "tun" in m] == (["mesh"] if userspace
                                                                                              else [])
    if userspace:
        assert volumes["tun"]["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    # a rotated key restarts the pods (each takes its identity at start): the keys' hash is on the template
    keys = {g.name: stable_key(g.name)[1] for g in gateways(run)}
    assert sts["spec"]["template"]["metadata"]["annotations"]["infermesh/mesh-keys"] == \
        hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_policy_opens_wireguard_and_nothing_of_the_mesh(mesh_runs, variant):
    run = mesh_runs[variant]
    policies = {r.inputs["metadata"]["name"]: unwrap(r.inputs["spec"])
                for r in run.mocks.of_type("kubernetes:networking.k8s.io/v1:NetworkPolicy")}
    rules = policies["gateway-ingress"]["ingress"]
    assert rules[0]["ports"] == [{"protocol": "TCP", "port": run.spec.gateway.port}]
    assert rules[1:] == [{"ports": [{"protocol": "UDP", "port": run.spec.mesh.port}]}]
    # mesh traffic leaves the tunnel inside the pod, where no NetworkPolicy sees it: the sidecar filters it,
    # letting mesh peers open the gateway port only
    env = {e["name"]: e.get("value") for e in containers(run)["mesh"]["env"]}
    assert env["MESH_ALLOW_TCP"] == str(run.spec.gateway.port)
    assert env["MESH_PEERS_FILE"].endswith(f"/{PEERS_CONF_KEY}")
    assert env["MESH_RUN_DIR"].startswith(MESH_RUN + "/")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_object_of_a_mesh_stack_is_valid_for_a_current_kubernetes(mesh_runs, variant):
    _, custom = validate_all(manifests(mesh_runs[variant]), variant)
    assert custom == CUSTOM


def test_the_identity_step_takes_the_pods_own_interface_from_the_rendered_secret(mesh_runs, tmp_path):
    """The sidecar script's identity step (no privileges needed) over the Secret the program rendered."""
    run = mesh_runs["prod-ssh"]
    secret = mesh_secret(run)
    identities = tmp_path / "identities"
    identities.mkdir()
    for name, text in unwrap(secret.inputs["stringData"]).items():
        (identities / name).write_text(text)

    def identity(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(SCRIPT), "identity"], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "MESH_IDENTITIES_DIR": str(identities),
                                   "MESH_RUN_DIR": str(tmp_path / "run"), **env})

    last = run.spec.gateway.max_replicas - 1
    for env, ordinal in (({"POD_INDEX": "4", "POD_NAME": f"{STATEFULSET}-4"}, 4),
                         ({"POD_INDEX": "", "POD_NAME": f"{STATEFULSET}-{last}"}, last)):   # no pod-index label
        done = identity(env)
        assert done.returncode == 0, done.stderr
        got = (tmp_path / "run" / "identity.conf").read_text()
        assert got == (identities / f"wg-gateway-{ordinal}.conf").read_text()
        assert (tmp_path / "run" / "node").read_text().strip() == f"gateway-{ordinal}"
        assert (tmp_path / "run" / "identity.conf").stat().st_mode & 0o077 == 0
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["identity.conf", "node"]
    beyond = identity({"POD_NAME": f"{STATEFULSET}-{last + 1}"})
    assert beyond.returncode != 0
    assert f"no mesh identity gateway-{last + 1}" in beyond.stderr and "max_replicas" in beyond.stderr
    assert f"({last + 1} declared)" in beyond.stderr
