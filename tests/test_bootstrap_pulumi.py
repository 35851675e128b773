"""`infermesh bootstrap --from-pulumi`: one source for a Pulumi-managed stack's mesh keys.

The Pulumi program runs under mocks (tests/test_pulumi_program.py) for prod with its first pool on SSH
hosts; its exports, secrets shown, are what a FAKE `pulumi` first on PATH prints for
`pulumi stack output --json --show-secrets`. The bootstrap writes the hosts file and the key file from
them and builds the inventory; the playbook run itself is replaced by a recorder (tests/test_mesh.py
runs the playbooks for real, on the controller's own keys). Shown: the SSH workers get exactly the keys
the gateway pods hold and dial the pods at their mesh names; the key file is owner-only; a missing CLI,
a failing one, a missing output or a malformed one is one line naming what to do, with no private key
printed; rotate-keys and drain refuse such a stack with the way to do it.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import jinja2
import pytest
import yaml

from fleet import mesh_keys
from fleet.ansible_run import PlaybookResult
from fleet.components.gateway import MESH_SECRET, mesh_hostname
from fleet.inventory import host_vars, load_hosts, nodes_of
from tests.test_gateway_mesh import ssh_variant
from tests.test_pulumi_program import ROOT, Run, run_program, unwrap

STACK = "prod-ssh"
TEMPLATE = ROOT / "playbooks" / "roles" / "mesh" / "templates" / "wg-quick.conf.j2"
@pytest.fixture(scope="module")
def stacks_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stacks")
    ssh_variant("prod", False, path, STACK)
    return path


@pytest.fixture(scope="module")
def program(stacks_dir) -> Run:
    mp = pytest.MonkeyPatch()
    try:
        return run_program(STACK, mp, stacks_dir=stacks_dir)
    finally:
        mp.undo()


@pytest.fixture
def outputs(program) -> dict:
    """`pulumi stack output --json --show-secrets` of the mocked program (a fresh copy per test)."""
    return json.loads(json.dumps(program.exports, default=str))



def printing(fake_pulumi, tmp_path: Path, doc: object) -> Path:
    """The FAKE pulumi prints `doc` as JSON (or `doc` itself when it is text)."""
    out = tmp_path / "stack-output.json"
    out.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return fake_pulumi(f'cat "{out}"')


@pytest.fixture
def playbooks(monkeypatch) -> list[dict]:
    """Replaces the playbook run: records what it was asked, answers success."""
    ran: list[dict] = []

    def run_playbook(playbook, **kw):
        ran.append({"playbook": playbook, **kw, "inventory_doc": json.loads(Path(kw["inventory"]).read_text())})
        return PlaybookResult(playbook=playbook, status="successful", rc=0)

    monkeypatch.setattr("infermesh_cli.commands.bootstrap.run_playbook", run_playbook)
    return ran


def bootstrap(stacks_dir: Path, state: Path, *extra: str) -> int:
    from infermesh_cli.main import main

    return main(["bootstrap", "--stack", STACK, "--stacks-dir", str(stacks_dir), "--state-dir", str(state), *extra])


def private_keys(outputs: dict) -> list[str]:
    return [pair["private_key"] for pair in outputs["mesh_keys"].values()]


def assert_no_private_key(captured, outputs: dict) -> None:
    text = captured.out + captured.err
    assert not any(p in text for p in private_keys(outputs))


def render_wg_quick(hv: dict, keys_file: Path) -> str:
    """The mesh role's wg-quick template as Ansible renders it (trim_blocks) for a host, its key file read here."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    return env.from_string(TEMPLATE.read_text()).render(
        **hv, ansible_managed="managed", mesh_keys=json.loads(keys_file.read_text()))


# ---- the success path -----------------------------------------------------------------------------------

def test_from_pulumi_writes_hosts_and_keys_and_the_workers_get_the_pods_keys(
        program, outputs, stacks_dir, tmp_path, fake_pulumi, playbooks, capsys):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # the operator's own settings in an earlier hosts file are kept
    (state / "hosts.yaml").write_text(yaml.safe_dump({"ssh_known_hosts": "/ops/known_hosts", "hosts": {}}))
    calls = printing(fake_pulumi, tmp_path, outputs)
    assert bootstrap(stacks_dir, state, "--from-pulumi") == 0
    captured = capsys.readouterr()
    assert calls.read_text().splitlines() == [f"stack output --stack {STACK} --json --show-secrets"]
    assert_no_private_key(captured, outputs)
    assert "from Pulumi stack prod-ssh:" in captured.err

    # the key file: Pulumi's keys exactly, owner-only, marked as Pulumi's
    keys_file = state / "mesh-keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert json.loads(keys_file.read_text()) == outputs["mesh_keys"]
    assert mesh_keys.read_source(keys_file) == f"Pulumi stack {STACK}"
    on_mesh = {n.name for n in program.plan.mesh if n.role == "gateway"} | \
        {x.name for x in program.plan.leases if x.connection == "ssh"}
    assert set(outputs["mesh_keys"]) == on_mesh

    # the hosts file: the SSH leases' addresses, the gateways as pods, the operator's settings kept
    hosts = load_hosts(state / "hosts.yaml")
    inv_out = outputs["ansible_inventory"]
    assert {n: h.ssh_host for n, h in hosts.hosts.items()} == {n: h["ssh_host"] for n, h in inv_out["hosts"].items()}
    assert hosts.kubernetes_gateways == inv_out["kubernetes_gateways"]
    assert hosts.ssh_known_hosts == "/ops/known_hosts"

    # the playbook ran on the SSH workers only, with the inventory built from them
    [ran] = playbooks
    assert ran["playbook"] == "bootstrap" and ran["limit"] is None
    inv = ran["inventory_doc"]
    ssh = sorted(x.name for x in program.plan.leases if x.connection == "ssh")
    gateways = [n for n in program.plan.mesh if n.role == "gateway"]
    assert nodes_of(inv, "gateways") == [] and sorted(nodes_of(inv, "workers")) == ssh
    assert inv["all"]["vars"]["mesh_kubernetes_gateways"] == sorted(g.name for g in gateways)
    assert inv["all"]["vars"]["mesh_keys_file"] == str(keys_file)
    assert not any(p in json.dumps(inv) for p in private_keys(outputs))         # names the file, never a key

    # each worker's WireGuard config (the mesh role's template): its Pulumi key, and one peer per gateway
    # pod at its load balancer's name, with the public key of the private key that pod holds
    pods = {name.removeprefix("wg-").removesuffix(".conf"): text for name, text in unwrap(next(
        s for s in program.mocks.of_type("kubernetes:core/v1:Secret")
        if s.inputs["metadata"]["name"] == MESH_SECRET).inputs["stringData"]).items()}
    assert sorted(pods) == sorted(g.name for g in gateways)
    pod_public = {g: mesh_keys.public_key(text.split("PrivateKey = ", 1)[1].split("\n", 1)[0])
                  for g, text in pods.items()}
    port = program.spec.mesh.port
    for worker in ssh:
        hv = host_vars(inv, worker)
        assert "worker_gateway_host" not in hv                  # no SSH gateway to ask; the pods are watched apart
        conf = render_wg_quick(hv, keys_file)
        assert f"PrivateKey = {outputs['mesh_keys'][worker]['private_key']}\n" in conf
        for g in gateways:
            assert (f"[Peer]\n# {g.name}\nPublicKey = {pod_public[g.name]}\nAllowedIPs = {g.address}/32\n"
                    f"Endpoint = {mesh_hostname(g.name, program.spec.gateway.host)}:{port}\n") in conf
    # ... and the pods' peer list (their ConfigMap) has each worker's public key from the same set
    from fleet.components.gateway import PEERS_KEY

    peers = json.loads(program.mocks.one("kubernetes:core/v1:ConfigMap").inputs["data"][PEERS_KEY])
    assert {p["name"]: p["public_key"] for p in peers} == {w: outputs["mesh_keys"][w]["public_key"] for w in ssh}

    # a later run without --from-pulumi uses the same keys and makes none
    before = keys_file.read_text()
    assert bootstrap(stacks_dir, state, "--limit", ssh[0]) == 0
    assert keys_file.read_text() == before
    assert playbooks[-1]["limit"] == ssh[0]


def test_a_key_missing_from_pulumis_file_is_not_made_here(outputs, stacks_dir, tmp_path, fake_pulumi, playbooks,
                                                          capsys):
    state = tmp_path / "state"
    printing(fake_pulumi, tmp_path, outputs)
    assert bootstrap(stacks_dir, state, "--from-pulumi") == 0
    keys = json.loads((state / "mesh-keys.json").read_text())
    worker = next(n for n in keys if not n.startswith("gateway-"))
    del keys[worker]
    mesh_keys.write(state / "mesh-keys.json", keys)
    capsys.readouterr()
    assert bootstrap(stacks_dir, state) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"have none for {worker}" in err
    assert f"`pulumi up --stack {STACK}`" in err and "--from-pulumi" in err
    assert worker not in json.loads((state / "mesh-keys.json").read_text())


def test_gateway_pods_with_the_controllers_own_keys_are_refused(outputs, stacks_dir, tmp_path, playbooks, capsys):
    """A hosts file naming gateway pods, with a key file that is not Pulumi's: the keys would differ from the pods'."""
    state = tmp_path / "state"
    state.mkdir()
    inv = outputs["ansible_inventory"]
    (state / "hosts.yaml").write_text(yaml.safe_dump({"hosts": inv["hosts"],
                                                      "kubernetes_gateways": inv["kubernetes_gateways"]}))
    assert bootstrap(stacks_dir, state) == 2
    err = capsys.readouterr().err
    assert "are Kubernetes pods" in err and "--from-pulumi" in err
    assert not (state / "mesh-keys.json").exists() and playbooks == []


# ---- rotation and drain on a Pulumi-keyed stack -------------------------------------------------------------

def test_rotate_keys_refuses_pulumis_keys_and_says_how(outputs, stacks_dir, tmp_path, fake_pulumi, playbooks,
                                                        capsys):
    state = tmp_path / "state"
    calls = printing(fake_pulumi, tmp_path, outputs)
    assert bootstrap(stacks_dir, state, "--playbook", "rotate-keys", "--from-pulumi") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mesh.rotation" in err and f"pulumi up --stack {STACK}" in err
    assert not calls.exists() and playbooks == []                # refused before anything is read or written
    assert bootstrap(stacks_dir, state, "--from-pulumi") == 0
    before = (state / "mesh-keys.json").read_text()
    capsys.readouterr()
    assert bootstrap(stacks_dir, state, "--playbook", "rotate-keys") == 2      # the marker says they are Pulumi's
    err = capsys.readouterr().err.strip()
    assert f"come from Pulumi stack {STACK}" in err and f"infermesh bootstrap --stack {STACK} --from-pulumi" in err
    assert (state / "mesh-keys.json").read_text() == before
    assert not mesh_keys.next_path(state / "mesh-keys.json").exists()
    assert [r["playbook"] for r in playbooks] == ["bootstrap"]


def test_drain_refuses_gateway_pods(outputs, stacks_dir, tmp_path, fake_pulumi, playbooks, capsys):
    state = tmp_path / "state"
    printing(fake_pulumi, tmp_path, outputs)
    assert bootstrap(stacks_dir, state, "--from-pulumi") == 0
    worker = sorted(outputs["ansible_inventory"]["hosts"])[0]
    assert bootstrap(stacks_dir, state, "--playbook", "drain", "--limit", worker) == 2
    assert "failover drain" in capsys.readouterr().err
    assert [r["playbook"] for r in playbooks] == ["bootstrap"]
    from infermesh_cli.main import main          # the Fabric drain too: nothing would stop the pods routing to it

    assert main(["ops", "drain", "--stack", STACK, "--stacks-dir", str(stacks_dir), "--state-dir", str(state),
                 "--host", worker]) == 2
    assert "ops drain: the gateways are Kubernetes pods" in capsys.readouterr().err


# ---- the failure paths: one line, nothing written, no key printed -----------------------------------------------

def _without(doc: dict, *path: str) -> dict:
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


def _swapped_public_key(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    a, b = sorted(doc["mesh_keys"])[:2]
    doc["mesh_keys"][a]["public_key"] = doc["mesh_keys"][b]["public_key"]
    return doc


@pytest.mark.parametrize("scenario, make, said", [
    ("pulumi exits non-zero", lambda o: "#exit:echo \"error: no stack named 'prod-ssh' found\" >&2; exit 255",
     "`pulumi stack output --stack prod-ssh --json --show-secrets` failed (exit status 255: error: no stack named "
     "'prod-ssh' found)"),
    ("silent failure", lambda o: "#exit:exit 3", "failed (exit status 3)"),
    ("no mesh_keys output", lambda o: _without(o, "mesh_keys"),
     "stack prod-ssh has no `mesh_keys` output (the mesh's keys, a secret): run `pulumi up --stack prod-ssh`"),
    ("no ansible_inventory output", lambda o: _without(o, "ansible_inventory"),
     "stack prod-ssh has no `ansible_inventory` output"),
    ("an older program's inventory", lambda o: _without(o, "ansible_inventory", "kubernetes_gateways"),
     "lacks `kubernetes_gateways`"),
    ("malformed JSON", lambda o: json.dumps(o)[: len(json.dumps(o)) // 2], "printed no JSON ("),
    ("not an object", lambda o: json.dumps([o]), "printed a JSON list, not the stack's outputs"),
    ("secrets hidden", lambda o: {**o, "mesh_keys": "[secret]"}, "came back hidden ([secret])"),
    ("a pair that does not match", _swapped_public_key, "is not a WireGuard key pair"),
])
def test_from_pulumi_failures_are_one_line(scenario, make, said, outputs, stacks_dir, tmp_path, fake_pulumi,
                                           playbooks, capsys):
    doc = make(outputs)
    if isinstance(doc, str) and doc.startswith("#exit:"):
        fake_pulumi(doc.removeprefix("#exit:"))
    else:
        printing(fake_pulumi, tmp_path, doc)
    state = tmp_path / "state"
    assert bootstrap(stacks_dir, state, "--from-pulumi") == 2, scenario
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and captured.out == "", scenario
    assert err.startswith("infermesh bootstrap: ") and said in err, err
    assert "Traceback" not in err
    assert_no_private_key(captured, outputs)
    assert not (state / "mesh-keys.json").exists() and not (state / "hosts.yaml").exists()
    assert playbooks == []


def test_without_the_pulumi_cli_it_says_what_to_install(outputs, stacks_dir, tmp_path, monkeypatch, playbooks,
                                                        capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))           # no pulumi anywhere on PATH
    assert bootstrap(stacks_dir, tmp_path / "state", "--from-pulumi") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "there is no `pulumi` on PATH: install the Pulumi CLI" in err
    assert not (tmp_path / "state").exists() and playbooks == []


# ---- the hosts file's kubernetes_gateways -------------------------------------------------------------------

def test_hosts_file_kubernetes_gateways_are_checked(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump({"hosts": {"gateway-0": "192.0.2.1"},
                                    "kubernetes_gateways": {"gateway-0": "gateway-0.mesh.example"}}))
    from fleet.inventory import InventoryError

    with pytest.raises(InventoryError, match="under both hosts"):
        load_hosts(path)
    path.write_text(yaml.safe_dump({"hosts": {}, "kubernetes_gateways": ["gateway-0"]}))
    with pytest.raises(InventoryError, match="kubernetes_gateways: expected gateway node -> host name"):
        load_hosts(path)
