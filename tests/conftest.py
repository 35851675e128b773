"""Shared fixtures: real local stacks (sim workers + gateway processes) on free loopback ports."""

from __future__ import annotations

import copy
import os
import http.client
import socket
import random
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet import paths
from fleet import spec as spec_mod
from fleet.local import LocalStack
from gateway.keys import KeyAdmin

REPO = Path(__file__).resolve().parent.parent


def kill_tree(proc) -> None:
    """End a process we started and the children it started (`infermesh up` starts its workers and
    gateways in sessions of their own, so killing it alone would leave them running): by PID."""
    import signal
    import subprocess
    import time

    if proc.poll() is not None:
        return
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    children = [int(x) for x in out.split()]
    proc.kill()
    proc.wait()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 10
    for pid in children:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """A base port with n free consecutive ports after it (checked by binding)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)                 # closed below, also when its bind fails
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


class LocalTLS(urllib.request.HTTPSHandler):
    """urllib's https with the gateway's client identity of the local stack that owns the port:
    local workers serve mutual TLS (fleet/channel.py), so tests that poke a worker directly
    (/sim/faults, /sim/stats) present the client certificate as the gateway does."""

    contexts: dict[int, ssl.SSLContext] = {}

    def https_open(self, req):  # noqa: ANN001, ANN201
        ctx = self.contexts.get(urllib.parse.urlsplit(req.full_url).port or 443)
        if ctx is None:
            return super().https_open(req)
        return self.do_open(http.client.HTTPSConnection, req, context=ctx)


urllib.request.install_opener(urllib.request.build_opener(LocalTLS()))


def local_config() -> dict[str, Any]:
    return spec_mod.read_config(spec_mod.stack_path("local"))


@dataclass
class RunningStack:
    stack: LocalStack
    spec: spec_mod.Spec
    stacks_dir: Path

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    @property
    def root_url(self) -> str:
        return self.stack.base_url.removesuffix("/v1")

    @property
    def state(self) -> Path:
        return self.stack.state

    def key(self, tenant: str = "acme", tier: str = "pro") -> str:
        return KeyAdmin(self.state / "keys.db").create(tenant, tier)[0]

    def admin_token(self) -> str:
        return paths.admin_token(self.state)

    def worker_url(self, pool: str, replica: int = 0) -> str:
        from fleet.failover import effective_spec
        from fleet.routing import local_endpoints
        return f"https://127.0.0.1:{local_endpoints(self.spec, effective_spec(self.spec))[(pool, replica)]}"

    def gateway_proc(self):
        return next(p for n, p in self.stack.procs if n == "gateway")


def start_stack(tmp: Path, mutate: Callable[[dict], None] | None = None, name: str = "test") -> RunningStack:
    config = copy.deepcopy(local_config())
    if mutate:
        mutate(config)
    n_ports = sum(p.get("replicas", 1) for p in config["pools"]) + 6   # a canary, failover capacity
    config["local_port_base"] = free_port_range(n_ports)
    config["gateway"] = {**config.get("gateway", {}), "port": free_port()}
    stacks_dir = tmp / "stacks"
    stacks_dir.mkdir(parents=True, exist_ok=True)
    (stacks_dir / f"Pulumi.{name}.yaml").write_text(
        yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in config.items()}}))
    spec = spec_mod.load(name, stacks_dir)
    stack = LocalStack(spec, tmp / "state", stacks_dir=stacks_dir)
    stack.start()
    ctx = stack.certs.client_context()
    LocalTLS.contexts.update({p: ctx for p in range(config["local_port_base"], config["local_port_base"] + n_ports)})
    return RunningStack(stack, spec, stacks_dir)


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory) -> Iterator[RunningStack]:
    """The shipped local stack's shape, on free ports, shared by a module's tests."""
    running = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture
def stack_factory(tmp_path) -> Iterator[Callable[..., RunningStack]]:
    started: list[RunningStack] = []

    def make(mutate: Callable[[dict], None] | None = None) -> RunningStack:
        running = start_stack(tmp_path / f"s{len(started)}", mutate)
        started.append(running)
        return running

    try:
        yield make
    finally:
        for s in started:
            s.stack.stop()


FAKE_PULUMI = """#!/bin/sh
# FAKE pulumi (the Pulumi CLI cannot be installed here): records its arguments, then answers as the test says.
printf '%s\\n' "$*" >> "{calls}"
{body}
"""


@pytest.fixture
def fake_pulumi(tmp_path, monkeypatch):
    """Puts a FAKE `pulumi` first on PATH; ``fake_pulumi(body)`` sets what it does (a shell snippet)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "pulumi-calls"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    def install(body: str) -> Path:
        script = bin_dir / "pulumi"
        script.write_text(FAKE_PULUMI.format(calls=calls, body=body))
        script.chmod(0o755)
        return calls

    return install
