"""The bootstrap path for real, on one machine: three hosts as network namespaces, each with its
own sshd, bootstrapped by the real playbooks through ansible-runner over SSH into a WireGuard
mesh (wireguard-go), with sim workers behind a mesh-only firewall and the real gateway in front.

Run alone with `make test-mesh`. Needs root and the system packages of
scripts/install-system-deps.sh (`make test` runs it first); skipped otherwise.

The tests share one lab (module scope) and run in order: each later test relies on the state
the earlier ones checked (the drain comes last).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.mesh.lab import Host, Lab, cleanup_leftovers, remove_stale_tmp, require_lab, wait_until

pytestmark = pytest.mark.mesh

REPO = Path(__file__).resolve().parent.parent
STACKS_DIR = REPO / "tests" / "mesh"
STACK = "meshtest"
MODEL = "mesh-chat"
GATEWAY_PORT = 8080
WORKER_PORT = 8000
NODES = {"gw": "gateway-0", "w1": "meshpool-0", "w2": "meshpool-1"}


require_lab("network namespaces, sshd, wireguard-go")


# ---- the lab ----------------------------------------------------------------------------------

@dataclass
class Mesh:
    lab: Lab
    tmp: Path
    hosts_file: Path
    state_dir: Path
    gateway_state: Path
    routing_file: Path
    api_key: str
    plan_addresses: dict[str, str]
    bootstrap: dict = field(default_factory=dict)
    gateway: subprocess.Popen | None = None

    @property
    def gw(self) -> Host:
        return self.lab.host("gw")

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gw.ip}:{GATEWAY_PORT}"

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "infermesh_cli", *args, "--stack", STACK, "--stacks-dir", str(STACKS_DIR),
               "--inventory-hosts", str(self.hosts_file), "--state-dir", str(self.state_dir)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def playbook(self, *args: str) -> dict:
        r = self.cli("bootstrap", "--json", *args)
        assert r.stdout.strip(), f"no summary; stderr:\n{r.stderr}"
        result = json.loads(r.stdout)
        assert r.returncode == (0 if result["ok"] else 1)
        if not result["ok"]:
            log = Path(result["artifact_dir"], "stdout")
            tail = log.read_text()[-6000:] if log.exists() else ""
            pytest.fail(f"{args}: {result['failures']}\n--- ansible log tail ---\n{tail}\n{r.stderr}")
        return result

    def admin_endpoints(self) -> dict[str, dict]:
        token = (self.gateway_state / "admin.token").read_text().strip()
        req = urllib.request.Request(f"{self.gateway_url}/admin/endpoints",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            view = json.load(r)
        return {ep["id"]: ep for pool in view["pools"] for ep in pool["endpoints"]}

    def worker_served(self, name: str) -> float:
        """Requests the worker finished, read from its /metrics across the mesh (from the gateway host)."""
        url = f"http://{self.plan_addresses[NODES[name]]}:{WORKER_PORT}/metrics"
        probe = ("import urllib.request,sys\n"
                 f"t=urllib.request.urlopen({url!r},timeout=5).read().decode()\n"
                 "print(sum(float(l.rsplit(' ',1)[1]) for l in t.splitlines()"
                 " if l.startswith('vllm:request_success_total{')))\n")
        return float(self.gw.exec(sys.executable, "-c", probe).stdout)

    def client(self):
        import openai

        # No SDK retries: every error the gateway returns is seen and counted.
        return openai.OpenAI(base_url=f"{self.gateway_url}/v1", api_key=self.api_key, max_retries=0, timeout=90)


def write_hosts_file(lab: Lab, tmp: Path, gateway_state: Path, routing_file: Path) -> Path:
    """The lease outputs a real run would record, plus per-host paths: the lab's hosts share one
    filesystem, so each gets its own /etc, /opt, /run and log directories."""
    hosts: dict = {
        "ssh_known_hosts": str(lab.known_hosts),
        "ssh_private_key_file": str(lab.client_key),
        "vars": {
            # This machine's pyenv shims are not a Python for modules; the system one is.
            "ansible_python_interpreter": "/usr/bin/python3",
            # The sim engine comes from this checkout's venv instead of a pip install on the host.
            "worker_python": sys.executable,
            "worker_install_package": False,
            "mesh_install_packages": False,
            "firewall_install_packages": False,
            "preflight_disk_path": str(tmp),
        },
        "hosts": {},
    }
    for h in lab.hosts:
        r = h.root
        v = {"mesh_interface": h.wg_interface, "mesh_config_dir": f"{r}/etc/wireguard",
             "worker_root": f"{r}/opt/infermesh", "worker_config_dir": f"{r}/etc/infermesh",
             "worker_log_dir": f"{r}/log", "worker_run_dir": f"{r}/run"}
        if h.name == "gw":
            v.update({"routing_file": str(routing_file), "gateway_url": f"http://{h.ip}:{GATEWAY_PORT}",
                      "gateway_admin_token_file": str(gateway_state / "admin.token")})
        hosts["hosts"][h.node] = {"ssh_host": h.ip, "vars": v}
    path = tmp / "hosts.yaml"
    path.write_text(yaml.safe_dump(hosts))
    return path


def start_gateway(mesh: Mesh) -> subprocess.Popen:
    """The gateway host runs the gateway and nothing else, on its switch address."""
    env = {k: v for k, v in os.environ.items() if k not in ("INFERMESH_ADMIN_TOKEN", "INFERMESH_STATE_DIR")}
    log = open(mesh.tmp / "gateway.log", "w")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", mesh.gw.ns, sys.executable, "-m", "gateway", "--stack", STACK,
         "--stacks-dir", str(STACKS_DIR), "--routing", str(mesh.routing_file), "--host", mesh.gw.ip,
         "--port", str(GATEWAY_PORT), "--state-dir", str(mesh.gateway_state), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    wait_until("the gateway answers", lambda: urllib.request.urlopen(f"{mesh.gateway_url}/health", timeout=2).status
               == 200, timeout_s=30)
    return proc


def _dump_logs(tmp: Path, lab: Lab) -> None:
    """On failure: the gateway's and workers' logs, so a CI failure explains itself."""
    for path in [tmp / "gateway.log", *(h.root / "log" / "infermesh-worker.log" for h in lab.hosts)]:
        if path.exists():
            print(f"--- {path.relative_to(tmp)} (tail) ---\n{path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    from fleet.plan import build_plan
    from fleet.spec import load
    from gateway.keys import KeyAdmin

    lock = Lab(Path(tempfile.gettempdir()))
    lock.acquire()  # one lab per machine: another session's run waits here
    # What a killed earlier run left: namespaces, links, WireGuard sockets, tmp dirs.
    cleanup_leftovers()
    remove_stale_tmp()
    tmp = Path(tempfile.mkdtemp(prefix="imt-mesh-"))
    lab = Lab(tmp)
    state_dir = tmp / "controller"
    m = None
    failed_before = request.session.testsfailed
    try:
        for i, (name, node) in enumerate(NODES.items()):
            lab.add_host(name, node, i)
        lab.up()
        plan = build_plan(load(STACK, STACKS_DIR))
        gateway_state = lab.host("gw").root / "gateway-state"
        gateway_state.mkdir(parents=True)
        routing_file = lab.host("gw").root / "etc" / "infermesh" / "routing.json"
        routing_file.parent.mkdir(parents=True)
        # Before bootstrap the gateway knows the model but no worker: the playbook publishes them.
        routing_file.write_text(json.dumps({"stack": STACK, "models": [{"id": MODEL, "fallback": None, "pools": []}]}))
        key, _ = KeyAdmin(gateway_state / "keys.db").create("mesh-lab", "pro")
        m = Mesh(lab=lab, tmp=tmp, hosts_file=write_hosts_file(lab, tmp, gateway_state, routing_file),
                 state_dir=state_dir, gateway_state=gateway_state, routing_file=routing_file, api_key=key,
                 plan_addresses={n.name: n.address for n in plan.mesh})
        m.gateway = start_gateway(m)
        m.bootstrap = m.playbook()
        yield m
    finally:
        if m is not None and m.gateway is not None and m.gateway.poll() is None:
            m.gateway.terminate()
            try:
                m.gateway.wait(15)
            except subprocess.TimeoutExpired:
                m.gateway.kill()
        if request.session.testsfailed > failed_before:
            _dump_logs(tmp, lab)
        problems = lab.down(control_dirs=[state_dir / "ansible" / "cp"])
        lock.release()
        assert not problems, f"lab cleanup left: {problems}"


# ---- a steady client load ---------------------------------------------------------------------

class Load:
    """Client threads sending chat requests (half streamed) through the gateway until stopped."""

    def __init__(self, mesh: Mesh, threads: int = 4) -> None:
        self.mesh, self.n = mesh, threads
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        client = self.mesh.client()
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                if (i + n) % 2:
                    r = client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"q {i} {n}"}])
                    assert r.choices[0].message.content
                else:
                    chunks = list(client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"s {i} {n}"}], stream=True))
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                with self._lock:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                with self._lock:
                    self.errors.append(repr(e)[:300])

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def connect(host: Host, address: str, port: int, timeout: float = 3.0) -> str:
    """TCP connect from inside a host's namespace: 'connected', 'refused' or 'timeout'."""
    probe = ("import socket\n"
             f"s=socket.socket(); s.settimeout({timeout})\n"
             "try:\n"
             f"    s.connect(({address!r},{port})); print('connected')\n"
             "except ConnectionRefusedError: print('refused')\n"
             "except (TimeoutError, socket.timeout): print('timeout')\n")
    return host.exec(sys.executable, "-c", probe, timeout=timeout + 20).stdout.strip()


def connect_from_root(address: str, port: int, timeout: float = 3.0) -> str:
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((address, port))
        return "connected"
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    finally:
        s.close()


# ---- the tests, in order ----------------------------------------------------------------------

def test_bootstrap_succeeds_on_every_host(mesh: Mesh) -> None:
    result = mesh.bootstrap
    assert result["ok"] and result["status"] == "successful"
    assert set(result["hosts"]) == set(NODES.values())
    for host, stats in result["hosts"].items():
        assert stats["failed"] == 0 and stats["unreachable"] == 0, host
        assert stats["changed"] > 0, f"{host}: a first run must have changed something"
    # The routing the gateway reloads came from the plan: the workers' mesh addresses.
    routing = json.loads(mesh.routing_file.read_text())
    urls = sorted(ep["url"] for p in routing["models"][0]["pools"] for ep in p["endpoints"])
    assert urls == sorted(f"http://{mesh.plan_addresses[n]}:{WORKER_PORT}" for n in ("meshpool-0", "meshpool-1"))


def test_wireguard_handshakes_and_traffic_cross_the_mesh(mesh: Mesh) -> None:
    keys = json.loads((mesh.state_dir / "mesh-keys.json").read_text())
    gw_if = mesh.gw.wg_interface
    # The gateway's interface holds its own key and has one peer per worker, by the workers' keys.
    assert mesh.gw.exec("wg", "show", gw_if, "public-key").stdout.strip() == keys["gateway-0"]["public_key"]
    for name in ("w1", "w2"):
        node = NODES[name]
        worker = mesh.lab.host(name)
        mesh.gw.exec("ping", "-c", "2", "-W", "3", mesh.plan_addresses[node])
        worker.exec("ping", "-c", "2", "-W", "3", mesh.plan_addresses["gateway-0"])
        handshakes = dict(line.split() for line in mesh.gw.exec("wg", "show", gw_if, "latest-handshakes")
                          .stdout.splitlines())
        assert int(handshakes[keys[node]["public_key"]]) > 0, f"no handshake between gateway-0 and {node}"
        worker_side = dict(line.split() for line in worker.exec("wg", "show", worker.wg_interface,
                                                                "latest-handshakes").stdout.splitlines())
        assert int(worker_side[keys["gateway-0"]["public_key"]]) > 0
        transfer = {k: (int(rx), int(tx)) for k, rx, tx in (line.split() for line in mesh.gw.exec(
            "wg", "show", gw_if, "transfer").stdout.splitlines())}
        rx, tx = transfer[keys[node]["public_key"]]
        assert rx > 0 and tx > 0, f"no traffic between gateway-0 and {node} through WireGuard"
    # The mesh addresses exist only on the WireGuard interfaces: nothing else could have carried the pings.
    assert mesh.plan_addresses["meshpool-0"] not in mesh.lab.host("w1").exec("ip", "-4", "addr", "show", "eth0").stdout


def test_gateway_serves_openai_sdk_requests_through_the_mesh(mesh: Mesh) -> None:
    wait_until("the gateway sees both workers available",
               lambda: all(ep["available"] for ep in mesh.admin_endpoints().values())
               and len(mesh.admin_endpoints()) == 2)
    before = {w: mesh.worker_served(w) for w in ("w1", "w2")}
    client = mesh.client()
    for i in range(12):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hello {i}"}])
        assert r.object == "chat.completion" and r.choices[0].message.content
        assert r.usage is not None and r.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "stream"}], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    models = [m.id for m in client.models.list().data]
    assert models == [MODEL]
    after = {w: mesh.worker_served(w) for w in ("w1", "w2")}
    assert sum(after.values()) - sum(before.values()) >= 13
    assert all(after[w] > before[w] for w in after), f"both workers should serve: {before} -> {after}"


def test_worker_port_answers_only_over_the_mesh(mesh: Mesh) -> None:
    w1 = mesh.lab.host("w1")
    # Across the mesh: open.
    assert connect(mesh.gw, mesh.plan_addresses["meshpool-0"], WORKER_PORT) == "connected"
    # To the worker's own (non-mesh) address, from the gateway host and from the controller: the
    # firewall drops it (a timeout; without the firewall a mesh-bound engine would refuse at once).
    assert connect(mesh.gw, w1.ip, WORKER_PORT) == "timeout"
    assert connect_from_root(w1.ip, WORKER_PORT) == "timeout"
    # Even a packet addressed to the mesh address but arriving on eth0 is dropped: route the
    # mesh address via the switch from the other worker and try.
    w2 = mesh.lab.host("w2")
    w2.exec("ip", "route", "add", f"{mesh.plan_addresses['meshpool-0']}/32", "via", w1.ip, "dev", "eth0", "metric", "1")
    try:
        w2_route = w2.exec("ip", "route", "get", mesh.plan_addresses["meshpool-0"]).stdout
        assert "eth0" in w2_route
        assert connect(w2, mesh.plan_addresses["meshpool-0"], WORKER_PORT) == "timeout"
    finally:
        w2.exec("ip", "route", "del", f"{mesh.plan_addresses['meshpool-0']}/32", "via", w1.ip, check=False)
    rules = w1.exec("iptables", "-S", "INFERMESH-WORKER").stdout
    assert f"-i {w1.wg_interface}" in rules and "-j DROP" in rules


def test_a_second_bootstrap_changes_nothing(mesh: Mesh) -> None:
    result = mesh.playbook()
    changed = {h: s["changed"] for h, s in result["hosts"].items()}
    assert set(changed) == set(NODES.values())
    assert all(c == 0 for c in changed.values()), f"second run changed: {changed}"


def test_preflight_refuses_a_host_without_a_gpu_unless_the_stack_allows_sim(mesh: Mesh) -> None:
    strict_dir = mesh.tmp / "strict-stack"
    strict_dir.mkdir()
    doc = yaml.safe_load((STACKS_DIR / f"Pulumi.{STACK}.yaml").read_text())
    doc["config"]["infermesh:allow_sim_workers"] = False
    (strict_dir / f"Pulumi.{STACK}.yaml").write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "infermesh_cli", "bootstrap", "--json", "--stack", STACK,
           "--stacks-dir", str(strict_dir), "--inventory-hosts", str(mesh.hosts_file),
           "--state-dir", str(mesh.state_dir), "--limit", "meshpool-0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    result = json.loads(r.stdout)
    assert r.returncode == 1 and not result["ok"]
    assert result["hosts"]["meshpool-0"]["failed"] == 1
    assert result["hosts"]["gateway-0"]["failed"] == 0
    [failure] = [f for f in result["failures"] if f["host"] == "meshpool-0"]
    assert "no NVIDIA GPU" in failure["message"] and "allow_sim_workers" in failure["message"]
    # Refused before anything changed: the worker still serves.
    assert mesh.admin_endpoints()["meshpool/0"]["available"]


def test_ops_diag_and_logs_over_fabric(mesh: Mesh) -> None:
    r = mesh.cli("ops", "diag", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    reports = {rep["node"]: rep for rep in json.loads(r.stdout)}
    assert set(reports) == set(NODES.values())
    assert set(reports["gateway-0"]["peers"]) == {"meshpool-0", "meshpool-1"}
    for node in ("meshpool-0", "meshpool-1"):
        assert reports[node]["worker"]["health"] == 200
        assert reports[node]["peers"]["gateway-0"]["handshake_age_s"] is not None
        assert reports[node]["gpus"] == []
    r = mesh.cli("ops", "logs", "--host", "meshpool-0", "--lines", "20")
    assert r.returncode == 0 and "serving mesh-chat" in r.stdout, r.stdout + r.stderr


def test_partition_fails_over_then_heals(mesh: Mesh) -> None:
    w1 = mesh.lab.host("w1")
    client = mesh.client()
    mesh.lab.partition(w1)
    try:
        # Requests started after the cut: streamed ones reach a healthy worker even while the
        # gateway has not noticed yet (a worker that sends no first event within ttft_s is
        # retried elsewhere). None may fail.
        served_w2 = mesh.worker_served("w2")
        errors = []

        def streamed(i: int) -> None:
            try:
                chunks = list(client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"cut {i}"}], stream=True))
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e)[:300])

        threads = [threading.Thread(target=streamed, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        wait_until("the gateway takes the cut worker out",
                   lambda: not mesh.admin_endpoints()["meshpool/0"]["available"], timeout_s=30)
        # Once it knows, plain requests go to the other worker only.
        for i in range(10):
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"after {i}"}])
            assert r.choices[0].message.content
        assert mesh.worker_served("w2") >= served_w2 + 18
    finally:
        mesh.lab.heal(w1)
    wait_until("the healed worker is back in rotation",
               lambda: mesh.admin_endpoints()["meshpool/0"]["available"], timeout_s=60)
    served_w1 = mesh.worker_served("w1")

    def w1_serves() -> bool:
        for i in range(4):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"back {i}"}])
        return mesh.worker_served("w1") > served_w1

    wait_until("the healed worker serves requests again", w1_serves, timeout_s=30)


def test_rotate_keys_under_load_drops_nothing(mesh: Mesh) -> None:
    keys_file = mesh.state_dir / "mesh-keys.json"
    old = json.loads(keys_file.read_text())
    with Load(mesh) as load:
        time.sleep(1)
        result = mesh.playbook("--playbook", "rotate-keys")
        time.sleep(2)
    new = json.loads(keys_file.read_text())
    assert result["ok"]
    assert all(new[n]["public_key"] != old[n]["public_key"] for n in NODES.values())
    for h in mesh.lab.hosts:
        assert h.exec("wg", "show", h.wg_interface, "public-key").stdout.strip() == new[h.node]["public_key"]
    peers = dict(line.split() for line in mesh.gw.exec("wg", "show", mesh.gw.wg_interface, "latest-handshakes")
                 .stdout.splitlines())
    assert set(peers) == {new["meshpool-0"]["public_key"], new["meshpool-1"]["public_key"]}
    assert all(int(ts) > 0 for ts in peers.values())
    # for a failure's message: what the gateway's router saw, and how many peers each node re-added
    ansible_log = Path(result["artifact_dir"], "stdout")
    why = "\n".join([ln for ln in (mesh.tmp / "gateway.log").read_text().splitlines() if "infermesh.router" in ln]
                    + [ln.strip() for ln in (ansible_log.read_text().splitlines() if ansible_log.exists() else [])
                       if "re-added peers" in ln])
    assert load.ok > 0 and load.errors == [], f"{len(load.errors)} errors: {load.errors[:3]}\n{why}"


def test_drain_removes_a_worker_under_load_without_dropping_requests(mesh: Mesh) -> None:
    w2_addr = mesh.plan_addresses["meshpool-1"]
    w2 = mesh.lab.host("w2")
    served_before = mesh.worker_served("w2")
    with Load(mesh) as load:
        wait_until("the worker to be drained takes load", lambda: mesh.worker_served("w2") > served_before + 5)
        result = mesh.playbook("--playbook", "drain", "--limit", "meshpool-1")
        ok_at_drain = load.ok
        time.sleep(3)  # keep the load on: every request now goes to the remaining worker
    assert result["ok"]
    assert load.errors == [], f"{len(load.errors)} dropped of {load.ok + len(load.errors)}: {load.errors[:3]}"
    assert load.ok > ok_at_drain > 0
    # The gateway no longer routes to it, the routing file left it out, and its engine is gone.
    assert "meshpool/1" not in mesh.admin_endpoints()
    routing = json.loads(mesh.routing_file.read_text())
    assert [ep["id"] for p in routing["models"][0]["pools"] for ep in p["endpoints"]] == ["meshpool/0"]
    assert connect(mesh.gw, w2_addr, WORKER_PORT) in ("refused", "timeout")
    assert not (w2.root / "run" / "infermesh-worker.pid").exists()
    assert "supervise: stopped" in (w2.root / "log" / "infermesh-worker.log").read_text()
