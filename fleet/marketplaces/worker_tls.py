"""A marketplace worker's TLS certificate, delivered without its private key ever leaving the worker.

A marketplace keeps what a lease is created with (Vast and RunPod store the env, Akash the SDL; the
host that runs the container can read both), so nothing secret may go there. The worker makes its
own key pair at boot (images/worker/entrypoint.py) and the lease's env carries only the stack CA's
certificate and a one-time bootstrap token. Once the lease runs, the lease provider
(fleet/components/lease.py) calls ``deliver``:

1. ``GET  http://<forwarded host:port>/infermesh/bootstrap/csr`` with the token: the worker's
   certificate request (only its public key is used; the name is ours to decide);
2. the request is signed with the stack CA for the lease's endpoint name (``sign``), valid for the
   declared days, for a server;
3. ``PUT  .../infermesh/bootstrap/cert`` with the token: the worker checks that the certificate is
   for its key, from the stack CA and valid now, records the token as used, closes the endpoint and
   starts vLLM on the same port with mutual TLS.

The token is ``bootstrap_token(ca_key, label)``: an HMAC of the lease's label under the CA key, so a
retried create (which adopts the lease under its label) can compute it again, and nobody without
the CA key can. A used token opens nothing: the endpoint is gone. A worker found already serving a
certificate from the stack CA for its name (a retried create after the push) is left as it is
(``serving``: a handshake with a short-lived client certificate the provider mints from the CA).

A worker that never answers, answers with the wrong token or refuses the certificate is a failed
create: the lease is given back (``Marketplace.abandon``) and the error says why.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from fleet.marketplaces.base import MarketplaceError

if TYPE_CHECKING:   # a stack CA's key and certificate: a key type that signs certificates
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        CertificateIssuerPublicKeyTypes,
    )

BOOTSTRAP_PATH = "/infermesh/bootstrap"          # images/worker/entrypoint.py serves it
TOKEN_ENV, CA_ENV = "INFERMESH_BOOTSTRAP_TOKEN", "INFERMESH_TLS_CA"
KEY_MARKERS = ("PRIVATE KEY",)                   # what must never be in a lease's env


class BootstrapFailed(MarketplaceError):
    """The worker's certificate could not be delivered (the lease is given back)."""

    failover = True

    def __init__(self, message: str, *, retryable: bool = True, fix: str = "", **kw) -> None:  # noqa: ANN003
        super().__init__(message, **kw)
        self.retryable = retryable
        self.fix = fix or ("check that the worker image is the infermesh worker (its entrypoint serves the "
                           "certificate bootstrap on the forwarded port), then run `pulumi up` again")


def bootstrap_token(ca_key_pem: str, label: str) -> str:
    """The lease's one-time token: HMAC-SHA256 of its label under the CA key (hex)."""
    return hmac.new(ca_key_pem.encode(), f"infermesh-bootstrap:{label}".encode(), hashlib.sha256).hexdigest()


def bootstrap_env(ca_cert_pem: str, ca_key_pem: str, label: str) -> dict[str, str]:
    """What the lease's env gains for the bootstrap: the CA certificate (its PEM in base64, one line: Vast
    passes env values on a docker command line) and the token; nothing secret."""
    import base64

    return {CA_ENV: base64.b64encode(ca_cert_pem.encode()).decode(), TOKEN_ENV: bootstrap_token(ca_key_pem, label)}


def sign(csr_pem: bytes, ca_cert_pem: str, ca_key_pem: str, name: str, days: int,
         now: dt.datetime | None = None) -> bytes:
    """A server certificate for the key in ``csr_pem``, naming ``name`` (CN and DNS SAN), from the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise BootstrapFailed(f"the worker's certificate request is not PEM ({e})", retryable=False) from None
    if not csr.is_signature_valid:
        raise BootstrapFailed("the worker's certificate request is not signed by its own key", retryable=False)
    public = csr.public_key()
    if not (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.key_size >= 256
            or isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048
            or isinstance(public, ed25519.Ed25519PublicKey)):
        raise BootstrapFailed(f"the worker's key ({type(public).__name__}) is not one we sign", retryable=False)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = cast("CertificateIssuerPrivateKeyTypes", serialization.load_pem_private_key(ca_key_pem.encode(), None))
    start = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "infermesh")]))
            .issuer_name(ca_cert.subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=isinstance(public, rsa.RSAPublicKey),
                                         content_commitment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                cast("CertificateIssuerPublicKeyTypes", ca_cert.public_key())), critical=False)
            .sign(ca_key, None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _client_identity(ca_cert_pem: str, ca_key_pem: str) -> tuple[bytes, bytes]:
    """A client certificate from the CA, valid ten minutes: what lets the provider look at a worker
    that already serves mutual TLS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = cast("CertificateIssuerPrivateKeyTypes", serialization.load_pem_private_key(ca_key_pem.encode(), None))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "infermesh lease provider")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(minutes=10))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, None if isinstance(ca_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def serving(host: str, port: int, ca_cert_pem: str, ca_key_pem: str, name: str, timeout_s: float = 10.0) -> bool:
    """Whether the worker at host:port serves TLS with a certificate from the CA for ``name`` (and
    takes a client certificate from the CA)."""
    cert, key = _client_identity(ca_cert_pem, ca_key_pem)
    with tempfile.TemporaryDirectory(prefix="infermesh-probe-") as tmp:
        (Path(tmp) / "c.pem").write_bytes(cert)
        (Path(tmp) / "k.pem").write_bytes(key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=ca_cert_pem)
        ctx.load_cert_chain(str(Path(tmp) / "c.pem"), str(Path(tmp) / "k.pem"))
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=name):
            return True
    except (OSError, ssl.SSLError):
        return False


class _Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body


def _call(host: str, port: int, method: str, path: str, token: str, body: bytes | None, timeout_s: float) -> _Reply:
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        headers = {"Authorization": f"Bearer {token}", "User-Agent": "infermesh-fleet/0.1"}
        if body is not None:
            headers["Content-Type"] = "application/x-pem-file"
        conn.request(method, BOOTSTRAP_PATH + path, body=body, headers=headers)
        resp = conn.getresponse()
        return _Reply(resp.status, resp.read(256 * 1024))
    finally:
        conn.close()


def push(host: str, port: int, token: str, cert_pem: bytes, timeout_s: float = 10.0) -> _Reply:
    """One certificate push (the second step of the bootstrap; a worker takes one, once)."""
    return _call(host, port, "PUT", "/cert", token, cert_pem, timeout_s)


def deliver(host: str, port: int, *, token: str, ca_cert_pem: str, ca_key_pem: str, name: str, days: int,
            timeout_s: float = 300.0, poll_s: float = 5.0, sleep: Callable[[float], None] = time.sleep,
            http_timeout_s: float = 10.0) -> str:
    """Get the worker's request, sign it, push the certificate. ``"issued"``, or ``"serving"`` when the
    worker already serves a certificate from the CA for ``name``. Raises BootstrapFailed."""
    where = f"worker at {host}:{port}"
    deadline, waited, last = time.monotonic() + timeout_s, 0.0, "no answer"
    while True:
        try:
            reply = _call(host, port, "GET", "/csr", token, None, http_timeout_s)
        except (OSError, http.client.HTTPException) as e:
            # Not up yet, or already speaking TLS (a plain request to a TLS port is cut off).
            if serving(host, port, ca_cert_pem, ca_key_pem, name, http_timeout_s):
                return "serving"
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        else:
            if reply.status == 200:
                cert = sign(reply.body, ca_cert_pem, ca_key_pem, name, days)
                try:
                    done = push(host, port, token, cert, http_timeout_s)
                except (OSError, http.client.HTTPException) as e:
                    last = f"the certificate push got no answer ({e})"
                else:
                    if done.status == 204:
                        return "issued"
                    if done.status != 410:
                        raise BootstrapFailed(f"{where} refused the certificate for {name}: HTTP {done.status} "
                                              f"{done.body.decode(errors='replace').strip()[:200]}", retryable=False)
                    last = "the token was used meanwhile"
            elif reply.status == 401:
                raise BootstrapFailed(f"{where} refused the bootstrap token (its env was not made for this lease)",
                                      retryable=False)
            elif reply.status == 410:
                if serving(host, port, ca_cert_pem, ca_key_pem, name, http_timeout_s):
                    return "serving"
                last = "its bootstrap token was used, and it does not (yet) serve a certificate for this lease"
            else:
                last = f"HTTP {reply.status} on {BOOTSTRAP_PATH}/csr"
        if time.monotonic() >= deadline or waited >= timeout_s:
            raise BootstrapFailed(f"{where} did not take its TLS certificate within {timeout_s:g}s ({last})")
        sleep(poll_s)
        waited += poll_s
