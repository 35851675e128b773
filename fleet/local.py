"""The local stack: the whole service as processes on 127.0.0.1, no cloud.

Starts every local pool's workers (the `sim` simulator or llama.cpp), writes the routing
config, starts the gateway, and stops all of them (by the PIDs it started) on exit.

With ``gateway.replicas`` > 1 (stacks/Pulumi.local-ha.yaml) it starts that many gateway
processes, ``gateway-0``..., on shared state (Redis limits, PostgreSQL ledger and keys): each
listens on its own port (``replica_ports``) and all on the stack's gateway port with
SO_REUSEPORT, the kernel being the load balancer (see gateway/__main__.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fleet.channel import LocalCerts
from fleet.kinds import LOCAL_KINDS
from fleet.launch import TlsFiles, sim_command
from fleet.paths import private_dir
from fleet.failover import effective_spec
from fleet.routing import canary_pool, gateway_config, local_endpoints, routing_config
from fleet import project
from fleet.spec import ROOT, Spec

RESTART_BASE_S = 0.5      # a dead gateway replica is restarted after this, doubling while it keeps dying ...
RESTART_MAX_S = 30.0      # ... up to this
RESTART_RESET_S = 60.0    # a replica that ran this long before dying starts again from RESTART_BASE_S


class LocalStackError(Exception):
    pass


@dataclass
class LocalStack:
    spec: Spec
    state: Path
    host: str = "127.0.0.1"
    gateway_port: int | None = None
    stacks_dir: Path | None = None          # where Pulumi.<stack>.yaml lives, if not stacks/
    replica_ports: list[int] | None = None  # each replica's own port (default: the gateway port + 1 + i)
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)     # gateway replica -> restarts by supervise()
    _restart_at: dict[str, float] = field(default_factory=dict)   # dead replica -> when supervise() starts it
    _quick: dict[str, int] = field(default_factory=dict)          # replica -> deaths soon after a start, in a row
    _started: dict[str, float] = field(default_factory=dict)   # name -> when it was last started

    @property
    def port(self) -> int:
        return self.gateway_port or self.spec.gateway.port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def replicas(self) -> int:
        return self.spec.gateway.replicas

    def replica_port(self, i: int) -> int:
        return self.replica_ports[i] if self.replica_ports else self.port + 1 + i

    def replica_url(self, i: int) -> str:
        return f"http://{self.host}:{self.replica_port(i)}/v1"

    def check(self) -> None:
        state = self.spec.gateway.state
        if self.replicas > 1 and (state.limits != "redis" or state.ledger != "postgres"):
            raise LocalStackError(f"stack {self.spec.stack} runs {self.replicas} gateway replicas: they need shared "
                                  f"state (gateway.state: limits: redis, ledger: postgres)")
        remote = sorted({p.provider for p in self.spec.pools
                         if self.spec.provider(p.provider).kind not in LOCAL_KINDS and p.role != "drained"})
        if remote:
            raise LocalStackError(f"stack {self.spec.stack} leases remote capacity ({', '.join(remote)}); "
                                  f"`infermesh up` runs only local stacks — use `pulumi up` for this one")

    def worker_commands(self) -> list[tuple[str, int, list[str]]]:
        out = []
        # what `pulumi up` would lease: drained providers applied (fleet/failover.py), their pools
        # run nothing, and the replacement capacity the plan adds runs instead
        effective = effective_spec(self.spec)
        ports = local_endpoints(self.spec, effective)
        canary = canary_pool(self.spec)        # a canary block runs one more worker, like its base pool
        for pool in [*effective.pools, *([canary] if canary is not None else [])]:
            kind = self.spec.provider(pool.provider).kind
            if kind not in LOCAL_KINDS or pool.role == "drained":
                continue
            for i in range(pool.replicas):
                port = ports[(pool.name, i)]
                if kind == "sim":
                    # the plan's launch (fleet/launch.py), the sim's vocabulary, on this stack's mutual TLS
                    cmd = sim_command(self.spec, pool, sys.executable, self.host, port,
                                      self.tls_files(f"{pool.name}-{i}"))
                else:
                    from engines import llamacpp
                    assert pool.gguf, "the spec refuses a llamacpp pool without its GGUF file"
                    llamacpp.check_available(pool.gguf)
                    cmd = llamacpp.command(pool.gguf, pool.model, self.host, port)
                out.append((f"{pool.name}-{i}", port, cmd))
        return out

    @property
    def certs(self) -> LocalCerts:
        return LocalCerts(self.state, self.spec.stack, self.host)

    def tls_files(self, lease: str) -> TlsFiles:
        """A local worker's mutual TLS: its own certificate from the stack's local CA (made at
        `infermesh up`, fleet/channel.py); fleet/launch.py requires client certificates with it."""
        cert, key = self.certs.worker(lease)
        return TlsFiles(str(cert), str(key), str(self.certs.ca))

    def worker_base(self, port: int, cmd: list[str]) -> str:
        """A local worker's root URL as it serves: https when it was started on mutual TLS."""
        return f"{'https' if '--ssl-certfile' in cmd else 'http'}://{self.host}:{port}"

    def write_routing(self, spec: Spec | None = None, ports: dict[tuple[str, int], int] | None = None) -> Path:
        """Write the gateway config (state/routing.json, atomically) for `spec` (default: the running
        one): its workers on `ports` where given (fleet/local_apply.py: where they really listen), else
        on the ports ``local_endpoints`` declares (a drained pool runs no worker but keeps its idle
        endpoints)."""
        spec = spec or self.spec
        effective = effective_spec(spec)
        where = {**local_endpoints(spec, effective), **(ports or {})}
        host = self.host
        routing = routing_config(effective, lambda pool, i: f"http://{host}:{where[(pool.name, i)]}",
                                 tls_dir=str(self.certs.dir))
        # the one gateway config a Kubernetes gateway reads from its ConfigMap: routing, tiers, limits, SLOs
        config = gateway_config(spec, routing)
        path = self.state / "routing.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, path)
        return path

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        logs = self.state / "logs"
        private_dir(logs)                    # logs, like keys.db and ledger.db, are the operator's alone
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self, timeout: float = 30.0) -> None:
        self.check()
        # 0700: keys.db and ledger.db (prompts, when opted in) live here; .infermesh/<stack> is ours to tighten
        private_dir(self.state, tighten=self.state.parent == project.state_root())
        workers = self.worker_commands()
        self.write_routing()
        try:
            for name, _, cmd in workers:
                self._spawn(name, cmd)
            for name, port, cmd in workers:
                self._wait(self.worker_base(port, cmd) + "/health", name, timeout)
            if self.spec.gateway.state.ledger == "postgres":
                self._ensure_database()
            if self.replicas == 1:
                self._spawn("gateway", self.gateway_command())
                self._wait(f"http://{self.host}:{self.port}/health", "gateway", timeout)
            else:
                for i in range(self.replicas):
                    self.start_replica(i, wait=False)
                for i in range(self.replicas):
                    self._wait(f"http://{self.host}:{self.replica_port(i)}/ready", f"gateway-{i}", timeout)
        except BaseException:
            self.stop()
            raise

    def gateway_command(self, replica: int | None = None) -> list[str]:
        # as on Kubernetes: the gateway reads the plan's gateway config (state/routing.json), no stack file
        cmd = [sys.executable, "-m", "gateway", "--config", str(self.state / "routing.json"),
               "--host", self.host, "--state-dir", str(self.state)]
        if replica is None:
            return cmd + ["--port", str(self.port)]
        return cmd + ["--port", str(self.replica_port(replica)), "--shared-port", str(self.port),
                      "--instance", f"gw-{replica}"]

    def start_replica(self, i: int, wait: bool = True, timeout: float = 30.0, ready: bool = True) -> None:
        """(Re)start gateway replica i on its state (after a crash, it ships what its spool holds);
        with ``wait``, until it is ready (/ready: it has a key set), or only alive (/health) without ``ready``."""
        name = f"gateway-{i}"
        self.procs = [(n, p) for n, p in self.procs if n != name or p.poll() is None]
        self._spawn(name, self.gateway_command(i))
        self._started[name] = time.monotonic()
        if wait:
            self._wait(f"http://{self.host}:{self.replica_port(i)}/{'ready' if ready else 'health'}", name, timeout)

    def supervise(self, now: float | None = None) -> list[str]:
        """Restart gateway replicas that died (stacks with replicas), with backoff: RESTART_BASE_S
        after the death, doubling up to RESTART_MAX_S while it dies again within RESTART_RESET_S of
        its start. A restarted replica ships what its spool held; meanwhile the others ship it
        (gateway/state/pg_ledger.py). `infermesh up` calls this every half second. Returns the
        replicas started by this call."""
        if self.replicas == 1:
            return []
        now = time.monotonic() if now is None else now
        started = []
        for i in range(self.replicas):
            name = f"gateway-{i}"
            proc = next((p for n, p in self.procs if n == name), None)
            if proc is None or proc.poll() is None:
                continue
            if name not in self._restart_at:     # a death not seen before: when to start it again
                quick = 0 if now - self._started.get(name, 0.0) > RESTART_RESET_S else self._quick.get(name, -1) + 1
                self._quick[name] = quick
                self._restart_at[name] = now + min(RESTART_MAX_S, RESTART_BASE_S * 2 ** quick)
            if now < self._restart_at[name]:
                continue
            del self._restart_at[name]
            self.start_replica(i, wait=False)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            started.append(name)
        return started

    def _ensure_database(self) -> None:
        from gateway.state.migrate import ensure_database, migrate
        dsn = self.spec.gateway.state.postgres_dsn
        assert dsn, "the spec refuses a postgres ledger without postgres_dsn"
        try:
            ensure_database(dsn)
            migrate(dsn)
        except Exception as e:
            raise LocalStackError(f"PostgreSQL for stack {self.spec.stack} is not usable "
                                  f"({type(e).__name__}: {str(e).strip()[:200]})") from None

    def _wait(self, url: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = next(p for n, p in self.procs if n == name)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalStackError(f"{name} exited with status {proc.returncode}; "
                                      f"see {self.state / 'logs' / (name + '.log')}")
            try:
                ctx = self.certs.client_context() if url.startswith("https:") else None
                with urllib.request.urlopen(url, timeout=1, context=ctx) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise LocalStackError(f"{name} did not become healthy within {timeout:.0f}s ({url})")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process we started (gateway first, so it drains), then SIGKILL stragglers."""
        gateways = [p for n, p in self.procs if n.startswith("gateway")]
        for proc in gateways:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in gateways:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]
