#!/usr/bin/env python3
"""infermesh worker entrypoint: channel up, weights verified, vLLM serving, drain on SIGTERM.

The channel (the plan's, fleet/kinds.py): INFERMESH_CHANNEL=mtls in marketplace containers, which
may not start WireGuard (no NET_ADMIN, no /dev/net/tun). No private key ever reaches the container
from outside: a marketplace stores what it is given (Vast and RunPod the env, Akash the SDL), so the
worker makes its own key pair here and gets only a certificate for it (``tls_up``):

1. The environment holds the stack CA's certificate (INFERMESH_TLS_CA, public; its PEM in base64 on
   one line) and a one-time bootstrap token (INFERMESH_BOOTSTRAP_TOKEN); both are taken out of the
   environment.
2. The worker makes an ECDSA P-256 key in /run/infermesh/tls (0400) and serves, on the port vLLM
   will serve (the one the marketplace forwards), a bootstrap endpoint that answers only the token:
   ``GET /infermesh/bootstrap/csr`` hands out a certificate request for that key, and
   ``PUT /infermesh/bootstrap/cert`` takes the certificate once. A certificate is accepted only if
   it is for this key, signed by the stack CA and valid now; anything else is refused (422) and the
   token stays unused.
3. The lease provider (fleet/marketplaces/worker_tls.py), once the lease runs, signs the request
   with the stack CA for the lease's endpoint name and pushes it. The worker records the token as
   used, closes the bootstrap endpoint and starts vLLM on the same port with mutual TLS (the
   launch's --ssl-* arguments point at the files; client certificates from the stack CA required).

A used token is worthless: the endpoint is gone, and a container restarted on the same disk reuses
its key and certificate and never opens it again. A forged certificate (not from the stack CA) is
refused here and by the gateway. Otherwise (an image used by hand) it serves where ``--host`` says:
WireGuard is not its business (on SSH hosts, Ansible's mesh role sets up the mesh and runs vLLM; no
lease carries a WireGuard key, docs/mesh.md).

Environment (set by the GpuLease): INFERMESH_CHANNEL, INFERMESH_MESH_ADDRESS,
INFERMESH_WEIGHTS_SHA256 (optional: checksum of the weights snapshot), INFERMESH_DRAIN_S,
INFERMESH_RUN_AS (uid for vLLM), INFERMESH_TLS_CA and INFERMESH_BOOTSTRAP_TOKEN (mtls),
INFERMESH_TLS_DIR (default /run/infermesh/tls), INFERMESH_SERVER_MODULE (what serves; default vLLM's
OpenAI server, ``engines.sim`` in the tests). Arguments are the server's (``--model ... --host ...
--port 8000``). This file is copied alone into the image: the standard library and ``cryptography``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def log(msg: str) -> None:
    print(f"infermesh-worker: {msg}", file=sys.stderr, flush=True)


def arg(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else default


TLS_DIR = Path(os.environ.get("INFERMESH_TLS_DIR", "/run/infermesh/tls"))
KEY_FILE, CERT_FILE, CA_FILE, USED_FILE = "worker.key", "worker.crt", "ca.crt", "bootstrap.used"
# The bootstrap endpoint (fleet/marketplaces/worker_tls.py speaks the other side).
BOOTSTRAP_PATH = "/infermesh/bootstrap"
MAX_CERT_BYTES = 64 * 1024


def ca_from_env(text: str) -> bytes:
    """INFERMESH_TLS_CA: the CA certificate's PEM, base64-encoded on one line (marketplaces pass env values
    through command lines and forms that do not all keep newlines), or the PEM itself."""
    import base64
    import binascii

    text = text.strip()
    if text.startswith("-----BEGIN"):
        return text.encode() + b"\n"
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _write(path: Path, data: bytes, uid: int) -> None:
    path.unlink(missing_ok=True)                  # a file of ours is 0400: replaced, not rewritten
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o400)
    if uid and os.geteuid() == 0:
        os.chown(path, uid, -1)


def refusal(cert_pem: bytes, key, ca) -> str:  # noqa: ANN001
    """Why a certificate is not taken for this key and this CA ("" when it is)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "not a PEM certificate"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            != key.public_key().public_bytes(serialization.Encoding.DER, spki)):
        return "the certificate is not for this worker's key"
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - ValueError (issuer), InvalidSignature, TypeError (key type)
        return "the certificate is not signed by the stack CA"
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return "the certificate is not valid now"
    try:
        if ExtendedKeyUsageOID.SERVER_AUTH not in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value:
            return "the certificate is not for a server"
    except x509.ExtensionNotFound:
        pass
    return ""


class Bootstrap:
    """The worker's side of the certificate bootstrap: its own key, a request for it, and the one
    certificate it accepts (for this key, from the stack CA, valid now)."""

    def __init__(self, token: str, ca_pem: bytes, tls_dir: Path = TLS_DIR, uid: int = 0) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        if not token:
            raise ValueError("no bootstrap token")
        self.token, self.dir, self.uid = token, tls_dir, uid
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self.ca_pem = ca_pem
        self.lock = threading.Lock()
        self.done = threading.Event()
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if uid and os.geteuid() == 0:
            os.chown(tls_dir, uid, -1)
        self.key = ec.generate_private_key(ec.SECP256R1())
        _write(tls_dir / CA_FILE, ca_pem, uid)
        _write(tls_dir / KEY_FILE, self.key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), uid)
        self.csr_pem = (x509.CertificateSigningRequestBuilder()
                        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "infermesh worker")]))
                        .sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))

    def authorized(self, header: str | None) -> bool:
        import hmac

        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def refusal(self, cert_pem: bytes) -> str:
        return refusal(cert_pem, self.key, self.ca)

    def accept(self, cert_pem: bytes) -> tuple[int, str]:
        """(HTTP status, reason): 204 once; 410 after; 422 for a certificate that is not taken."""
        with self.lock:
            if self.done.is_set():
                return 410, "the bootstrap token was used"
            why = self.refusal(cert_pem)
            if why:
                return 422, why
            _write(self.dir / CERT_FILE, cert_pem, self.uid)
            _write(self.dir / USED_FILE, b"used\n", self.uid)
            self.done.set()
            return 204, ""


def bootstrap_server(boot: Bootstrap, host: str, port: int):
    """The bootstrap endpoint (not yet serving): an HTTP server on (host, port)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        timeout = 15

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

        def reply(self, status: int, body: bytes = b"", ctype: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if body:
                self.wfile.write(body)

        def route(self) -> None:
            if not self.path.startswith(BOOTSTRAP_PATH + "/"):
                return self.reply(404, b"the worker is waiting for its certificate\n")
            if boot.done.is_set():
                return self.reply(410, b"the bootstrap token was used\n")
            if not boot.authorized(self.headers.get("Authorization")):
                return self.reply(401, b"bootstrap token required\n")
            if self.command == "GET" and self.path == BOOTSTRAP_PATH + "/csr":
                return self.reply(200, boot.csr_pem, "application/pkcs10")
            if self.command == "PUT" and self.path == BOOTSTRAP_PATH + "/cert":
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_CERT_BYTES:
                    return self.reply(413 if length else 411, b"a PEM certificate, at most 64 KiB\n")
                status, why = boot.accept(self.rfile.read(length))
                return self.reply(status, (why + "\n").encode() if why else b"")
            return self.reply(405, b"GET csr or PUT cert\n")

        do_GET = do_PUT = do_POST = do_DELETE = route

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def reusable(tls_dir: Path, ca_pem: bytes) -> bool:
    """A container restarted on its own disk: the key and certificate it was given still hold."""
    if not all((tls_dir / f).exists() for f in (KEY_FILE, CERT_FILE, USED_FILE)):
        return False
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key((tls_dir / KEY_FILE).read_bytes(), None)
        ok = refusal((tls_dir / CERT_FILE).read_bytes(), key, x509.load_pem_x509_certificate(ca_pem)) == ""
    except (OSError, ValueError, TypeError):
        return False
    if ok and (tls_dir / CA_FILE).read_bytes() != ca_pem:
        _write(tls_dir / CA_FILE, ca_pem, 0)
    return ok


def tls_up(uid: int, argv: list[str]) -> None:
    """The worker's own key, a certificate for it from the lease provider, the files vLLM reads."""
    token, ca = os.environ.pop("INFERMESH_BOOTSTRAP_TOKEN", ""), ca_from_env(os.environ.pop("INFERMESH_TLS_CA", ""))
    for legacy in ("INFERMESH_TLS_CERT", "INFERMESH_TLS_KEY"):
        if os.environ.pop(legacy, None):
            log(f"{legacy} is set: ignored (a worker makes its own key; nothing secret is delivered in the env)")
    if b"BEGIN CERTIFICATE" not in ca:
        log("INFERMESH_CHANNEL=mtls but INFERMESH_TLS_CA is not set (or not a certificate): refusing to serve "
            "without the channel")
        sys.exit(4)
    if reusable(TLS_DIR, ca):
        log("mutual TLS material from an earlier start reused (the bootstrap token is used)")
        return
    if (TLS_DIR / USED_FILE).exists():
        log("the bootstrap token was used and the certificate it brought no longer holds (expired, or from "
            "another CA): replace this lease (`pulumi up --replace`)")
        sys.exit(5)
    if not token:
        log("INFERMESH_CHANNEL=mtls but INFERMESH_BOOTSTRAP_TOKEN not set: refusing to serve without the channel")
        sys.exit(4)
    boot = Bootstrap(token, ca, TLS_DIR, uid)
    host, port = arg(argv, "--host", "0.0.0.0"), int(arg(argv, "--port", "8000"))
    server = bootstrap_server(boot, host, port)
    log(f"waiting for the certificate on {host}:{port}{BOOTSTRAP_PATH} (the lease provider pushes it)")
    thread = threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True)
    thread.start()
    try:
        boot.done.wait()
    finally:
        server.shutdown()
        server.server_close()
    log("mutual TLS material in place: own key, certificate from the stack CA; the bootstrap endpoint is closed")


def snapshot_sha256(root: Path) -> str:
    """sha256 over (relative path, bytes) of every file, sorted: the same as fleet's weights checksum."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def verify_weights(argv: list[str]) -> None:
    want = os.environ.get("INFERMESH_WEIGHTS_SHA256")
    if not want:
        return
    from huggingface_hub import snapshot_download    # shipped in the vLLM image

    model, revision = arg(argv, "--model"), arg(argv, "--revision", "main")
    local = Path(snapshot_download(model, revision=revision))
    got = snapshot_sha256(local)
    if got != want:
        log(f"weights checksum mismatch for {model}@{revision}: want {want}, got {got}; refusing to serve")
        sys.exit(3)
    log(f"weights verified ({got[:12]})")


def healthcheck() -> int:
    if os.environ.get("INFERMESH_CHANNEL") == "mtls":
        # the port requires a client certificate (only gateways hold one): listening is what we can see
        import socket
        try:
            socket.create_connection(("127.0.0.1", 8000), timeout=4).close()
            return 0
        except OSError:
            return 1
    host = os.environ.get("INFERMESH_MESH_ADDRESS", "127.0.0.1")
    try:
        urllib.request.urlopen(f"http://{host}:8000/health", timeout=4)
        return 0
    except Exception:  # noqa: BLE001 - any failure is unhealthy
        return 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["--healthcheck"]:
        return healthcheck()
    uid = int(os.environ.get("INFERMESH_RUN_AS", "0"))
    if os.environ.get("INFERMESH_CHANNEL") == "mtls":
        tls_up(uid, argv)
    verify_weights(argv)
    module = os.environ.get("INFERMESH_SERVER_MODULE", "vllm.entrypoints.openai.api_server")
    child = subprocess.Popen([sys.executable, "-m", module, *argv],
                             user=uid if uid and os.geteuid() == 0 else None)
    draining = {"at": None}

    def on_term(signum, _frame):
        if draining["at"] is None:
            draining["at"] = time.monotonic()
            log(f"SIGTERM: draining for {os.environ.get('INFERMESH_DRAIN_S', '30')}s before stopping vLLM")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    drain_s = float(os.environ.get("INFERMESH_DRAIN_S", "30"))
    while child.poll() is None:
        if draining["at"] is not None and time.monotonic() - draining["at"] >= drain_s:
            child.send_signal(signal.SIGTERM)
            try:
                return child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                return child.wait()
        time.sleep(0.5)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
