"""The local stack: the whole service as processes on 127.0.0.1, no cloud.

Starts every local pool's workers (the `sim` simulator or llama.cpp), writes the routing
config, starts the gateway, and stops all of them (by the PIDs it started) on exit.
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

from fleet.routing import local_endpoints, routing_config
from fleet.spec import ROOT, Spec

LOCAL_KINDS = ("sim", "llamacpp")


class LocalStackError(Exception):
    pass


@dataclass
class LocalStack:
    spec: Spec
    state: Path
    host: str = "127.0.0.1"
    gateway_port: int | None = None
    stacks_dir: Path | None = None          # where Pulumi.<stack>.yaml lives, if not stacks/
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.gateway_port or self.spec.gateway.port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def check(self) -> None:
        remote = sorted({p.provider for p in self.spec.pools
                         if self.spec.provider(p.provider).kind not in LOCAL_KINDS and p.role != "drained"})
        if remote:
            raise LocalStackError(f"stack {self.spec.stack} leases remote capacity ({', '.join(remote)}); "
                                  f"`infermesh up` runs only local stacks — use `pulumi up` for this one")

    def worker_commands(self) -> list[tuple[str, int, list[str]]]:
        out = []
        ports = local_endpoints(self.spec)
        for pool in self.spec.pools:
            kind = self.spec.provider(pool.provider).kind
            for i in range(pool.replicas):
                port = ports[(pool.name, i)]
                if kind == "sim":
                    knobs = pool.sim or type(pool).model_fields["sim"].annotation.__args__[0]()
                    cmd = [sys.executable, "-m", "engines.sim", "--host", self.host, "--port", str(port),
                           "--model", pool.model, "--ttft-ms", str(knobs.ttft_ms), "--itl-ms", str(knobs.itl_ms),
                           "--output-tokens", str(knobs.output_tokens), "--error-rate", str(knobs.error_rate),
                           "--max-concurrency", str(pool.max_concurrency)]
                    if knobs.seed is not None:
                        cmd += ["--seed", str(knobs.seed)]
                else:
                    from engines import llamacpp
                    llamacpp.check_available(pool.gguf)
                    cmd = llamacpp.command(pool.gguf, pool.model, self.host, port)
                out.append((f"{pool.name}-{i}", port, cmd))
        return out

    def write_routing(self) -> Path:
        host = self.host
        ports = local_endpoints(self.spec)
        config = routing_config(self.spec, lambda pool, i: f"http://{host}:{ports[(pool.name, i)]}")
        path = self.state / "routing.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, path)
        return path

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self, timeout: float = 30.0) -> None:
        self.check()
        self.state.mkdir(parents=True, exist_ok=True)
        workers = self.worker_commands()
        routing = self.write_routing()
        try:
            for name, _, cmd in workers:
                self._spawn(name, cmd)
            for name, port, _ in workers:
                self._wait(f"http://{self.host}:{port}/health", name, timeout)
            env_stack = ["--stack", self.spec.stack, "--routing", str(routing), "--host", self.host,
                         "--port", str(self.port), "--state-dir", str(self.state)]
            if self.stacks_dir is not None:
                env_stack += ["--stacks-dir", str(self.stacks_dir)]
            self._spawn("gateway", [sys.executable, "-m", "gateway", *env_stack])
            self._wait(f"http://{self.host}:{self.port}/health", "gateway", timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, url: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = next(p for n, p in self.procs if n == name)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalStackError(f"{name} exited with status {proc.returncode}; "
                                      f"see {self.state / 'logs' / (name + '.log')}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise LocalStackError(f"{name} did not become healthy within {timeout:.0f}s ({url})")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process we started (gateway first, so it drains), then SIGKILL stragglers."""
        for name, proc in sorted(self.procs, key=lambda np: np[0] != "gateway"):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if name == "gateway":
                    try:
                        proc.wait(grace)
                    except subprocess.TimeoutExpired:
                        proc.kill()
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
