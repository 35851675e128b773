"""The channel from gateway to workers: mutual TLS, for real, on loopback.

A local stack's sim workers serve mutual TLS with certificates made at start (fleet/channel.py),
and the gateway is their client. Beside them the test starts three workers that must be refused:
one with a certificate from another CA, one with an expired certificate, one speaking plain HTTP.
Each is taken out with its reason in /admin/endpoints and no request reaches it.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from fleet import spec as spec_mod
from fleet.channel import Issued, issue, make_ca, tls_ref, worker_server_name
from fleet.plan import build_plan
from fleet.routing import routing_config
from tests.conftest import REPO, free_port
from tests.test_pulumi_program import fakes  # noqa: F401 - the FAKE marketplaces fixture


def _admin(stack, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(stack.root_url + path, method=method, data=b"" if method == "POST" else None,
                                 headers={"authorization": f"Bearer {stack.admin_token()}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _endpoints(stack) -> dict[str, dict]:
    return {e["id"]: e for p in _admin(stack, "/admin/endpoints")["pools"] for e in p["endpoints"]}


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker on {port} exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"worker on {port} did not listen")


def _sim(port: int, *tls: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engines.sim", "--port", str(port), "--model", "demo-chat",
                             "--ttft-ms", "1", "--itl-ms", "1", *tls], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stats(port: int, tls: bool) -> dict:
    """/sim/stats of a refused worker, read around the channel (no verification, any client cert)."""
    if not tls:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/stats", timeout=5) as r:
            return json.loads(r.read())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(*_stats.client)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/sim/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def channel_stack(tmp_path_factory):
    from tests.conftest import start_stack

    tmp = tmp_path_factory.mktemp("channel")
    running = start_stack(tmp)
    certs = running.stack.certs
    ca_pem = certs.ca.read_bytes()
    ca_key = (certs.dir / "ca.key").read_bytes()
    from fleet.channel import Issued
    stack_ca = Issued(ca_pem, ca_key)
    bad = tmp / "bad"
    bad.mkdir()

    def write(name: str, issued) -> tuple[str, str]:
        (bad / f"{name}.crt").write_bytes(issued.cert_pem)
        (bad / f"{name}.key").write_bytes(issued.key_pem)
        return str(bad / f"{name}.crt"), str(bad / f"{name}.key")

    stack = running.spec.stack
    other_ca = make_ca("some other CA")
    foreign = write("foreign", issue(other_ca, "foreign", server=True, dns=(worker_server_name(stack, "bad-0"),)))
    expired = write("expired", issue(stack_ca, "expired", server=True, dns=(worker_server_name(stack, "bad-1"),),
                                     days=30, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)))
    _stats.client = certs.client()
    ports = [free_port() for _ in range(3)]
    procs = [
        _sim(ports[0], "--ssl-certfile", foreign[0], "--ssl-keyfile", foreign[1], "--ssl-ca-certs", str(certs.ca),
             "--ssl-cert-reqs", "2"),
        _sim(ports[1], "--ssl-certfile", expired[0], "--ssl-keyfile", expired[1], "--ssl-ca-certs", str(certs.ca),
             "--ssl-cert-reqs", "2"),
        _sim(ports[2]),                                  # plain HTTP
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            _wait_port(port, proc)
        routing = json.loads((running.state / "routing.json").read_text())
        chat = next(m for m in routing["models"] if m["id"] == "demo-chat")
        pool = next(p for p in chat["pools"] if p["name"] == "demo-chat-east")
        pool["endpoints"] += [{"id": f"bad/{i}", "url": f"https://127.0.0.1:{port}", "channel": "mtls",
                               "tls": tls_ref(stack, f"bad-{i}")} for i, port in enumerate(ports)]
        (running.state / "routing.json").write_text(json.dumps(routing))
        _admin(running, "/admin/reload", "POST")
        yield running, ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        running.stack.stop()


def test_workers_serve_mutual_tls_and_the_gateway_is_their_client(channel_stack):
    running, _ = channel_stack
    eps = _endpoints(running)
    good = [e for i, e in eps.items() if i.startswith("demo-chat-east/")]
    assert len(good) == 2 and all(e["channel"] == "mtls" and e["url"].startswith("https://") for e in good)
    assert all(e["healthy"] and e["reason"] == "" for e in good)
    client = OpenAI(base_url=running.base_url, api_key=running.key())
    out = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content
    chunks = list(client.chat.completions.create(model="demo-chat", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert chunks


def test_refused_workers_are_out_with_their_reason_and_get_no_request(channel_stack):
    running, ports = channel_stack
    deadline = time.monotonic() + 10
    while True:
        eps = _endpoints(running)
        if all(eps[f"bad/{i}"]["reason"] for i in range(3)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert eps["bad/0"]["reason"] == "tls: the worker's certificate is not signed by the stack's CA"
    assert eps["bad/1"]["reason"] == "tls: the worker's certificate has expired"
    assert eps["bad/2"]["reason"] == "tls: the worker answered in plain HTTP, not TLS"
    assert not any(eps[f"bad/{i}"]["available"] for i in range(3))

    client = OpenAI(base_url=running.base_url, api_key=running.key(), max_retries=0)
    for _ in range(30):
        client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
    assert [_stats(p, tls)["requests"] for p, tls in zip(ports, (True, True, False), strict=True)] == [0, 0, 0]
    assert _endpoints(running)["bad/2"]["reason"]          # still out


def test_a_local_worker_refuses_plain_http_and_clients_without_the_stacks_certificate(channel_stack):
    running, _ = channel_stack
    port = int(running.worker_url("demo-chat-east").rsplit(":", 1)[1])
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/health"), timeout=5).read()
    anonymous = ssl.create_default_context(cafile=str(running.stack.certs.ca))
    anonymous.check_hostname = False
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, http.client.HTTPException)):
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=anonymous, timeout=5)
        conn.request("GET", "/health")
        conn.getresponse().read()
    with urllib.request.urlopen(running.worker_url("demo-chat-east") + "/health", timeout=5) as r:
        assert r.status == 200                       # with the gateway's client certificate


def test_rotated_tls_material_is_applied_live(channel_stack):
    """The gateway watches the TLS files its endpoints name (a renewed certificate, a rotated Secret):
    a new CA file takes effect without a reload call or a restart, and the old material back brings
    the endpoints back."""
    running, _ = channel_stack
    tls = running.stack.certs.dir
    ca = (tls / "ca.crt").read_bytes()

    def reasons() -> set[str]:
        return {e["reason"] for i, e in _endpoints(running).items() if i.startswith("demo-chat-east/")}

    def wait(pred) -> None:
        deadline = time.monotonic() + 15
        while not pred() and time.monotonic() < deadline:
            time.sleep(0.2)

    try:
        (tls / "ca.crt").write_bytes(make_ca("a CA the workers' certificates do not chain to").cert_pem)
        wait(lambda: reasons() == {"tls: the worker's certificate is not signed by the stack's CA"})
        assert reasons() == {"tls: the worker's certificate is not signed by the stack's CA"}
    finally:
        (tls / "ca.crt").write_bytes(ca)
    wait(lambda: reasons() == {""})
    assert reasons() == {""} and all(e["healthy"] for i, e in _endpoints(running).items()
                                     if i.startswith("demo-chat-east/"))


def test_the_plan_picks_the_channel_per_provider_kind_and_ships_no_key_material():
    spec = spec_mod.load("prod")
    routing = build_plan(spec).routing
    text = json.dumps(routing)
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    seen = {}
    for m in routing["models"]:
        for p in m["pools"]:
            pool = next((x for x in spec.pools if x.name == p["name"]), None)
            for e in p["endpoints"]:
                kind = spec.provider(p["provider"]).kind
                seen.setdefault((kind, pool.connection if pool else "-"), set()).add(e["channel"])
                if e["channel"] == "mtls":
                    assert e["url"].startswith("https://") and e["tls"]["server_name"].endswith(".workers.infermesh")
    for (kind, connection), channels in seen.items():
        expected = {"openai": "https"}.get(kind, "wireguard" if connection == "ssh" else "mtls")
        assert channels == {expected}, (kind, connection, channels)
    assert ("vastai", "container") in seen or ("runpod", "container") in seen


def test_routing_config_names_tls_material_by_reference():
    spec = spec_mod.load("local")
    config = routing_config(spec, lambda pool, i: f"http://127.0.0.1:{9000 + i}", tls_dir="/etc/infermesh/tls")
    assert config["tls_dir"] == "/etc/infermesh/tls"
    ep = config["models"][0]["pools"][0]["endpoints"][0]
    assert ep["channel"] == "mtls" and ep["url"] == "https://127.0.0.1:9000"
    assert set(ep["tls"]) == {"ca", "cert", "key", "server_name"}


def test_new_connections_to_a_worker_resume_the_tls_session(tmp_path):
    """asyncio and uvloop open each connection with wrap_bio and no session (aiohttp goes through
    loop.create_connection); the endpoint's context offers the ticket an earlier connection got, so
    the worker (the sim on vLLM's TLS options) resumes instead of a full handshake. A context of
    another endpoint never offers it."""
    import asyncio

    import uvloop

    from fleet.channel import LocalCerts

    certs = LocalCerts(tmp_path / "state", "resume")
    crt, key = certs.worker("pool-0")
    port = free_port()
    proc = _sim(port, "--ssl-certfile", str(crt), "--ssl-keyfile", str(key), "--ssl-ca-certs", str(certs.ca),
                "--ssl-cert-reqs", "2")

    async def reused(ctx: ssl.SSLContext, n: int) -> list[bool]:
        out = []
        for _ in range(n):            # a fresh connection each time, as after a pooled one idled out
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(b"GET /health HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
            out.append(writer.get_extra_info("ssl_object").session_reused)
            writer.close()
        return out

    try:
        _wait_port(port, proc)
        name = worker_server_name("resume", "pool-0")
        for new_loop in (asyncio.new_event_loop, uvloop.new_event_loop):
            with asyncio.Runner(loop_factory=new_loop) as runner:
                ctx = certs.client_context(name)
                assert runner.run(reused(ctx, 4)) == [False, True, True, True]
                other = certs.client_context(name)     # another endpoint's context: its own sessions
                assert runner.run(reused(other, 1)) == [False]
    finally:
        proc.terminate()
        proc.wait(10)


# ---- a marketplace worker's certificate, without its key ever leaving it (fleet/marketplaces/worker_tls.py) ----

def _pem_key(issued) -> str:
    return issued.key_pem.decode()


def _refused(host: str, port: int, token: str, cert: bytes) -> str:
    """What a certificate push gets: the worker's refusal, or why nothing took it."""
    from fleet.marketplaces import worker_tls

    try:
        reply = worker_tls.push(host, port, token, cert, timeout_s=5)
    except (OSError, http.client.HTTPException) as e:
        return f"no endpoint ({type(e).__name__})"
    assert reply.status != 204, "a second certificate was taken"
    return f"HTTP {reply.status}"


def test_worker_bootstrap_takes_one_certificate_for_its_own_key_from_the_stack_ca(tmp_path):
    """The worker image's bootstrap (images/worker/entrypoint.py) and the lease provider's side: a request
    for the worker's own key, a certificate only from the stack CA and only for that key, once."""
    from fleet.marketplaces import worker_tls
    from tests.fakes.marketplaces import worker_entrypoint

    entry = worker_entrypoint()
    ca, other = make_ca("infermesh test channel CA"), make_ca("some other CA")
    ca_pem, ca_key = ca.cert_pem.decode(), _pem_key(ca)
    env = worker_tls.bootstrap_env(ca_pem, ca_key, "infermesh--prod--qwen-vast-0--0123abcd")
    assert entry.ca_from_env(env["INFERMESH_TLS_CA"]) == ca.cert_pem == entry.ca_from_env(ca_pem)
    assert entry.ca_from_env("not base64!") == b"" and "PRIVATE" not in str(env)
    token = worker_tls.bootstrap_token(ca_key, "infermesh--prod--qwen-vast-0--0123abcd")
    assert token != worker_tls.bootstrap_token(ca_key, "infermesh--prod--qwen-vast-1--0123abcd")
    boot = entry.Bootstrap(token, ca.cert_pem, tmp_path / "tls")
    server = entry.bootstrap_server(boot, "127.0.0.1", 0)
    port = server.server_address[1]
    import threading

    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        key_file = tmp_path / "tls" / entry.KEY_FILE
        assert key_file.stat().st_mode & 0o777 == 0o400 and b"PRIVATE KEY" in key_file.read_bytes()
        call = worker_tls._call
        assert call("127.0.0.1", port, "GET", "/csr", "", None, 5).status == 401
        assert call("127.0.0.1", port, "GET", "/csr", "not-the-token", None, 5).status == 401
        csr = call("127.0.0.1", port, "GET", "/csr", token, None, 5)
        assert csr.status == 200 and b"CERTIFICATE REQUEST" in csr.body and b"PRIVATE" not in csr.body
        name = worker_server_name("prod", "qwen-vast-0")
        # a certificate from another CA, and one from the stack CA for another key: refused, the token stays unused
        forged = worker_tls.sign(csr.body, other.cert_pem.decode(), _pem_key(other), name, 30)
        reply = worker_tls.push("127.0.0.1", port, token, forged)
        assert (reply.status, reply.body.strip()) == (422, b"the certificate is not signed by the stack CA")
        stranger = issue(ca, name, server=True, dns=(name,)).cert_pem
        reply = worker_tls.push("127.0.0.1", port, token, stranger)
        assert (reply.status, reply.body.strip()) == (422, b"the certificate is not for this worker's key")
        assert worker_tls.push("127.0.0.1", port, "not-the-token", stranger).status == 401
        assert not boot.done.is_set()
        # the lease provider: request, signature by the stack CA for the lease's name, push
        assert worker_tls.deliver("127.0.0.1", port, token=token, ca_cert_pem=ca_pem, ca_key_pem=ca_key,
                                  name=name, days=30, timeout_s=5) == "issued"
        assert boot.done.is_set()
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((tmp_path / "tls" / entry.CERT_FILE).read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == [name]
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
        assert (tmp_path / "tls" / entry.CA_FILE).read_bytes() == ca.cert_pem
        # a used token is worthless
        again = worker_tls.sign(csr.body, ca_pem, ca_key, name, 30)
        assert _refused("127.0.0.1", port, token, again) == "HTTP 410"
        assert call("127.0.0.1", port, "GET", "/csr", token, None, 5).status == 410
    finally:
        server.shutdown()
        server.server_close()
    # restarted on its own disk: the key and certificate are reused, the endpoint is never opened again
    assert entry.reusable(tmp_path / "tls", ca.cert_pem)
    assert not entry.reusable(tmp_path / "tls", other.cert_pem)


def test_a_worker_that_does_not_take_its_certificate_is_given_back(tmp_path, monkeypatch):
    """A lease whose worker never serves the bootstrap (not the infermesh worker image, or it broke) is a
    failed create: given back, one line saying so."""
    from fleet.components.lease import LeaseError, VastAiLeaseProvider
    from fleet.marketplaces.base import forget_listings
    from tests.engine import engine_view
    from tests.fakes.marketplaces import FakeVastAi

    forget_listings()
    fake = FakeVastAi("k").start()
    fake.boot_polls = 0
    closed = free_port()
    fake.launcher = lambda lease_id, env, args, port: ("127.0.0.1", closed, None)   # nothing answers there
    monkeypatch.setenv("INFERMESH_VASTAI_BASE_URL", fake.url + "/api/v0")
    monkeypatch.setenv("VASTAI_API_KEY", "k")
    ca = make_ca("infermesh test channel CA")
    provider = VastAiLeaseProvider("vastai-api-key")
    props = {"name": "qwen-vast-0", "provider_kind": "vastai", "project": "infermesh", "stack": "prod",
             "gpu_type": "RTX4090", "gpu_count": 1, "region": "eu-west", "countries": ["NL"], "price_cap": 0.5,
             "image": "r/w@sha256:" + "a" * 64, "ports": ["8000/tcp"], "env": {"INFERMESH_CHANNEL": "mtls"},
             "args": ["--ssl-keyfile", "/run/infermesh/tls/worker.key"], "credentials": "vastai-api-key",
             "tls_name": worker_server_name("prod", "qwen-vast-0"), "tls_ca": ca.cert_pem.decode(),
             "tls_ca_key": _pem_key(ca), "tls_days": 30, "tls_renew_days": 7, "wait_s": 1}
    checked = provider.check({}, engine_view(props))
    assert checked.failures == []
    waits: list[float] = []
    build = VastAiLeaseProvider.adapter

    def adapter(self, p):  # noqa: ANN001, ANN202 - the provider's adapter, waiting through a recorder
        a = build(self, p)
        a.sleep = a.http.sleep = waits.append
        return a

    monkeypatch.setattr(VastAiLeaseProvider, "adapter", adapter)
    try:
        with pytest.raises(LeaseError, match=r"its worker did not take its TLS certificate .*did not take its TLS "
                                             r"certificate within 60s.*terminated it, nothing of it bills"):
            provider.create(dict(checked.inputs) | {"wait_s": 0.0})
        assert fake.live() == {} and sum(waits) >= 60
    finally:
        fake.stop()
        forget_listings()


@pytest.fixture(scope="module")
def prod_leases() -> list[dict]:
    """Every GpuLease of the prod stack (all three marketplaces) as the Pulumi program registers it (mocked
    engine)."""
    from tests.test_pulumi_program import recorded_leases, run_program

    mp = pytest.MonkeyPatch()
    try:
        return recorded_leases(run_program("prod", mp))
    finally:
        mp.undo()


def test_marketplace_workers_make_their_own_keys_and_the_gateway_reaches_them_on_mutual_tls(
        channel_stack, prod_leases, fakes, tmp_path):  # noqa: F811 - the imported fixture
    """One mTLS lease per marketplace, created by its lease provider as the engine drives it, against the FAKE
    marketplaces, each running a REAL worker (the image's entrypoint, the sim in place of vLLM) with exactly the
    env the marketplace stored. No private key reaches any marketplace; each worker takes its certificate
    once; the gateway then reaches all three on mutual TLS and no request goes elsewhere."""
    from fleet.channel import CA_FILE, CLIENT_CERT, CLIENT_KEY
    from fleet.marketplaces import worker_tls
    from tests.engine import EngineHost
    from tests.fakes.marketplaces import SimWorkerLauncher
    from tests.test_pulumi_program import stack_config

    running, _ = channel_stack
    certs = running.stack.certs
    ca_pem, ca_key = certs.ca.read_text(), (certs.dir / "ca.key").read_text()     # the gateway trusts this CA
    host = EngineHost(stack_config("prod")[0])
    launcher = SimWorkerLauncher(tmp_path)
    made = []
    try:
        for kind in ("vastai", "runpod", "akash"):
            fakes[kind].launcher = launcher
            props = next(p for p in prod_leases if p["provider_kind"] == kind and "tls_name" in p)
            props = {**props, "tls_ca": ca_pem, "tls_ca_key": ca_key, "wait_s": 60}
            inputs, failures = host.check({}, props)
            assert failures == []
            lease_id, outs = host.create(inputs)
            made.append((kind, lease_id, outs, inputs))
            assert fakes[kind].live()[lease_id] == inputs["label"]
            worker = launcher.started[lease_id]
            assert (outs["endpoint_host"], outs["endpoint_port"]) == ("127.0.0.1", worker["port"])
            # what the marketplace stored: the CA certificate and the lease's token, no key of any kind
            token = worker_tls.bootstrap_token(ca_key, inputs["label"])
            assert base64.b64decode(worker["env"]["INFERMESH_TLS_CA"]).decode() == ca_pem
            assert worker["env"]["INFERMESH_BOOTSTRAP_TOKEN"] == token
            assert not any("\n" in v for v in worker["env"].values())       # one line each
            stored = json.dumps([r["body"] for r in fakes[kind].requests])
            stored += json.dumps(getattr(fakes[kind], "sdl_texts", {}))
            assert "PRIVATE KEY" not in stored and ca_key.splitlines()[1] not in stored
            assert token in stored                    # (the token is there: it is worthless once used)
            # the worker's key stayed with it; a second push with the token is refused
            assert b"PRIVATE KEY" in (worker["tls_dir"] / "worker.key").read_bytes()
            again = issue(Issued(ca_pem.encode(), ca_key.encode()), inputs["tls_name"], server=True,
                          dns=(inputs["tls_name"],)).cert_pem
            assert _refused("127.0.0.1", worker["port"], token, again) != "HTTP 204"
            # a retried create adopts the lease and leaves its worker as it is
            assert host.create(inputs)[0] == lease_id and len(fakes[kind].live()) == 1

        routing_path = running.state / "routing.json"
        original = routing_path.read_text()
        routing = json.loads(original)
        chat = next(m for m in routing["models"] if m["id"] == "demo-chat")
        pool = next(p for p in chat["pools"] if p["name"] == "demo-chat-east")
        chat["pools"] = [{**pool, "endpoints": [
            {"id": f"leased/{i}", "url": f"https://{outs['endpoint_host']}:{int(outs['endpoint_port'])}",
             "channel": "mtls", "tls": {"ca": CA_FILE, "cert": CLIENT_CERT, "key": CLIENT_KEY,
                                        "server_name": inputs["tls_name"]}}
            for i, (_, _, outs, inputs) in enumerate(made)]}]
        routing_path.write_text(json.dumps(routing))
        _admin(running, "/admin/reload", "POST")
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                eps = _endpoints(running)
                if all(eps.get(f"leased/{i}", {}).get("healthy") for i in range(3)):
                    break
                time.sleep(0.2)
            assert [(eps[f"leased/{i}"]["healthy"], eps[f"leased/{i}"]["reason"]) for i in range(3)] == \
                [(True, "")] * 3
            client = OpenAI(base_url=running.base_url, api_key=running.key(), max_retries=0)
            for _ in range(30):
                out = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
                assert out.choices[0].message.content
            served = [_stats(launcher.started[lease_id]["port"], True)["requests"] for _, lease_id, _, _ in made]
            assert sum(served) >= 30 and all(n > 0 for n in served), served
        finally:
            routing_path.write_text(original)
            _admin(running, "/admin/reload", "POST")
    finally:
        for kind, lease_id, outs, _ in made:
            host.delete(lease_id, outs)
            assert fakes[kind].live() == {}


def test_a_renewed_ca_overlaps_the_old_one_in_both_directions(tmp_path):
    """CA rotation: the CA certificate is renewed over the same key (as pulumi-tls re-issues the
    stack CA's SelfSignedCert while its PrivateKey stays), so a worker still holding the old CA and
    its old certificate and a gateway holding the renewed CA and a new client certificate complete
    mutual TLS. A CA with a new key is no such overlap: the gateway refuses the old worker."""
    from fleet.channel import client_context, make_ca

    def write(name: str, issued) -> tuple[str, str]:
        crt, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        crt.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        return str(crt), str(key)

    name = worker_server_name("rot", "pool-0")
    old = make_ca("infermesh rot channel CA", days=30)
    renewed = make_ca("infermesh rot channel CA", days=365, key_pem=old.key_pem)
    rekeyed = make_ca("infermesh rot channel CA", days=365)
    assert renewed.cert_pem != old.cert_pem and renewed.key_pem == old.key_pem
    old_ca, _ = write("old-ca", old)
    renewed_ca, _ = write("renewed-ca", renewed)
    rekeyed_ca, _ = write("rekeyed-ca", rekeyed)
    worker = write("worker", issue(old, name, server=True, dns=(name,)))           # issued before the renewal
    gateway = write("gateway", issue(renewed, "infermesh rot gateway", server=False))   # issued after it
    port = free_port()
    proc = _sim(port, "--ssl-certfile", worker[0], "--ssl-keyfile", worker[1], "--ssl-ca-certs", old_ca,
                "--ssl-cert-reqs", "2")

    def health(ca: str) -> int:
        ctx = client_context(Path(ca), Path(gateway[0]), Path(gateway[1]), server_name=name)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        _wait_port(port, proc)
        assert health(renewed_ca) == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            health(rekeyed_ca)
    finally:
        proc.terminate()
        proc.wait(10)
