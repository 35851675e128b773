"""Hosts on one machine: network namespaces joined by veth links, each with its own sshd.

The lab: a "switch" namespace holding a bridge, one namespace per host with a veth into the
bridge (``eth0`` inside, an address in 10.231.0.0/24), and one veth from the root namespace
(the controller: where ansible-runner and the test client run) into the same bridge. Every
name starts with ``imt-`` (links, namespaces, WireGuard interfaces and their sockets), so a
cleanup can find what an earlier, killed run left behind. Only processes this lab started are
ever signalled: its sshds (by PID), the processes inside its own namespaces (``ip netns pids``)
and the ssh control masters whose sockets sit in its own tmp dir.

Addresses are test-only and stay inside these namespaces: 10.231.0.0/24 on the veths, the test
stack's mesh CIDR on the WireGuard interfaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "imt-"
SWITCH = f"{PREFIX}sw"
BRIDGE = "br0"
SUBNET = "10.231.0"
CONTROLLER_IP = f"{SUBNET}.1"
CONTROLLER_LINK = f"{PREFIX}ctl"
WG_RUN_DIR = Path("/var/run/wireguard")
LOCK_FILE = Path("/run/lock/imt-mesh-lab.lock")
REQUIRED_TOOLS = ("ip", "sshd", "ssh", "ssh-keygen", "wg", "wg-quick", "wireguard-go", "iptables", "ping",
                  "start-stop-daemon")


def run(*cmd: str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, input=input)


def netns_exec(ns: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


def missing_tools() -> list[str]:
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def wait_until(what: str, check, timeout_s: float = 60, interval: float = 0.5, log: Path | None = None):
    """Poll ``check`` until it returns something true (returned) or ``timeout_s`` passes (the test
    fails naming ``what``, the last value or error, and the tail of ``log`` if given)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - polled until the deadline; reported below
            last = e
        time.sleep(interval)
    tail = f"\nlog:\n{log.read_text()[-4000:]}" if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting until {what} (last: {last!r}){tail}")


def require_lab(needs: str) -> None:
    """At a test module's import: skip it where the lab cannot run (not Linux, not root, tools
    missing), or fail it when INFERMESH_MESH_TESTS=1 asked for it (`make test-mesh`).
    ``needs``: what root is needed for, for the message."""
    import sys

    import pytest

    if sys.platform != "linux":
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = f"needs root ({needs})"
    elif missing_tools():
        reason = f"missing {', '.join(missing_tools())}: run scripts/install-system-deps.sh"
    else:
        return
    if os.environ.get("INFERMESH_MESH_TESTS") == "1":
        pytest.fail(f"mesh tests requested but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@dataclass
class Host:
    name: str            # short name: gw, w1, w2 (namespace imt-<name>)
    node: str            # the plan's node name: gateway-0, meshpool-0, ...
    ip: str              # address on the lab's switch
    root: Path           # this host's own files (sshd config, its "/etc", "/opt", logs)
    sshd: subprocess.Popen | None = None

    @property
    def ns(self) -> str:
        return f"{PREFIX}{self.name}"

    @property
    def switch_port(self) -> str:
        return f"{PREFIX}{self.name}-s"

    @property
    def wg_interface(self) -> str:
        return f"{PREFIX}{self.name}"

    def exec(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return netns_exec(self.ns, *cmd, check=check, timeout=timeout)


@dataclass
class Lab:
    tmp: Path
    hosts: list[Host] = field(default_factory=list)
    client_key: Path | None = None
    known_hosts: Path | None = None
    _lock: object | None = None
    _made_run_sshd: bool = False

    # ---- lifecycle -------------------------------------------------------------------------
    def acquire(self, timeout_s: float = 900) -> None:
        """One lab per machine at a time: another run (another session's `make test`) waits."""
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        f = open(LOCK_FILE, "w")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.close()
                    raise TimeoutError(f"another mesh lab holds {LOCK_FILE}") from None
                time.sleep(1)
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def add_host(self, name: str, node: str, index: int) -> Host:
        host = Host(name=name, node=node, ip=f"{SUBNET}.{10 + index}", root=self.tmp / "hosts" / name)
        self.hosts.append(host)
        return host

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def up(self) -> None:
        """Namespaces, links and sshds; raises with the command's stderr if a step fails."""
        run("ip", "netns", "add", SWITCH)
        netns_exec(SWITCH, "ip", "link", "set", "lo", "up")
        netns_exec(SWITCH, "ip", "link", "add", BRIDGE, "type", "bridge")
        netns_exec(SWITCH, "ip", "link", "set", BRIDGE, "up")
        # The controller's leg: root namespace <-> bridge.
        run("ip", "link", "add", CONTROLLER_LINK, "type", "veth", "peer", "name", f"{CONTROLLER_LINK}-s")
        run("ip", "link", "set", f"{CONTROLLER_LINK}-s", "netns", SWITCH)
        netns_exec(SWITCH, "ip", "link", "set", f"{CONTROLLER_LINK}-s", "master", BRIDGE, "up")
        run("ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", CONTROLLER_LINK)
        run("ip", "link", "set", CONTROLLER_LINK, "up")
        for h in self.hosts:
            run("ip", "netns", "add", h.ns)
            h.exec("ip", "link", "set", "lo", "up")
            run("ip", "link", "add", h.switch_port, "type", "veth", "peer", "name", f"{h.ns}-h")
            run("ip", "link", "set", h.switch_port, "netns", SWITCH)
            run("ip", "link", "set", f"{h.ns}-h", "netns", h.ns)
            h.exec("ip", "link", "set", f"{h.ns}-h", "name", "eth0")
            h.exec("ip", "addr", "add", f"{h.ip}/24", "dev", "eth0")
            h.exec("ip", "link", "set", "eth0", "up")
            netns_exec(SWITCH, "ip", "link", "set", h.switch_port, "master", BRIDGE, "up")
        self._start_sshds()

    def _start_sshds(self) -> None:
        ssh_dir = self.tmp / "ssh"
        ssh_dir.mkdir(mode=0o700)
        self.client_key = ssh_dir / "id_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imt-controller", "-f", str(self.client_key))
        if not Path("/run/sshd").exists():  # sshd's privilege-separation dir
            Path("/run/sshd").mkdir(mode=0o755)
            self._made_run_sshd = True
        known = []
        for h in self.hosts:
            d = h.root / "sshd"
            d.mkdir(parents=True)
            host_key = d / "ssh_host_ed25519_key"
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.ns, "-f", str(host_key))
            shutil.copy(f"{self.client_key}.pub", d / "authorized_keys")
            (d / "sshd_config").write_text(
                f"Port 22\nListenAddress {h.ip}\nHostKey {host_key}\nPidFile {d}/sshd.pid\n"
                f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "MaxSessions 50\nMaxStartups 50\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
            )
            log = open(d / "sshd.log", "w")
            h.sshd = subprocess.Popen(["ip", "netns", "exec", h.ns, "/usr/sbin/sshd", "-D", "-e",
                                       "-f", str(d / "sshd_config")], stdout=log, stderr=log,
                                      start_new_session=True)
            known.append(f"{h.ip} {Path(f'{host_key}.pub').read_text().split(' ')[0]} "
                         f"{Path(f'{host_key}.pub').read_text().split(' ')[1]}")
        self.known_hosts = ssh_dir / "known_hosts"
        self.known_hosts.write_text("\n".join(known) + "\n")
        for h in self.hosts:
            self.wait_ssh(h)

    def ssh(self, h: Host, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return run("ssh", "-i", str(self.client_key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                   "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                   f"root@{h.ip}", *cmd, check=check, timeout=timeout)

    def wait_ssh(self, h: Host, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.ssh(h, "true", check=False)
            if r.returncode == 0:
                return
            if h.sshd is not None and h.sshd.poll() is not None:
                raise RuntimeError(f"sshd in {h.ns} exited: {(h.root / 'sshd' / 'sshd.log').read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ssh to {h.ns} ({h.ip}): {r.stderr}")
            time.sleep(0.3)

    # ---- faults ----------------------------------------------------------------------------
    def partition(self, h: Host) -> None:
        """Cut the host's cable: its port on the switch goes down (WireGuard UDP cannot pass)."""
        netns_exec(SWITCH, "ip", "link", "set", h.switch_port, "down")

    def heal(self, h: Host) -> None:
        netns_exec(SWITCH, "ip", "link", "set", h.switch_port, "up")

    # ---- teardown --------------------------------------------------------------------------
    def down(self, control_dirs: list[Path] = ()) -> list[str]:
        """Remove everything this lab made; returns what could not be removed (for the report)."""
        problems: list[str] = []
        for d in control_dirs:
            close_control_masters(d)
        for h in self.hosts:
            if h.sshd is not None and h.sshd.poll() is None:
                h.sshd.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    h.sshd.wait(5)
                if h.sshd.poll() is None:
                    h.sshd.kill()
                    h.sshd.wait(5)
        problems += cleanup_leftovers()
        if self._made_run_sshd:
            with contextlib.suppress(OSError):
                Path("/run/sshd").rmdir()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def close_control_masters(control_dir: Path) -> None:
    """Ask each ssh ControlPersist master with a socket in control_dir to exit."""
    if not control_dir.is_dir():
        return
    for sock in control_dir.iterdir():
        run("ssh", "-o", f"ControlPath={sock}", "-O", "exit", "imt-lab", check=False, timeout=10)


def _lab_namespaces() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _kill_namespace_processes(ns: str) -> None:
    """Every process inside one of our namespaces is ours (sshd sessions, wireguard-go, workers,
    the gateway): TERM them, then KILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and run("ip", "netns", "pids", ns, check=False).stdout.split():
            time.sleep(0.1)


def cleanup_leftovers() -> list[str]:
    """Remove every imt- namespace, link and WireGuard socket (this run's or a killed run's)."""
    problems = []
    for ns in _lab_namespaces():
        _kill_namespace_processes(ns)
        r = run("ip", "netns", "del", ns, check=False)
        if r.returncode != 0:
            problems.append(f"netns {ns}: {r.stderr.strip()}")
    links = run("ip", "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            r = run("ip", "link", "del", name, check=False)
            if r.returncode != 0:
                problems.append(f"link {name}: {r.stderr.strip()}")
    if WG_RUN_DIR.is_dir():
        for sock in WG_RUN_DIR.glob(f"{PREFIX}*"):
            # wireguard-go removes its socket when its interface goes; a killed one may not have.
            with contextlib.suppress(OSError):
                sock.unlink()
        with contextlib.suppress(OSError):
            WG_RUN_DIR.rmdir()  # only when empty: another WireGuard user's sockets stay
    return problems


def remove_stale_tmp(pattern: str = f"{PREFIX}mesh-*") -> None:
    """Tmp dirs of killed earlier runs (call under the lab lock): close their ssh control masters
    first, then remove them."""
    for d in Path(tempfile.gettempdir()).glob(pattern):
        for cp in d.glob("controller/ansible/cp"):
            close_control_masters(cp)
        shutil.rmtree(d, ignore_errors=True)
