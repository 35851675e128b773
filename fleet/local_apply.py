"""The local stack follows its stack file, as `pulumi up` makes a cloud stack follow it.

``apply(stack, new_spec)`` reconciles the running processes with a new spec without failing a
request:

1. start the workers the new spec has and the old one lacks (new pools, more replicas, a canary),
   and the replacements of workers whose command changed (new sim knobs after a promotion): on
   their own port when it is free, else on a spare port for now; wait until each is healthy;
2. write the new routing config and have every gateway apply it (``POST /admin/reload``, then
   wait until ``/admin/endpoints`` shows the new version; replicas that missed the call pick
   the file up within a second);
3. drain the workers that left the routing: wait until the worker itself reports nothing running
   or waiting (``vllm:num_requests_running`` / ``..._waiting`` on its /metrics; a request the
   gateway picked a moment before the switch still reaches a live worker), bounded by the
   stack's ``gateway.drain_timeout_s``; only then SIGTERM it;
4. workers parked on a spare port move back to their declared port the same way (start, switch,
   drain, stop), so ports stay the ones ``local_endpoints`` declares.

Only what the routing and the workers derive from changes live. Gateway settings (tiers, limits,
ports, state backends) are read by the gateway at start: a change to them is reported, not
applied. ``StackWatcher`` is the loop `infermesh up` runs: it polls the stack file's mtime and
applies a changed, valid file; a file that does not parse is reported in one line and the running
stack stays as it was.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fleet.local import LocalStack, LocalStackError
from fleet.paths import admin_token
from fleet.prometheus import samples
from fleet.spec import Spec, SpecError

LIVE_FIELDS = {"pools", "canary", "providers", "models", "regions", "local_port_base"}
# what a worker has running or waiting: vLLM's (and the sim's) gauges, llama.cpp's
BUSY_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                "llamacpp:requests_processing", "llamacpp:requests_deferred")
SETTLE_S = 1.2        # a replica that missed /admin/reload reads the routing file within ~1 s


class ApplyError(Exception):
    pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _retarget(cmd: list[str], port: int) -> list[str]:
    """The same worker command listening on another port (sim: --port; llama.cpp: --port)."""
    out = list(cmd)
    i = out.index("--port")
    out[i + 1] = str(port)
    return out


def _gateway_ports(stack: LocalStack) -> list[int]:
    if stack.replicas > 1:
        return [stack.replica_port(i) for i in range(stack.replicas)]
    return [stack.port]


def _admin(stack: LocalStack, port: int, path: str, method: str = "GET", timeout: float = 5.0) -> dict:
    req = urllib.request.Request(f"http://{stack.host}:{port}{path}", method=method,
                                 headers={"authorization": f"Bearer {admin_token(stack.state)}"},
                                 data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def switch_routing(stack: LocalStack, spec: Spec, ports: dict[tuple[str, int], int], timeout: float = 10.0) -> None:
    """Write routing.json for `spec` with endpoints on `ports`, and wait until every gateway runs it."""
    before = {}
    for port in _gateway_ports(stack):
        try:
            before[port] = _admin(stack, port, "/admin/endpoints")["version"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            before[port] = None
    stack.write_routing(spec, ports)
    deadline = time.monotonic() + timeout
    for port, version in before.items():
        try:
            _admin(stack, port, "/admin/reload", "POST")
        except (urllib.error.URLError, OSError, ValueError):
            pass        # the file watcher applies it
        while version is not None:
            try:
                if _admin(stack, port, "/admin/endpoints")["version"] > version:
                    break
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise ApplyError(f"the gateway on port {port} did not apply the new routing within {timeout:.0f}s")
            time.sleep(0.1)


def _busy(url: str, context=None) -> float | None:  # noqa: ANN001
    """Requests running + waiting on a worker, from its /metrics; None when unreadable."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=1, context=context) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    found = [v for metric in BUSY_METRICS for v in samples(text, metric)]
    return sum(found) if found else None


def drain_and_stop(stack: LocalStack, name: str, proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Wait until the worker has nothing in flight (twice in a row), then SIGTERM it."""
    deadline = time.monotonic() + timeout
    idle = 0
    context = stack.certs.client_context() if url.startswith("https:") else None
    while time.monotonic() < deadline and proc.poll() is None:
        busy = _busy(url, context)
        idle = idle + 1 if busy == 0 else (idle if busy is None else 0)
        if busy is None and time.monotonic() > deadline - timeout + 2.0:
            break               # no load signal: two seconds of grace is all we can do
        if idle >= 2:
            break
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stack.procs = [(n, p) for n, p in stack.procs if p is not proc]


def apply(stack: LocalStack, new_spec: Spec, log: Callable[[str], None] = print) -> list[str]:
    """Reconcile `stack` (running `stack.spec`) to `new_spec`. Returns one line per change."""
    old_spec = stack.spec
    if new_spec == old_spec:
        return []
    probe = LocalStack(new_spec, stack.state, host=stack.host)
    probe.check()
    changes: list[str] = []
    ignored = sorted(f for f in Spec.model_fields
                     if f not in LIVE_FIELDS and f != "secrets" and getattr(old_spec, f) != getattr(new_spec, f))
    if ignored:
        changes.append(f"not applied while running (restart `infermesh up`): {', '.join(ignored)}")
        new_spec = new_spec.model_copy(update={f: getattr(old_spec, f) for f in ignored})
    old = {name: (port, cmd) for name, port, cmd in stack.worker_commands()}
    new = {name: (port, cmd) for name, port, cmd in probe.worker_commands()}
    running = {n: p for n, p in stack.procs if not n.startswith("gateway")}
    to_start = [n for n in new if n not in old or old[n] != new[n] or n not in running
                or running[n].poll() is not None]
    to_stop = [n for n in old if n in running and (n not in new or n in to_start)]
    freed = {old[n][0] for n in to_stop}

    # 1. new and replacement workers, on their port if free now, else on a spare one
    actual: dict[str, int] = {n: old[n][0] for n in new if n not in to_start}
    parked: list[str] = []
    started: list[tuple[str, int]] = []
    retired: dict[str, subprocess.Popen] = {n: running[n] for n in to_stop}
    stack.procs = [(n, p) for n, p in stack.procs if n not in retired]
    try:
        for n in to_start:
            port, cmd = new[n]
            if port in freed or not _port_free(stack.host, port):
                port = _free_port(stack.host)
                cmd = _retarget(cmd, port)
                parked.append(n)
            stack._spawn(n, cmd)
            actual[n] = port
            started.append((n, port))
        for n, port in started:
            stack._wait(stack.worker_base(port, new[n][1]) + "/health", n, 30.0)
    except BaseException:
        for n, _ in started:       # back out: the old workers still serve the old routing
            proc = next((p for m, p in stack.procs if m == n), None)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        stack.procs = [(n, p) for n, p in stack.procs if n not in dict(started)] + list(retired.items())
        raise

    # 2. switch the gateways to the new routing (endpoints where the workers really are)
    names = {(n.rsplit("-", 1)[0], int(n.rsplit("-", 1)[1])): n for n in new}
    switch_routing(stack, new_spec, {key: actual[n] for key, n in names.items()})
    stack.spec = new_spec
    time.sleep(SETTLE_S)

    # 3. drain and stop what left the routing
    drain = new_spec.gateway.drain_timeout_s
    for n, proc in retired.items():
        drain_and_stop(stack, n, proc, stack.worker_base(old[n][0], old[n][1]), drain)

    # 4. parked workers move back to their declared port
    if parked:
        moved: list[tuple[str, subprocess.Popen, int]] = []
        for n in parked:
            proc = next(p for m, p in stack.procs if m == n)
            stack.procs = [(m, p) for m, p in stack.procs if p is not proc]
            moved.append((n, proc, actual[n]))
            stack._spawn(n, new[n][1])
            actual[n] = new[n][0]
        for n in parked:
            stack._wait(stack.worker_base(new[n][0], new[n][1]) + "/health", n, 30.0)
        switch_routing(stack, new_spec, {key: actual[n] for key, n in names.items()})
        time.sleep(SETTLE_S)
        for n, proc, port in moved:
            drain_and_stop(stack, n, proc, stack.worker_base(port, new[n][1]), drain)

    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    replaced = sorted(n for n in to_start if n in old)
    if added:
        changes.append(f"started {', '.join(added)}")
    if replaced:
        changes.append(f"replaced {', '.join(replaced)}")
    if removed:
        changes.append(f"stopped {', '.join(removed)} (drained)")
    if not (added or replaced or removed):
        changes.append("routing updated")
    for line in changes:
        log(f"infermesh up: {line}")
    return changes


class StackWatcher:
    """Polls a stack file; applies a changed, valid file to the running local stack."""

    def __init__(self, stack: LocalStack, path: Path, load: Callable[[], Spec],
                 log: Callable[[str], None] = print) -> None:
        self.stack, self.path, self.load, self.log = stack, path, load, log
        self.mtime = self._mtime()
        self.last_error: str | None = None

    def _mtime(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def poll(self) -> bool:
        """Apply the file if it changed; True when something was applied."""
        mtime = self._mtime()
        if mtime == self.mtime:
            return False
        self.mtime = mtime
        try:
            spec = self.load()
        except SpecError as e:
            self.last_error = str(e)
            self.log(f"infermesh up: {e}; keeping the running stack")
            return False
        try:
            changes = apply(self.stack, spec, self.log)
        except (LocalStackError, ApplyError) as e:
            self.last_error = str(e)
            self.log(f"infermesh up: not applied: {e}; keeping the running stack")
            return False
        self.last_error = None
        return bool(changes)
