"""The gateway pods' WireGuard sidecar (images/mesh/mesh-sidecar) for real, in network namespaces.

One namespace plays a gateway pod (its network namespace is the pod's), two play SSH workers,
joined by veth pairs (the underlay). The very script the image runs does what it does in the pod:
the identity step takes ordinal 3's [Interface] out of the four identities the program renders
(fleet.components.mesh.interface_config), the sidecar brings the interface up (kernel WireGuard
where the kernel has it, else wireguard-go on /dev/net/tun, as on nodes without the module) with
the ConfigMap's peer list (fleet.components.mesh.peers_config), and the workers dial it with the
configs the program gives them (interface_config + peer_config, keepalive). Shown: the probe, a
handshake and HTTP requests across the tunnel, the filter on the tunnel (the gateway port only),
a peer added to the list joining live without a restart, and SIGTERM taking the interface down.

Every name starts with ``imw-`` (namespaces, links, wireguard-go sockets), so a cleanup finds what
a killed run left; only processes inside these namespaces or started here are signalled. Needs
root, ip, wg, wg-quick, wireguard-go and iptables (scripts/install-system-deps.sh); skipped
otherwise, like tests/test_mesh.py. Takes a few seconds; independent of the mesh lab.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet import mesh_keys
from fleet.components.mesh import interface_config, peer_config, peers_config
from fleet.plan import assign_addresses
from tests.mesh import lab
from tests.mesh.lab import require_lab

pytestmark = pytest.mark.mesh

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "images" / "mesh" / "mesh-sidecar"
PREFIX = "imw-"
GW, W1, W2 = f"{PREFIX}gw", f"{PREFIX}w1", f"{PREFIX}w2"      # namespaces (and the workers' interfaces)
GW_IF = f"{PREFIX}gw0"                  # wg0 in the pod; unique here (wireguard-go's sockets are per machine)
UNDERLAY = {W1: ("10.237.1.1", "10.237.1.2"), W2: ("10.237.2.1", "10.237.2.2")}    # gateway side, worker side
CIDR = "10.238.0.0/24"
MESH_PORT = 51820
ALLOWED, BLOCKED = 18080, 19090         # the gateway port, and any other port of the pod
ORDINAL, IDENTITIES = 3, 4              # this pod is infermesh-gateway-3 of a fleet that may scale to 4
# the image runs the script with busybox's ash and applets (alpine); dash and the system's tools as well
SHELLS = ["busybox", "dash"] if shutil.which("busybox") else ["dash"]
APPLETS = ("sh", "sed", "tr", "head", "cmp", "date", "sleep", "cat", "mv", "cp", "rm", "mkdir", "chmod", "grep",
           "hostname")
WG_RUN_DIR = Path("/var/run/wireguard")
LOCK_FILE = Path("/run/lock/imw-mesh-sidecar.lock")


require_lab("network namespaces, WireGuard")

wait_until = functools.partial(lab.wait_until, timeout_s=20, interval=0.2)   # the sidecar's steps are quick


def sh(*cmd: str, check: bool = True, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, env=env)


def in_ns(ns: str, *cmd: str, check: bool = True, timeout: float = 30, env: dict | None = None):
    return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout, env=env)


def _namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def cleanup() -> None:
    """Every imw- namespace with every process inside it, every imw- link and wireguard-go socket."""
    for ns in _namespaces():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline and sh("ip", "netns", "pids", ns, check=False).stdout.split():
                time.sleep(0.1)
        sh("ip", "netns", "del", ns, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            sh("ip", "link", "del", name, check=False)
    if WG_RUN_DIR.is_dir():
        for sock in WG_RUN_DIR.glob(f"{PREFIX}*"):
            with contextlib.suppress(OSError):
                sock.unlink()


@dataclass
class Net:
    tmp: Path
    keys: dict[str, mesh_keys.KeyPair]
    addresses: dict[str, str]
    env: dict[str, str]                 # the sidecar's environment, as the GatewayFleet sets it
    shell: list[str]                    # what runs the script
    peers_file: Path
    log: Path
    sidecar: subprocess.Popen | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def script(self, step: str, check: bool = False) -> subprocess.CompletedProcess:
        return in_ns(GW, *self.shell, str(SCRIPT), step, check=check, env=self.env)

    def write_peers(self, workers: list[str]) -> None:
        """As the kubelet updates a ConfigMap volume: the new file replaces the old one at once."""
        text = peers_config([{"name": w, "public_key": self.keys[w]["public_key"],
                              "allowed_ips": [f"{self.addresses[w]}/32"]} for w in workers])
        tmp = self.peers_file.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, self.peers_file)

    def start_worker(self, ns: str) -> None:
        """A worker as the program configures one: its interface and the gateway as a peer it dials."""
        prefix = int(CIDR.rsplit("/", 1)[1])
        conf = self.tmp / f"{ns}.conf"
        conf.write_text(interface_config(self.keys[ns]["private_key"], self.addresses[ns], prefix, None)
                        + peer_config(self.keys["gateway-3"]["public_key"], self.addresses["gateway-3"],
                                      f"{UNDERLAY[ns][0]}:{MESH_PORT}", 1))
        conf.chmod(0o600)
        in_ns(ns, "wg-quick", "up", str(conf), timeout=30)
        www = self.tmp / f"www-{ns}"
        www.mkdir()
        (www / "hello").write_text(f"worker {ns}\n")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", "--bind", self.addresses[ns],
             "--directory", str(www), "8000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))

    def get(self, worker: str, timeout: float = 3) -> str:
        """An HTTP request from the gateway pod's namespace to a worker's mesh address."""
        code = (f"import urllib.request; print(urllib.request.urlopen('http://{self.addresses[worker]}:8000/hello',"
                f" timeout={timeout}).read().decode(), end='')")
        return in_ns(GW, sys.executable, "-c", code, timeout=timeout + 10).stdout

    def handshake(self, worker: str) -> int:
        out = in_ns(GW, "wg", "show", GW_IF, "latest-handshakes").stdout
        times = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
        return int(times.get(self.keys[worker]["public_key"], "0"))


def _connects(ns: str, host: str, port: int) -> bool:
    code = (f"import socket; s = socket.create_connection(('{host}', {port}), timeout=2); "
            "print(s.recv(16).decode(), end='')")
    r = in_ns(ns, sys.executable, "-c", code, check=False, timeout=15)
    return r.returncode == 0 and r.stdout == "pod"


@pytest.fixture(scope="module", params=SHELLS)
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK_FILE, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    for stale in Path(tempfile.gettempdir()).glob(f"{PREFIX}sidecar-*"):     # a killed run's (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}sidecar-"))
    n = None
    try:
        cleanup()
        for ns in (GW, W1, W2):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        for ns, (gw_ip, w_ip) in UNDERLAY.items():
            gw_end, w_end = f"{PREFIX}g-{ns[-2:]}", f"{PREFIX}{ns[-2:]}-g"
            sh("ip", "link", "add", gw_end, "netns", GW, "type", "veth", "peer", "name", w_end, "netns", ns)
            in_ns(GW, "ip", "address", "add", f"{gw_ip}/24", "dev", gw_end)
            in_ns(ns, "ip", "address", "add", f"{w_ip}/24", "dev", w_end)
            in_ns(GW, "ip", "link", "set", gw_end, "mtu", "9000", "up")       # a cluster network's jumbo frames
            in_ns(ns, "ip", "link", "set", w_end, "mtu", "9000", "up")
        in_ns(GW, "ip", "route", "add", "default", "via", UNDERLAY[W1][1])    # the pod's default route (eth0)
        gateways = [f"gateway-{i}" for i in range(IDENTITIES)]
        addresses = assign_addresses(CIDR, gateways, [W1, W2])
        keys = {node: mesh_keys.generate() for node in addresses}
        # the identities Secret as the program renders it: every identity's [Interface]
        identities = tmp / "identities"
        identities.mkdir(mode=0o700)
        prefix = int(CIDR.rsplit("/", 1)[1])
        for g in gateways:
            path = identities / f"wg-{g}.conf"
            path.write_text(interface_config(keys[g]["private_key"], addresses[g], prefix, MESH_PORT))
            path.chmod(0o400)
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        shell = ["sh"]
        if request.param == "busybox":
            # alpine's userland: busybox applets first, then ip, wg, iptables and wireguard-go
            (tmp / "bin").mkdir()
            for applet in APPLETS:
                (tmp / "bin" / applet).symlink_to(shutil.which("busybox"))
            path, shell = f"{tmp / 'bin'}:{path}", ["busybox", "sh"]
        env = {"PATH": path,
               "POD_INDEX": "", "POD_NAME": f"infermesh-gateway-{ORDINAL}",
               "MESH_IDENTITIES_DIR": str(identities), "MESH_RUN_DIR": str(tmp / "run" / "infermesh-mesh"),
               "MESH_PEERS_FILE": str(tmp / "wg-peers.conf"), "MESH_INTERFACE": GW_IF,
               "MESH_WIREGUARD": "auto", "MESH_ALLOW_TCP": str(ALLOWED), "MESH_SYNC_S": "1"}
        n = Net(tmp=tmp, keys=keys, addresses=addresses, env=env, shell=shell, peers_file=tmp / "wg-peers.conf",
                log=tmp / "sidecar.log")
        n.write_peers([W1])                  # W2 is not a peer yet
        yield n
    finally:
        if n is not None:
            for p in [*n.procs, *([n.sidecar] if n.sidecar else [])]:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    assert not _namespaces(), "namespaces left behind"


def test_the_identity_step_takes_this_pods_own_key_only(net):
    done = net.script("identity")
    assert done.returncode == 0, done.stderr
    run_dir = Path(net.env["MESH_RUN_DIR"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["identity.conf", "node"]
    text = (run_dir / "identity.conf").read_text()
    assert net.keys["gateway-3"]["private_key"] in text
    assert not any(net.keys[f"gateway-{i}"]["private_key"] in text for i in range(IDENTITIES) if i != ORDINAL)
    assert run_dir.stat().st_mode & 0o077 == 0 and (run_dir / "identity.conf").stat().st_mode & 0o077 == 0


def test_the_sidecar_brings_the_interface_up_and_the_probe_says_so(net):
    assert net.script("ready").returncode != 0                    # not ready before it runs
    with open(net.log, "w") as log:          # the sidecar keeps its own descriptor of it
        net.sidecar = subprocess.Popen(["ip", "netns", "exec", GW, *net.shell, str(SCRIPT), "run"], env=net.env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until("the probe passes", lambda: net.script("ready").returncode == 0, log=net.log)
    assert net.sidecar.poll() is None
    # the pod's interface: its own key, address and port, and the ConfigMap's peer (W1) only
    assert in_ns(GW, "wg", "show", GW_IF, "public-key").stdout.strip() == net.keys["gateway-3"]["public_key"]
    assert in_ns(GW, "wg", "show", GW_IF, "listen-port").stdout.strip() == str(MESH_PORT)
    assert f"inet {net.addresses['gateway-3']}/24" in in_ns(GW, "ip", "-o", "address", "show", "dev", GW_IF).stdout
    assert in_ns(GW, "wg", "show", GW_IF, "peers").stdout.split() == [net.keys[W1]["public_key"]]
    # the tunnel crosses the internet: 1420 at most, whatever the pod's own device carries (9000 here)
    assert " mtu 1420 " in in_ns(GW, "ip", "-o", "link", "show", "dev", GW_IF).stdout
    log = net.log.read_text()
    # the kernel's WireGuard where it has the module, else the documented fallback
    assert "]: kernel WireGuard\n" in log or ("no kernel WireGuard module: falling back to wireguard-go" in log
                                              and "wireguard-go (pid" in log), log
    assert f"up: gateway-3 at {net.addresses['gateway-3']}/24, port {MESH_PORT}" in log, log


def test_a_worker_handshakes_and_http_crosses_the_tunnel(net):
    net.start_worker(W1)
    wait_until("a handshake between the pod and W1", lambda: net.handshake(W1) > 0, log=net.log)
    assert wait_until("an HTTP answer from W1 over the mesh", lambda: net.get(W1), log=net.log) == f"worker {W1}\n"
    for _ in range(5):
        assert net.get(W1) == f"worker {W1}\n"
    # the worker's side: its peer (the pod) has handshaken and carried traffic
    out = in_ns(W1, "wg", "show", W1, "transfer").stdout.split()
    assert out[0] == net.keys["gateway-3"]["public_key"] and int(out[1]) > 0 and int(out[2]) > 0


def test_mesh_peers_may_open_the_gateway_port_only(net):
    listener = ("import socket, threading\n"
                "def serve(port):\n"
                "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "    s.bind(('0.0.0.0', port)); s.listen()\n"
                "    while True:\n"
                "        c, _ = s.accept(); c.sendall(b'pod'); c.close()\n"
                f"threading.Thread(target=serve, args=({BLOCKED},), daemon=True).start()\n"
                f"serve({ALLOWED})\n")
    net.procs.append(subprocess.Popen(["ip", "netns", "exec", GW, sys.executable, "-c", listener],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    gw = net.addresses["gateway-3"]
    wait_until("the gateway port answers over the mesh", lambda: _connects(W1, gw, ALLOWED), log=net.log)
    assert not _connects(W1, gw, BLOCKED)                          # dropped on the tunnel
    assert _connects(W1, UNDERLAY[W1][0], BLOCKED)                 # the same port off the tunnel: not its business
    rules = in_ns(GW, "iptables", "-S", "INFERMESH-MESH").stdout
    assert f"--dport {ALLOWED} -j ACCEPT" in rules and rules.rstrip().endswith("-j DROP")


def test_a_peer_added_to_the_configmap_joins_without_a_restart(net):
    net.start_worker(W2)
    time.sleep(2)
    assert net.handshake(W2) == 0                                 # not a peer yet: its handshakes go unanswered
    with pytest.raises(subprocess.CalledProcessError):
        net.get(W2, timeout=2)
    before = net.handshake(W1)
    net.write_peers([W1, W2])
    wait_until("W2 is a peer", lambda: net.keys[W2]["public_key"] in in_ns(GW, "wg", "show", GW_IF, "peers").stdout,
               log=net.log)
    assert wait_until("an HTTP answer from W2 over the mesh", lambda: net.get(W2), log=net.log) == f"worker {W2}\n"
    assert net.get(W1) == f"worker {W1}\n"                        # W1's session went on
    assert net.handshake(W1) >= before
    assert net.sidecar.poll() is None
    assert "peers: 2" in net.log.read_text()
    # a list wg refuses leaves the last good one
    net.peers_file.write_text("[Peer]\nPublicKey = not-a-key\n")
    wait_until("the refusal is logged", lambda: "keeping the previous peers" in net.log.read_text(), log=net.log)
    assert len(in_ns(GW, "wg", "show", GW_IF, "peers").stdout.split()) == 2 and net.get(W2) == f"worker {W2}\n"


def test_sigterm_takes_the_interface_down(net):
    net.sidecar.send_signal(signal.SIGTERM)
    assert net.sidecar.wait(10) == 0, net.log.read_text()
    assert in_ns(GW, "ip", "link", "show", "dev", GW_IF, check=False).returncode != 0
    assert net.script("ready").returncode != 0
    assert not list(WG_RUN_DIR.glob(f"{GW_IF}.sock"))
