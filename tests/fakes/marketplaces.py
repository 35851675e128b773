"""FAKE marketplace servers for the adapter tests: Vast.ai, RunPod (REST v2), Akash Console API,
and an OpenAI-compatible upstream (GonkaGate-shaped). None of this is a marketplace.

Each fake serves the request and response shapes of docs/marketplace-apis.md on
127.0.0.1 (an ``http.server`` in a thread, port 0), keeps its leases in memory, and **validates
what it receives**: a body of the wrong shape gets the marketplace's own 400/422 error, so an
adapter that sends the wrong shape fails its test instead of passing against a lenient fake.

Switchable behaviours (attributes and methods on every fake, see :class:`FakeServer`):

- ``offers = []`` / ``gpus = []`` / ``bid_prices = []``    no offers
- ``capacity = False``                                      out of capacity
- ``api_key`` mismatch -> 401; ``forbidden = True`` -> 403   auth failure
- ``rate_limit(n, retry_after=None | "2")``                 the next n calls get 429 (with or without Retry-After)
- ``fail(n, status=503)``                                   the next n calls get a 5xx
- ``vanish(offer_id)`` / ``vanish_on_create = True``        an offer that vanishes between search and create
- ``kill(lease_id)``                                        the lease dies (exited / ERROR / closed)
- ``boot_polls = n``                                        status reads before a lease runs
- Akash ``bids_after_polls = n``                            bids arrive only after n polls of /v1/bids
- ``fail_on(method, path_re, n, status)``                   the next n matching calls get ``status``
- ``malformed(n, method, path_re)``                         the next n matching calls get 200 with a cut-off body
- ``drop(n, method, path_re)``                              the next n matching calls get no answer (closed)
- ``timeline``                                              (seq, event, lease id, label): rented/running/destroyed
- ``live()``                                                the leases the fake would bill for now
- ``launcher``                                              what runs a lease's container once it runs: by
                                                            default a :class:`FakeWorker` for a lease whose env
                                                            asks for the TLS bootstrap; a test may start a real
                                                            worker instead. The lease's forwarded port then
                                                            points at it (127.0.0.1).

GUESSES: where a fake's behaviour is not in marketplace-apis.md, it is a guess, and this is the one
place that lists them (the adapters' docstrings point here):
- Vast: ``GET /instances/{id}/`` of an instance that is gone answers 200 ``{"instances": null}``
  (vast-cli's ``show_instance`` treats that as "not found"; whether the API also 404s is not documented).
  The billed ``dph_total`` of an instance can differ from the offer's (``billed_markup``).
- Akash: ``GET /v1/deployments/{dseq}`` returns the stored SDL as ``consoleSettings.sdl`` (from the IaC
  review, not from the API docs we hold); the list items carry no ``groups`` and no SDL
  (``ListDeploymentsResponseSchema``). ``signedBy`` in the placement is accepted as ``{anyOf: [...]}``.
- RunPod: a capacity error at create is a 400 with only a human ``detail`` (the spec says so; its
  wording is ours). Which data center has room is decided per call (``full_centers``).
  ``PUT /v2/account/ssh-keys`` answers 200 with the new ``{"keys": [...]}`` (the adapter does not read it),
  and a key that is not an OpenSSH public key gets a 400; there is no conditional write (If-Match).
- Rate limits: a fixed count of 429s (``rate_limit``), not a time window.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

Reply = tuple[int, Any, dict[str, str]]


ENTRYPOINT = Path(__file__).resolve().parents[2] / "images" / "worker" / "entrypoint.py"
_ENTRY: list[ModuleType] = []


def worker_entrypoint() -> ModuleType:
    """images/worker/entrypoint.py as a module (the worker image's own code, loaded once)."""
    if not _ENTRY:
        spec = importlib.util.spec_from_file_location("infermesh_worker_entrypoint", ENTRYPOINT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _ENTRY.append(module)
    return _ENTRY[0]


class FakeWorker:
    """FAKE worker in a thread of the test process, for a lease whose env asks for the TLS bootstrap: the
    worker image's own bootstrap (``Bootstrap`` and ``bootstrap_server`` of images/worker/entrypoint.py)
    on 127.0.0.1, then, once it took its certificate, a TLS listener on the same port with it that
    requires a client certificate from the CA (as vLLM with --ssl-cert-reqs 2) and answers /health.
    It runs no model."""

    def __init__(self, env: dict[str, str]) -> None:
        entry = worker_entrypoint()
        self.dir = Path(tempfile.mkdtemp(prefix="fake-worker-"))
        self.boot = entry.Bootstrap(env["INFERMESH_BOOTSTRAP_TOKEN"], entry.ca_from_env(env["INFERMESH_TLS_CA"]),
                                    self.dir)
        self.server = entry.bootstrap_server(self.boot, "127.0.0.1", 0)
        self.host, self.port = "127.0.0.1", self.server.server_address[1]
        self.tls: ThreadingHTTPServer | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True, name="fake-worker-boot").start()
        threading.Thread(target=self._serve_tls, daemon=True, name="fake-worker-tls").start()

    def _serve_tls(self) -> None:
        while not self.boot.done.wait(0.05):
            if self._stopped.is_set():
                return
        self.server.shutdown()
        self.server.server_close()
        entry = worker_entrypoint()

        class Health(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        with self._lock:
            if self._stopped.is_set():
                return
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.dir / entry.CERT_FILE), str(self.dir / entry.KEY_FILE))
            ctx.load_verify_locations(cafile=str(self.dir / entry.CA_FILE))
            ctx.verify_mode = ssl.CERT_REQUIRED
            server = ThreadingHTTPServer((self.host, self.port), Health, bind_and_activate=False)
            server.allow_reuse_address = True
            server.server_bind()
            server.server_activate()
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
            server.daemon_threads = True
            self.tls = server
        server.serve_forever(0.05)

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            tls = self.tls
        if tls is not None:
            tls.shutdown()
            tls.server_close()
        else:
            self.server.shutdown()
            self.server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)


Launcher = Callable[[str, dict[str, str], list[str], int], "tuple[str, int, Any] | None"]


def fake_worker_launcher(lease_id: str, env: dict[str, str], args: list[str], port: int) -> tuple[str, int, Any] | None:
    """The fakes' default: a FakeWorker for a lease that asks for the TLS bootstrap, nothing otherwise."""
    if "INFERMESH_BOOTSTRAP_TOKEN" not in env:
        return None
    worker = FakeWorker(env)
    return worker.host, worker.port, worker


class SimWorkerLauncher:
    """A REAL worker for a FAKE marketplace's lease: the worker image's entrypoint (images/worker/entrypoint.py)
    as a process on 127.0.0.1 with exactly the env the marketplace stored, serving the sim (engines.sim) in
    place of vLLM. From the stored vLLM arguments it keeps the TLS ones (their container paths mapped to a
    directory of its own); where it binds and what it serves are the test's (``--model``, the sim's knobs).
    ``started`` keeps, per lease, the env and arguments it was given."""

    def __init__(self, tmp: Path, model: str = "demo-chat") -> None:
        self.tmp, self.model = tmp, model
        self.started: dict[str, dict[str, Any]] = {}

    def __call__(self, lease_id: str, env: dict[str, str], args: list[str], port: int) -> tuple[str, int, Any]:
        import os
        import socket
        import subprocess
        import sys
        import time

        repo = ENTRYPOINT.parents[2]
        tls_dir = self.tmp / f"worker-{lease_id}"
        container_dir = "/run/infermesh/tls"
        tls = []
        for flag in ("--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs"):
            value = args[args.index(flag) + 1]
            tls += [flag, value.replace(container_dir, str(tls_dir))]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            public = s.getsockname()[1]
        argv = ["--host", "127.0.0.1", "--port", str(public), "--model", self.model, "--ttft-ms", "1", "--itl-ms", "1",
                *tls]
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(repo),
                   **{k: v for k, v in env.items() if k != "INFERMESH_WEIGHTS_SHA256"},   # the sim has no weights
                   "INFERMESH_TLS_DIR": str(tls_dir), "INFERMESH_SERVER_MODULE": "engines.sim",
                   "INFERMESH_RUN_AS": "0", "INFERMESH_DRAIN_S": "0"}
        log = open(self.tmp / f"worker-{lease_id}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, str(ENTRYPOINT), *argv], cwd=repo, env=run_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        handle = _Process(proc, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                output = (self.tmp / f"worker-{lease_id}.log").read_text()
                raise RuntimeError(f"the worker for {lease_id} exited: {output}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", public)) == 0:
                    break
            time.sleep(0.05)
        else:
            handle.stop()
            raise RuntimeError(f"the worker for {lease_id} did not listen on {public}")
        self.started[lease_id] = {"env": dict(env), "args": list(args), "port": public, "tls_dir": tls_dir}
        return "127.0.0.1", public, handle


class _Process:
    def __init__(self, proc: Any, log: Any) -> None:
        self.proc, self.log = proc, log

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()


def worker_port(ports: list[str]) -> int | None:
    """The container port a worker serves on: the first TCP one but SSH's (as the lease provider picks it)."""
    for spec in ports:
        port, _, proto = str(spec).partition("/")
        if proto in ("tcp", "http", "") and port.isdigit() and port != "22":
            return int(port)
    return None


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FakeServer:
    """Base of the fakes: the HTTP server, the request log and the behaviours common to all."""

    name = "fake"

    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.forbidden = False
        self.requests: list[dict[str, Any]] = []
        self._rate_limited = 0
        self._retry_after: str | None = None
        self._failing = 0
        self._fail_status = 503
        self._faults: list[dict[str, Any]] = []
        self.timeline: list[tuple[int, str, str, str]] = []
        self._seq = itertools.count(1)
        self.lock = threading.RLock()
        self._ids = itertools.count(1000)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.launcher: Launcher = fake_worker_launcher
        self.workers: dict[str, Any] = {}          # lease id -> what the launcher started (it has .stop())

    # -- lifecycle --
    def start(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:       # quiet
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body, headers = fake.dispatch(self.command, self.path, dict(self.headers.items()), raw)
                if status == 0:                     # no answer: close the connection
                    self.close_connection = True
                    return
                if body is None:
                    payload, ctype = b"", None
                elif isinstance(body, (dict, list)):
                    payload, ctype = json.dumps(body).encode(), headers.pop("Content-Type", "application/json")
                else:
                    payload, ctype = str(body).encode(), headers.pop("Content-Type", "text/plain")
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name=f"fake-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def launch(self, lease_id: Any, env: dict[str, str], args: list[str], ports: list[str]) -> tuple[str, int] | None:
        """A lease just runs: its container as the launcher starts it; (host, port) its worker port is
        forwarded to, or None (the fake's own made-up address)."""
        port = worker_port(ports)
        if port is None:
            return None
        started = self.launcher(str(lease_id), dict(env), list(args), port)
        if started is None:
            return None
        host, public, handle = started
        self.workers[str(lease_id)] = handle
        return host, public

    def end_worker(self, lease_id: Any) -> None:
        handle = self.workers.pop(str(lease_id), None)
        if handle is not None:
            handle.stop()

    def stop(self) -> None:
        for lease_id in list(self.workers):
            self.end_worker(lease_id)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- behaviours --
    def rate_limit(self, n: int, retry_after: str | None = None) -> None:
        with self.lock:
            self._rate_limited, self._retry_after = n, retry_after

    def fail(self, n: int, status: int = 503) -> None:
        with self.lock:
            self._failing, self._fail_status = n, status

    def fail_on(self, method: str, path_re: str, n: int = 1, status: int = 503, after: bool = False) -> None:
        """The next n calls matching method and path get ``status`` (the marketplace's error shape);
        ``after``: the call is carried out first (a create that rents, then answers 500)."""
        with self.lock:
            self._faults.append({"method": method, "path_re": path_re, "n": n, "kind": "status", "status": status,
                                 "after": after})

    def drop_after(self, n: int = 1, method: str = "PUT", path_re: str = ".") -> None:
        """The next n matching calls are carried out, then the connection closes with no answer."""
        with self.lock:
            self._faults.append({"method": method, "path_re": path_re, "n": n, "kind": "drop", "after": True})

    def malformed(self, n: int = 1, method: str = "GET", path_re: str = ".") -> None:
        with self.lock:
            self._faults.append({"method": method, "path_re": path_re, "n": n, "kind": "malformed"})

    def drop(self, n: int = 1, method: str = "GET", path_re: str = ".") -> None:
        with self.lock:
            self._faults.append({"method": method, "path_re": path_re, "n": n, "kind": "drop"})

    def record(self, event: str, lease_id: Any, label: Any) -> None:
        self.timeline.append((next(self._seq), event, str(lease_id), str(label or "")))

    def running_at_each_step(self, label_prefix: str = "") -> list[int]:
        """Leases running under the prefix after each timeline event (one count per event, in order)."""
        running: set[str] = set()
        counts = []
        for _seq, event, lease_id, label in self.timeline:
            if not label.startswith(label_prefix):
                counts.append(len(running))
                continue
            if event == "running":
                running.add(lease_id)
            elif event == "destroyed":
                running.discard(lease_id)
            counts.append(len(running))
        return counts

    def live(self) -> dict[str, str]:
        """lease id -> label of every lease the marketplace would bill for now."""
        raise NotImplementedError

    def _fault(self, method: str, path: str, after: bool = False) -> Reply | None:
        for f in self._faults:
            if (f["n"] > 0 and f["method"] == method and re.search(f["path_re"], path)
                    and f.get("after", False) == after):
                f["n"] -= 1
                if f["kind"] == "status":
                    return self.error(f["status"], "upstream trouble")
                if f["kind"] == "malformed":
                    return 200, '{"instances": [{"id": 1, "lab', {"Content-Type": "application/json"}
                return 0, None, {}
        return None

    def calls(self, method: str | None = None, path_re: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.requests if (method is None or r["method"] == method)
                and (path_re is None or re.search(path_re, r["path"]))]

    # -- dispatch --
    def dispatch(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> Reply:
        parsed = urllib.parse.urlsplit(target)
        path, query = parsed.path, dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        with self.lock:
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    return self.error(400, "body is not JSON")
            self.requests.append({"method": method, "path": path, "query": query, "body": body,
                                  "headers": {k.lower(): v for k, v in headers.items()}})
            if self.needs_auth(method, path):
                if self.forbidden:
                    return self.error(403, "forbidden")
                if not self.authorized({k.lower(): v for k, v in headers.items()}):
                    return self.error(401, "unauthorized")
            if self._rate_limited > 0:
                self._rate_limited -= 1
                return self.too_many(self._retry_after)
            if self._failing > 0:
                self._failing -= 1
                return self.error(self._fail_status, "upstream trouble")
            if (fault := self._fault(method, path)) is not None:
                return fault
            if raw and method in ("POST", "PUT") and body is None:
                return self.error(400, "empty JSON body")
            try:
                reply = self.route(method, path, query, body)
            except BadRequest as e:
                return self.error(e.status, str(e))
            if 200 <= reply[0] < 300 and (fault := self._fault(method, path, after=True)) is not None:
                return fault
            return reply

    def needs_auth(self, method: str, path: str) -> bool:
        return True

    def authorized(self, headers: dict[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.api_key}"

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        raise NotImplementedError

    def error(self, status: int, message: str) -> Reply:
        return status, {"error": message}, {}

    def too_many(self, retry_after: str | None) -> Reply:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return 429, {"error": "rate limited"}, headers

    def new_id(self) -> int:
        return next(self._ids)


def _require(cond: bool, message: str, status: int = 400) -> None:
    if not cond:
        raise BadRequest(message, status)


def _only_keys(body: dict[str, Any], allowed: set[str], where: str, status: int = 400) -> None:
    extra = set(body) - allowed
    _require(not extra, f"{where}: unknown fields {sorted(extra)}", status)


# ==== Vast.ai ============================================================================================

VAST_OPS = {"eq", "neq", "gt", "lt", "gte", "lte", "in", "notin"}
VAST_PLAIN = {"order", "type", "limit", "allocated_storage"}
# How each filter op compares an offer's value with the wanted one.
VAST_TESTS = {
    "eq": lambda value, want: value == want, "neq": lambda value, want: value != want,
    "gt": lambda value, want: value is not None and value > want,
    "lt": lambda value, want: value is not None and value < want,
    "gte": lambda value, want: value is not None and value >= want,
    "lte": lambda value, want: value is not None and value <= want,
    "in": lambda value, want: value in want, "notin": lambda value, want: value not in want,
}
VAST_FIELDS = {"verified", "external", "rentable", "rented", "gpu_name", "num_gpus", "gpu_ram", "gpu_total_ram",
               "dph_total", "min_bid", "reliability", "reliability2", "verification", "datacenter", "static_ip",
               "direct_port_count", "geolocation", "cuda_max_good", "driver_version", "disk_space", "inet_up",
               "inet_down", "duration"}
VAST_CREATE_KEYS = {"client_id", "image", "env", "price", "disk", "label", "extra", "onstart", "image_login",
                    "python_utf8", "lang_utf8", "use_jupyter_lab", "jupyter_dir", "force", "cancel_unavail",
                    "template_hash_id", "user", "runtype", "args", "args_str", "target_state", "volume_info"}
VAST_RUNTYPES = {"ssh", "jupyter", "args", "ssh_proxy", "ssh_direct", "jupyter_proxy", "jupyter_direct"}


def vast_offer(offer_id: int, gpu_name: str = "RTX 4090", num_gpus: int = 1, dph_total: float = 0.40,
               geolocation: str = "Amsterdam, NL", reliability: float = 0.99,
               cuda_max_good: float = 12.9) -> dict[str, Any]:
    return {"id": offer_id, "ask_contract_id": offer_id, "machine_id": offer_id // 10, "gpu_name": gpu_name,
            "num_gpus": num_gpus, "gpu_ram": 24564, "dph_total": dph_total, "dph_base": dph_total * 0.9,
            "reliability": reliability, "reliability2": reliability, "geolocation": geolocation,
            "public_ipaddr": f"203.0.113.{offer_id % 250}", "direct_port_count": 40, "disk_space": 512.0,
            "verified": True, "external": False, "rentable": True, "rented": False, "verification": "verified",
            "cuda_max_good": cuda_max_good}


class FakeVastAi(FakeServer):
    """FAKE Vast.ai REST v0 under /api/v0."""

    name = "vastai"
    prefix = "/api/v0"

    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        self.offers: list[dict[str, Any]] = [
            vast_offer(101, dph_total=0.45), vast_offer(102, dph_total=0.38), vast_offer(103, dph_total=0.95),
            vast_offer(104, geolocation="Texas, US", dph_total=0.30),
        ]
        self.instances: dict[int, dict[str, Any]] = {}
        self.capacity = True
        self.boot_polls = 1
        self.billed_markup = 0.0            # GUESSES: the instance bills more than its offer said
        self.keep_offers = False            # a rented offer is replaced by a like one (many leases, one fake)
        self._vanish: set[int] = set()
        self._reads: dict[int, int] = {}

    def vanish(self, offer_id: int) -> None:
        """The offer is listed by search but taken by someone else before create."""
        self._vanish.add(int(offer_id))

    def kill(self, instance_id: int | str, status: str = "exited") -> None:
        with self.lock:
            self.end_worker(instance_id)
            self.instances[int(instance_id)].update(actual_status=status, intended_status="stopped",
                                                    status_msg="container exited with code 137")

    def error(self, status: int, message: str) -> Reply:
        kind = {401: "auth_error", 403: "auth_error", 404: "not_found"}.get(status, "invalid_args")
        if status == 401:
            message = "Invalid user key"
        return status, {"success": False, "error": kind, "msg": message}, {}

    def too_many(self, retry_after: str | None) -> Reply:
        # Vast: plain text, and no Retry-After header (docs: rate-limits-and-errors).
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return 429, "API requests too frequent endpoint threshold=4.5", headers

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        _require(path.startswith(self.prefix + "/"), f"no route {path}", 404)
        p = path[len(self.prefix):]
        if p == "/bundles/" and method == "POST":
            return self.search(body)
        if p == "/bundles/" and method == "GET":           # the marketing page's form: ?q=<json>
            return self.search(json.loads(query.get("q", "{}")))
        if (m := re.fullmatch(r"/asks/(\d+)/", p)) and method == "PUT":
            return self.create(int(m.group(1)), body)
        if p == "/instances/" and method == "GET":
            _require(query.get("owner") == "me", "owner=me is required")
            # Listing is looking too: an instance boots between looks, however it is looked at.
            return 200, {"instances": [self.read(i) for i in list(self.instances)]}, {}
        if (m := re.fullmatch(r"/instances/(\d+)/", p)):
            iid = int(m.group(1))
            if iid not in self.instances:
                if method == "GET":
                    return 200, {"instances": None}, {}          # GUESSES: gone -> null, not 404
                return self.error(404, f"error 404: no instance {iid}")
            if method == "GET":
                return 200, {"instances": self.read(iid)}, {}
            if method == "DELETE":
                _require(body in (None, {}), "destroy takes an empty body")
                gone = self.instances.pop(iid)
                self.end_worker(iid)
                self.record("destroyed", iid, gone.get("label"))
                return 200, {"success": True, "msg": f"destroying instance {iid}."}, {}
        return self.error(404, f"no route {method} {path}")

    def search(self, q: Any) -> Reply:
        _require(isinstance(q, dict), "search body must be a JSON object of filters")
        for key, cond in q.items():
            if key in VAST_PLAIN:
                continue
            _require(key in VAST_FIELDS, f"unknown filter field {key!r}")
            _require(isinstance(cond, dict) and cond and set(cond) <= VAST_OPS,
                     f"filter {key!r} must be {{op: value}} with op in {sorted(VAST_OPS)}")
        _require(q.get("type", "on-demand") in ("on-demand", "bid", "reserved", "ondemand"), "bad type")
        out = []
        for offer in self.offers:
            if all(self._match(offer, k, c) for k, c in q.items() if k not in VAST_PLAIN):
                out.append(offer)
        order = q.get("order") or [["score", "desc"]]
        for field, direction in reversed(order):
            out.sort(key=lambda o: o.get(field, 0), reverse=direction == "desc")
        return 200, {"offers": out[: int(q.get("limit", 64))]}, {}

    @staticmethod
    def _match(offer: dict[str, Any], key: str, cond: dict[str, Any]) -> bool:
        value = offer.get(key)
        if key == "geolocation" and isinstance(value, str):
            value = value.rsplit(",", 1)[-1].strip()
        for op, want in cond.items():
            ok = VAST_TESTS[op](value, want)
            if not ok:
                return False
        return True

    def create(self, ask_id: int, body: Any) -> Reply:
        _require(isinstance(body, dict), "create body must be a JSON object")
        _only_keys(body, VAST_CREATE_KEYS, "create")
        _require(body.get("client_id") == "me", "client_id must be 'me'")
        _require(isinstance(body.get("image"), str) and body["image"], "image is required")
        env = body.get("env", {})
        _require(isinstance(env, (dict, str)), "env must be an object (or a docker-flag string)")
        _require(body.get("runtype", "ssh") in VAST_RUNTYPES, f"runtype must be one of {sorted(VAST_RUNTYPES)}")
        if "args" in body:
            _require(isinstance(body["args"], list) and all(isinstance(a, str) for a in body["args"]),
                     "args must be a list of strings")
        _require(isinstance(body.get("disk", 10), (int, float)), "disk must be a number (GB)")
        offer = next((o for o in self.offers if o["id"] == ask_id), None)
        if offer is None or ask_id in self._vanish:
            self.offers = [o for o in self.offers if o["id"] != ask_id]
            return 404, {"success": False, "error": "invalid_args",
                         "msg": f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available.",
                         "ask_id": ask_id}, {}
        if not self.capacity:
            return 410, {"success": False, "error": "no_such_ask",
                         "msg": f"error 410/3907: no_such_ask Instance type {ask_id} is no longer available.",
                         "ask_id": ask_id}, {}
        iid = self.new_id()
        flags = env.keys() if isinstance(env, dict) else re.findall(r"-p \S+", env)
        ports = {}
        for flag in flags:
            if (m := re.fullmatch(r"-p (\d+):(\d+)(/udp)?", flag)):
                proto = "udp" if m.group(3) else "tcp"
                ports[f"{m.group(2)}/{proto}"] = [{"HostIp": "0.0.0.0",
                                                   "HostPort": str(40000 + int(m.group(2)) % 1000)}]
        self.instances[iid] = {
            "id": iid, "actual_status": None, "intended_status": "running", "cur_state": "running",
            "status_msg": None, "label": body.get("label"), "num_gpus": offer["num_gpus"],
            "gpu_name": offer["gpu_name"], "dph_total": round(offer["dph_total"] + self.billed_markup, 4),
            "public_ipaddr": offer["public_ipaddr"],
            "ssh_host": "ssh4.fake-vast.invalid", "ssh_port": 10000 + iid % 1000, "ports": ports,
            "image_runtype": body.get("runtype"),
            "extra_env": [[k, v] for k, v in (env.items() if isinstance(env, dict) else [])],
            "geolocation": offer["geolocation"], "image": body["image"], "args": body.get("args"),
        }
        if self.keep_offers:
            self.offers = [{**o, "id": self.new_id()} if o["id"] == ask_id else o for o in self.offers]
        else:
            self.offers = [o for o in self.offers if o["id"] != ask_id]     # rented: off the market
        self.record("rented", iid, body.get("label"))
        return 200, {"success": True, "new_contract": iid}, {}

    def read(self, iid: int) -> dict[str, Any]:
        inst = self.instances[iid]
        n = self._reads[iid] = self._reads.get(iid, 0) + 1
        if inst["actual_status"] in (None, "loading", "created"):
            inst["actual_status"] = "running" if n > self.boot_polls else "loading"
            if inst["actual_status"] == "running":
                env = {k: v for k, v in inst["extra_env"] if not k.startswith("-p ")}
                exposed = list(inst["ports"])
                worker = self.launch(iid, env, inst.get("args") or [], exposed)
                if worker is not None:
                    port = f"{worker_port(exposed)}/tcp"
                    inst["public_ipaddr"] = worker[0]
                    inst["ports"][port] = [{"HostIp": "0.0.0.0", "HostPort": str(worker[1])}]
                self.record("running", iid, inst.get("label"))
        return dict(inst)

    def live(self) -> dict[str, str]:
        with self.lock:
            return {str(i): str(x.get("label") or "") for i, x in self.instances.items()}


# ==== RunPod REST v2 ======================================================================================

RUNPOD_CREATE_KEYS = {"name", "image", "gpu", "cpu", "cloud", "dataCenterIds", "args", "disk", "ports", "env",
                      "registry", "mounts", "startSsh", "startJupyter", "templateId", "globalNetworking"}


def runpod_gpu(gpu_id: str = "NVIDIA GeForce RTX 4090", price: float = 0.69, memory: int = 24,
               availability: str = "HIGH") -> dict[str, Any]:
    return {"id": gpu_id, "name": gpu_id.replace("NVIDIA ", ""), "pool": "ADA_24", "manufacturer": "Nvidia",
            "memory": memory, "secure": True, "community": True,
            "price": {"secure": price, "community": round(price * 0.7, 2), "serverless": None},
            "maxCount": {"secure": 8, "community": 8}, "availability": availability,
            "dataCenters": [{"id": "EU-NL-1", "name": "EU-NL-1", "availability": availability},
                            {"id": "EU-SE-1", "name": "EU-SE-1", "availability": availability}],
            "cudaVersions": ["12.4", "12.8", "12.9"]}


class FakeRunPod(FakeServer):
    """FAKE RunPod REST v2 (https://api.runpod.io, paths /v2/...)."""

    name = "runpod"

    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        self.gpus: list[dict[str, Any]] = [runpod_gpu(), runpod_gpu("NVIDIA L40S", 0.99, 48)]
        self.pods: dict[str, dict[str, Any]] = {}
        self.capacity = True
        self.vanish_on_create = False
        self.boot_polls = 1
        self.billed_markup = 0.0            # the pod bills more than the catalog said
        self.full_centers: set[str] = set()  # data centers that answer a create with the capacity 400
        self.balance_low = False            # 402 on create
        self.ssh_keys: list[str] = []       # the account's SSH public keys (GET/PUT /v2/account/ssh-keys)
        self._reads: dict[str, int] = {}

    def kill(self, pod_id: str, status: str = "ERROR") -> None:
        with self.lock:
            self.end_worker(pod_id)
            self.pods[pod_id].update(status=status, runtime=None, cost=0)

    def error(self, status: int, message: str) -> Reply:
        titles = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
                  422: "Unprocessable Entity", 500: "Internal Server Error", 503: "Service Unavailable"}
        if status == 401:
            message = "missing bearer token"
        return status, {"title": titles.get(status, "Error"), "status": status, "detail": message}, \
            {"Content-Type": "application/problem+json"}

    def too_many(self, retry_after: str | None) -> Reply:
        headers = {"Content-Type": "application/problem+json",
                   "RateLimit": '"minute";r=0;t=12', "RateLimit-Policy": '"minute";q=60;w=60'}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return 429, {"title": "Too Many Requests", "status": 429,
                     "detail": "rate limit exceeded for the minute window"}, headers

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        if path == "/v2/catalog/gpus" and method == "GET":
            return self.catalog(query)
        if path == "/v2/pods" and method == "POST":
            return self.create(body)
        if path == "/v2/pods" and method == "GET":
            return 200, {"pods": [self.view(p) for p in self.pods.values()]}, {}
        if path == "/v2/account/ssh-keys" and method == "GET":
            return 200, {"keys": list(self.ssh_keys)}, {}
        if path == "/v2/account/ssh-keys" and method == "PUT":
            # The documented shape {"keys": [...]}: it REPLACES the account's whole set.
            _require(isinstance(body, dict) and set(body) == {"keys"} and isinstance(body["keys"], list)
                     and all(isinstance(k, str) for k in body["keys"]),
                     "Request validation failed: body is {keys: [string]}", 422)
            for key in body["keys"]:
                _require(_openssh_key(key), f"invalid public key: {key[:40]}")
            self.ssh_keys = list(body["keys"])
            return 200, {"keys": list(self.ssh_keys)}, {}
        if (m := re.fullmatch(r"/v2/pods/([a-z0-9]+)", path)):
            pod_id = m.group(1)
            if pod_id not in self.pods:
                return self.error(404, "resource not found")
            if method == "GET":
                return 200, self.read(pod_id), {}
            if method == "DELETE":
                gone = self.pods.pop(pod_id)
                self.end_worker(pod_id)
                self.record("destroyed", pod_id, gone.get("name"))
                return 204, None, {}
        return self.error(404, "resource not found")

    def catalog(self, q: dict[str, str]) -> Reply:
        _require(q.get("product") == "POD", "product must be POD", 422)
        _require(q.get("cloud", "SECURE") in ("SECURE", "COMMUNITY"), "cloud must be SECURE or COMMUNITY", 422)
        _require(q.get("count", "1").isdigit(), "count must be an integer", 422)
        for inc in filter(None, q.get("include", "").split(",")):
            _require(inc in ("AVAILABILITY",), f"unknown include {inc}", 422)
        min_cuda = q.get("minCudaVersion")
        _require(min_cuda is None or re.fullmatch(r"\d+\.\d+", min_cuda) is not None, "minCudaVersion", 422)
        gpus = []
        for g in self.gpus:
            g = json.loads(json.dumps(g))
            if min_cuda and not any(_version(v) >= _version(min_cuda) for v in g.get("cudaVersions", [])):
                continue
            if not self.capacity:
                g["availability"] = "NONE"
                for d in g["dataCenters"]:
                    d["availability"] = "NONE"
            if "AVAILABILITY" not in q.get("include", ""):
                g.pop("availability", None)
                g.pop("dataCenters", None)
            gpus.append(g)
        return 200, {"gpus": gpus}, {}

    def create(self, body: Any) -> Reply:
        _require(isinstance(body, dict), "Request validation failed.", 422)
        _only_keys(body, RUNPOD_CREATE_KEYS, "Request validation failed.", 422)
        _require(isinstance(body.get("name"), str) and body["name"], "Request validation failed: name", 422)
        _require(isinstance(body.get("image"), str) and body["image"], "Request validation failed: image", 422)
        gpu = body.get("gpu")
        _require(isinstance(gpu, dict) and set(gpu) <= {"id", "count", "allowedCudaVersions", "minCudaVersion"}
                 and isinstance(gpu.get("id"), str) and isinstance(gpu.get("count"), int) and gpu["count"] >= 1,
                 "Request validation failed: gpu {id, count}", 422)
        _require(body.get("cloud", "SECURE") in ("SECURE", "COMMUNITY"), "Request validation failed: cloud", 422)
        _require(isinstance(body.get("args", ""), str), "Request validation failed: args is a string", 422)
        ports = body.get("ports", [])
        _require(isinstance(ports, list) and all(isinstance(p, str) and re.fullmatch(r"\d+/(http|tcp)", p)
                                                 for p in ports), "Request validation failed: ports", 422)
        env = body.get("env", {})
        _require(isinstance(env, dict) and all(isinstance(v, str) for v in env.values()),
                 "Request validation failed: env is an object of strings", 422)
        _require(isinstance(body.get("disk", 50), int), "Request validation failed: disk", 422)
        _require(isinstance(body.get("startSsh", False), bool), "Request validation failed: startSsh", 422)
        g = next((x for x in self.gpus if x["id"] == gpu["id"]), None)
        _require(g is not None, f"Request validation failed: unknown gpu id {gpu['id']}", 422)
        _require(isinstance(body.get("registry", ""), (str, type(None))), "Request validation failed: registry", 422)
        if self.balance_low:
            return self.error(402, "insufficient balance to deploy this pod")
        centers = body.get("dataCenterIds") or [d["id"] for d in g["dataCenters"]]
        if all(c in self.full_centers for c in centers):
            return self.error(400, "There are no longer any instances available with the requested specifications. "
                                   "Please refresh and try again.")
        if not self.capacity or self.vanish_on_create:
            return self.error(400, "There are no longer any instances available with the requested specifications. "
                                   "Please refresh and try again.")
        pod_id = f"pod{self.new_id()}"
        if body.get("startSsh") and self.ssh_keys:
            env = {**env, "PUBLIC_KEY": "\n".join(self.ssh_keys)}     # the account's keys, into the pod
        self.pods[pod_id] = {
            "id": pod_id, "name": body["name"], "status": "PROVISIONING", "actions": ["stop", "terminate"],
            "image": body["image"], "args": body.get("args", ""), "disk": body.get("disk", 50), "ports": ports,
            "env": env, "gpu": {"id": gpu["id"], "count": gpu["count"]}, "cloud": body.get("cloud", "SECURE"),
            "dataCenterId": next(c for c in centers if c not in self.full_centers),
            "cost": round(g["price"]["secure"] * gpu["count"] + self.billed_markup, 4),
            "ssh": {"proxy": {"host": "ssh.runpod.io", "port": 22, "username": f"{pod_id}-64411eb2",
                              "command": f"ssh {pod_id}-64411eb2@ssh.runpod.io"}, "direct": None},
            "runtime": {}, "createdAt": "2026-06-01T12:00:00Z", "startedAt": None,
        }
        self.record("rented", pod_id, body["name"])
        return 201, self.view(self.pods[pod_id]), {}

    def live(self) -> dict[str, str]:
        with self.lock:
            return {i: str(p.get("name") or "") for i, p in self.pods.items() if p["status"] != "TERMINATED"}

    def read(self, pod_id: str) -> dict[str, Any]:
        pod = self.pods[pod_id]
        n = self._reads[pod_id] = self._reads.get(pod_id, 0) + 1
        if pod["status"] in ("PROVISIONING", "STARTING"):
            if n > self.boot_polls:
                rt_ports = []
                for spec in pod["ports"]:
                    port, _, kind = spec.partition("/")
                    if kind == "tcp":
                        rt_ports.append({"private": int(port), "public": 30000 + int(port) % 1000, "type": "tcp",
                                         "ip": "195.26.233.3"})
                    else:
                        rt_ports.append({"private": int(port), "public": None, "type": "http", "ip": None})
                import shlex

                worker = self.launch(pod_id, pod["env"], shlex.split(pod["args"] or ""), pod["ports"])
                if worker is not None:
                    for p in rt_ports:
                        if p["private"] == worker_port(pod["ports"]):
                            p.update(ip=worker[0], public=worker[1], type="tcp")
                pod.update(status="RUNNING", startedAt="2026-06-01T12:01:00Z",
                           runtime={"uptime": 60, "gpus": [], "ports": rt_ports})
                self.record("running", pod_id, pod["name"])
                if "22/tcp" in pod["ports"]:
                    pod["ssh"]["direct"] = {"host": "195.26.233.3", "port": 30022, "username": "root",
                                            "command": "ssh root@195.26.233.3 -p 30022"}
            else:
                pod["status"] = "STARTING"
        return self.view(pod)

    @staticmethod
    def view(pod: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(pod))


def _openssh_key(text: str) -> bool:
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        load_ssh_public_key(text.strip().encode())
        return True
    except Exception:  # noqa: BLE001 - any parse failure: not a key
        return False


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split("."))


# ==== Akash Console API ===================================================================================

USDC_DENOM = "ibc/170C677610AC31DF0904FFE09CD3B5C657492170E7E52372E48756B71E56F2F1"


class FakeAkash(FakeServer):
    """FAKE Akash Console managed-wallet API (https://console-api.akash.network)."""

    name = "akash"

    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        # Bids each deployment receives: (provider, denom, amount per block). 600 blocks/h, micro-units:
        # 500 uact/block = 0.30 USD/h; 700 = 0.42; 2000 = 1.20.
        self.bid_prices: list[tuple[str, str, str]] = [
            ("akash1provideraaa", "uact", "700"), ("akash1providerbbb", "uact", "500"),
            ("akash1providerccc", "uakt", "90"),
        ]
        self.bids_after_polls = 0
        self.honour_max_price = True        # real providers never bid above the SDL's pricing
        self.boot_polls = 1
        self.gpu_models: list[dict[str, Any]] = [
            {"vendor": "nvidia", "model": "rtx4090", "ram": "24Gi", "interface": "pcie",
             "availability": {"total": 40, "available": 12}, "providerAvailability": {"total": 6, "available": 4},
             "price": {"currency": "USD", "min": 0.25, "max": 0.8, "avg": 0.4, "weightedAverage": 0.41, "med": 0.38}},
            {"vendor": "nvidia", "model": "l40s", "ram": "48Gi", "interface": "pcie",
             "availability": {"total": 10, "available": 0}, "providerAvailability": {"total": 2, "available": 0},
             "price": {"currency": "USD", "min": 0.7, "max": 1.1, "avg": 0.8, "weightedAverage": 0.8, "med": 0.8}},
        ]
        self.deployments: dict[str, dict[str, Any]] = {}
        self.sdls: dict[str, dict[str, Any]] = {}
        self.sdl_texts: dict[str, str] = {}
        self._bid_polls: dict[str, int] = {}
        self._reads: dict[str, int] = {}
        self.close_bids_on_lease: set[str] = set()    # providers whose bid closes just before we lease

    def label(self, dseq: str) -> str:
        return str(next(iter(self.sdls[dseq]["profiles"]["placement"])))

    def live(self) -> dict[str, str]:
        with self.lock:
            return {dseq: self.label(dseq) for dseq, d in self.deployments.items()
                    if d["deployment"]["state"] != "closed"}

    def kill(self, dseq: str) -> None:
        """The provider closes the lease (e.g. the host went away)."""
        with self.lock:
            self.end_worker(dseq)
            for lease in self.deployments[str(dseq)]["leases"]:
                lease.update(state="closed", closed_on="123460", status=None)

    def needs_auth(self, method: str, path: str) -> bool:
        return path != "/v1/gpu-prices"

    def authorized(self, headers: dict[str, str]) -> bool:
        return headers.get("x-api-key") == self.api_key or headers.get("authorization") == f"Bearer {self.api_key}"

    def error(self, status: int, message: str) -> Reply:
        names = {400: ("BadRequestError", "validation_error", "validation_error"),
                 401: ("UnauthorizedError", "unauthorized", "authorization_error"),
                 403: ("ForbiddenError", "forbidden", "authorization_error"),
                 404: ("NotFoundError", "not_found", "client_error")}
        err, code, typ = names.get(status, ("InternalServerError", "internal_server_error", "server_error"))
        if status == 403:
            message = "Forbidden"
        return status, {"error": err, "message": message, "code": code, "type": typ}, {}

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        if path == "/v1/gpu-prices" and method == "GET":
            total = sum(m["availability"]["total"] for m in self.gpu_models)
            avail = sum(m["availability"]["available"] for m in self.gpu_models)
            return 200, {"availability": {"total": total, "available": avail}, "models": self.gpu_models}, {}
        if path == "/v1/deployments" and method == "POST":
            return self.create_deployment(body)
        if path == "/v1/deployments" and method == "GET":
            skip, limit = int(query.get("skip", 0)), int(query.get("limit", 10))
            # ListDeploymentsResponseSchema: deployment, leases, escrow_account (no groups, no SDL).
            items = [{k: v for k, v in self.view(d).items() if k in ("deployment", "leases", "escrow_account")}
                     for d in self.deployments.values()]
            page = items[skip: skip + limit]
            return 200, {"data": {"deployments": page, "pagination": {
                "total": len(items), "skip": skip, "limit": limit, "hasMore": skip + limit < len(items)}}}, {}
        if path == "/v1/bids" and method == "GET":
            _require("dseq" in query, "Validation error: dseq is required")
            return self.bids(query["dseq"])
        if path == "/v1/leases" and method == "POST":
            return self.create_lease(body)
        if (m := re.fullmatch(r"/v1/deployments/(\d+)", path)):
            dseq = m.group(1)
            if dseq not in self.deployments:
                return self.error(404, f"Deployment {dseq} not found")
            if method == "GET":
                return 200, {"data": {**self.read(dseq), "consoleSettings": {"sdl": self.sdl_texts[dseq]}}}, {}
            if method == "DELETE":
                d = self.deployments[dseq]
                if d["deployment"]["state"] != "closed":
                    self.record("destroyed", dseq, self.label(dseq))
                d["deployment"]["state"] = "closed"
                self.end_worker(dseq)
                for lease in d["leases"]:
                    lease.update(state="closed", status=None)
                return 200, {"data": {"success": True}}, {}
        return self.error(404, "Not found")

    def create_deployment(self, body: Any) -> Reply:
        _require(isinstance(body, dict) and set(body) == {"data"} and isinstance(body["data"], dict),
                 "Validation error: body is {data: {sdl, deposit}}")
        data = body["data"]
        _only_keys(data, {"sdl", "deposit"}, "Validation error")
        _require(isinstance(data.get("sdl"), str), "Validation error: data.sdl is a string")
        _require(isinstance(data.get("deposit", 5), (int, float)), "Validation error: deposit is a number")
        try:
            sdl = yaml.safe_load(data["sdl"])
        except yaml.YAMLError as e:
            raise BadRequest(f"Invalid SDL: {e}") from None
        self.validate_sdl(sdl)
        dseq = str(123400 + self.new_id())
        self.sdls[dseq] = sdl
        self.sdl_texts[dseq] = data["sdl"]
        self.record("rented", dseq, next(iter(sdl["profiles"]["placement"])))
        placement = next(iter(sdl["profiles"]["placement"]))
        self.deployments[dseq] = {
            "deployment": {"id": {"owner": "akash1tenant", "dseq": dseq}, "state": "active", "hash": "abc",
                           "created_at": "123400"},
            "groups": [{"group_id": {"owner": "akash1tenant", "dseq": dseq, "gseq": 1}, "state": "open",
                        "group_spec": {"name": placement}}],
            "leases": [], "escrow_account": {"state": "open"},
            "_bids": [], "manifest": json.dumps([{"name": placement, "services": list(sdl["services"])}]),
        }
        return 201, {"data": {"dseq": dseq, "manifest": self.deployments[dseq]["manifest"],
                              "signTx": {"code": 0, "transactionHash": "F00"}}}, {}

    @staticmethod
    def validate_sdl(sdl: Any) -> None:
        _require(isinstance(sdl, dict) and str(sdl.get("version")) == "2.0", "Invalid SDL: version must be 2.0")
        for key in ("services", "profiles", "deployment"):
            _require(isinstance(sdl.get(key), dict) and sdl[key], f"Invalid SDL: {key} is required")
        compute, placement = sdl["profiles"].get("compute"), sdl["profiles"].get("placement")
        _require(isinstance(compute, dict) and isinstance(placement, dict), "Invalid SDL: profiles.compute/placement")
        for svc, spec in sdl["services"].items():
            _require(isinstance(spec.get("image"), str), f"Invalid SDL: services.{svc}.image")
            for e in spec.get("expose", []):
                _require(isinstance(e.get("port"), int) and isinstance(e.get("to"), list),
                         f"Invalid SDL: services.{svc}.expose")
                _require(e.get("proto", "tcp") in ("tcp", "udp"), f"Invalid SDL: services.{svc}.expose.proto")
            _require(isinstance(spec.get("args", []), list), f"Invalid SDL: services.{svc}.args is a list")
            _require(isinstance(spec.get("env", []), list), f"Invalid SDL: services.{svc}.env is a list")
        for name, prof in compute.items():
            res = prof.get("resources") or {}
            gpu = res.get("gpu") or {}
            _require(isinstance(gpu.get("units"), int), f"Invalid SDL: compute.{name}.gpu.units")
            nvidia = ((gpu.get("attributes") or {}).get("vendor") or {}).get("nvidia")
            _require(isinstance(nvidia, list) and all("model" in x for x in nvidia),
                     f"Invalid SDL: compute.{name}.gpu.attributes.vendor.nvidia[].model")
            _require(re.fullmatch(r"\d+Gi", str((res.get("memory") or {}).get("size", ""))) is not None,
                     f"Invalid SDL: compute.{name}.memory.size")
        for name, pl in placement.items():
            _only_keys(pl, {"attributes", "pricing", "signedBy"}, f"Invalid SDL: placement.{name}")
            signed = pl.get("signedBy", {"anyOf": []})
            _require(isinstance(signed, dict) and set(signed) <= {"anyOf", "allOf"}
                     and all(isinstance(v, list) and all(isinstance(a, str) for a in v) for v in signed.values()),
                     f"Invalid SDL: placement.{name}.signedBy")
            for svc, price in (pl.get("pricing") or {}).items():
                _require(price.get("denom") and isinstance(price.get("amount"), (int, float)),
                         f"Invalid SDL: placement.{name}.pricing.{svc}")
        for svc, groups in sdl["deployment"].items():
            _require(svc in sdl["services"], f"Invalid SDL: deployment.{svc} names no service")
            for pl, d in groups.items():
                _require(pl in placement and d.get("profile") in compute, f"Invalid SDL: deployment.{svc}.{pl}")

    def bids(self, dseq: str) -> Reply:
        d = self.deployments.get(dseq)
        if d is None:
            return 200, {"data": []}, {}
        n = self._bid_polls[dseq] = self._bid_polls.get(dseq, 0) + 1
        if not d["_bids"] and n > self.bids_after_polls and d["deployment"]["state"] == "active":
            sdl = self.sdls[dseq]
            pl = next(iter(sdl["profiles"]["placement"].values()))
            max_amount = next(iter(pl["pricing"].values()))["amount"]
            for bseq, (provider, denom, amount) in enumerate(self.bid_prices, 1):
                if self.honour_max_price and denom == "uact" and float(amount) > max_amount:
                    continue
                d["_bids"].append({"id": {"owner": "akash1tenant", "dseq": dseq, "gseq": 1, "oseq": 1,
                                          "provider": provider, "bseq": bseq},
                                   "state": "open", "price": {"denom": denom, "amount": f"{float(amount):.18f}"},
                                   "created_at": "123405", "resources_offer": []})
        return 200, {"data": [{"bid": b, "escrow_account": {"state": "open"}} for b in d["_bids"]]}, {}

    def create_lease(self, body: Any) -> Reply:
        _require(isinstance(body, dict) and set(body) == {"manifest", "leases"},
                 "Validation error: body is {manifest, leases: [{dseq, gseq, oseq, provider}]}")
        _require(isinstance(body["leases"], list) and len(body["leases"]) == 1, "Validation error: leases")
        lease = body["leases"][0]
        _require(isinstance(lease, dict) and set(lease) == {"dseq", "gseq", "oseq", "provider"},
                 "Validation error: lease is {dseq, gseq, oseq, provider}")
        _require(isinstance(lease["gseq"], int) and isinstance(lease["oseq"], int), "Validation error: gseq/oseq")
        dseq = str(lease["dseq"])
        d = self.deployments.get(dseq)
        _require(d is not None, f"Deployment {dseq} not found")
        _require(body["manifest"] == d["manifest"], "Validation error: manifest does not match the deployment")
        bid = next((b for b in d["_bids"] if b["id"]["provider"] == lease["provider"]), None)
        _require(bid is not None, f"no bid from {lease['provider']}")
        if lease["provider"] in self.close_bids_on_lease:
            bid["state"] = "closed"
        _require(bid["state"] == "open", f"Bid from {lease['provider']} is not open ({bid['state']})")
        for b in d["_bids"]:
            b["state"] = "active" if b is bid else "lost"
        d["leases"].append({"id": dict(bid["id"]), "state": "active", "price": dict(bid["price"]),
                            "created_at": "123406", "closed_on": "0", "status": None})
        return 200, {"data": self.view(d)}, {}

    def read(self, dseq: str) -> dict[str, Any]:
        d = self.deployments[dseq]
        n = self._reads[dseq] = self._reads.get(dseq, 0) + 1
        sdl = self.sdls[dseq]
        for lease in d["leases"]:
            if lease["state"] == "active" and n > self.boot_polls and lease["status"] is None:
                services, forwarded, ips = {}, {}, {}
                for svc, spec in sdl["services"].items():
                    services[svc] = {"name": svc, "available": 1, "total": 1, "uris": [],
                                     "ready_replicas": 1, "available_replicas": 1}
                    exposed = spec.get("expose", [])
                    # ForwardedPortSchema {port, externalPort, host?, available?}: TCP only.
                    forwarded[svc] = [{"port": e["port"], "externalPort": 31000 + e["port"] % 1000,
                                       "host": "provider.fake-akash.invalid", "available": 1}
                                      for e in exposed if e.get("proto", "tcp") == "tcp"]
                    # GUESSES: UDP reaches us as an IP lease entry {IP, Port, ExternalPort, Protocol}.
                    ips[svc] = [{"IP": "198.51.100.77", "Port": e["port"], "ExternalPort": 31000 + e["port"] % 1000,
                                 "Protocol": "UDP"} for e in exposed if e.get("proto") == "udp"]
                    tcp = [f"{e['port']}/tcp" for e in exposed if e.get("proto", "tcp") == "tcp"]
                    env = dict(str(x).split("=", 1) for x in spec.get("env", []))
                    worker = self.launch(dseq, env, list(spec.get("args", [])), tcp)
                    for fp in forwarded[svc] if worker is not None else []:
                        if fp["port"] == worker_port(tcp):
                            fp.update(host=worker[0], externalPort=worker[1])
                lease["status"] = {"services": services, "forwarded_ports": forwarded, "ips": ips}
                self.record("running", dseq, self.label(dseq))
        return self.view(d)

    @staticmethod
    def view(d: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps({k: v for k, v in d.items() if not k.startswith("_") and k != "manifest"}))


# ==== OpenAI-compatible upstream (GonkaGate-shaped) =======================================================

class FakeOpenAIUpstream(FakeServer):
    """FAKE OpenAI-compatible upstream: GET /v1/models only (what the fleet checks)."""

    name = "openai"

    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        self.models = ["qwen/qwen3-32b-fp8", "qwen/qwen2.5-7b-instruct"]

    def error(self, status: int, message: str) -> Reply:
        code = {401: "invalid_api_key", 403: "forbidden", 404: "not_found"}.get(status, "server_error")
        return status, {"error": {"message": message, "type": "invalid_request_error", "code": code}}, {}

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> Reply:
        if path == "/v1/models" and method == "GET":
            return 200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "gonka"}
                                                    for m in self.models]}, {}
        return self.error(404, f"no route {method} {path}")
