"""The channel between gateways and workers: names, TLS material references, local certificates.

Marketplace containers and local workers serve mutual TLS (fleet/kinds.py): the worker presents a
server certificate issued by the stack's CA that names its endpoint (``worker_server_name``), and
requires a client certificate from the same CA; the gateway presents its client certificate and
checks the worker's against the stack's CA, by that name.

The routing config carries TLS material by reference (``tls_ref``): file names inside the
directory where the gateway finds its TLS material (``tls_dir`` in the routing config: a mounted
Kubernetes Secret, or ``<state>/tls`` on the local stack). No key ever travels in the routing
config itself.

On Kubernetes the CA and certificates are pulumi-tls resources (fleet/components/certs.py). On the
local stack ``LocalCerts`` makes them with the ``cryptography`` package at `infermesh up`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from fleet.paths import write_private

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

CA_FILE, CLIENT_CERT, CLIENT_KEY = "ca.crt", "gateway.crt", "gateway.key"
CA_DAYS, LEAF_DAYS, RENEW_DAYS = 365, 30, 7     # local validity; a leaf within RENEW_DAYS of its end is re-issued


def _label(text: str) -> str:
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return out[:63].rstrip("-") or "x"


def worker_server_name(stack: str, lease: str) -> str:
    """The DNS name a worker's certificate carries and the gateway verifies (SNI too); never resolved."""
    return f"{_label(lease)}.{_label(stack)}.workers.infermesh"


def tls_ref(stack: str, lease: str) -> dict[str, str]:
    """What an mTLS endpoint of the routing config carries: file names in the gateway's TLS dir."""
    return {"ca": CA_FILE, "cert": CLIENT_CERT, "key": CLIENT_KEY, "server_name": worker_server_name(stack, lease)}


def worker_files(lease: str) -> tuple[str, str]:
    """A worker's certificate and key file names (local stack: in <state>/tls/workers/)."""
    return f"workers/{_label(lease)}.crt", f"workers/{_label(lease)}.key"


def client_context(ca: Path, cert: Path, key: Path, server_name: str | None = None) -> ssl.SSLContext:
    """The gateway side of one mTLS endpoint: verify the worker against the stack's CA (by
    ``server_name`` when given, sent as SNI too), present our client certificate. TLS 1.2 and up."""
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.peer_name = server_name
    return ctx


class _NamedContext(ssl.SSLContext):
    """An SSLContext that verifies (and sends as SNI) the endpoint's certificate name instead of
    the host it dials: a marketplace forwards a port on an address known only after the lease, while
    the worker's certificate is issued before it, for the name ``worker_server_name`` gives.

    It also resumes TLS sessions: asyncio and uvloop open every client connection with
    ``wrap_bio`` and pass no session, so each new connection to a worker would cost a full
    handshake (certificate checks both ways and a key exchange). The context keeps the SSL object of
    its newest connection; the next ``wrap_bio`` takes the session ticket that one received (TLS 1.3
    sends tickets after the handshake) and offers it, so the worker resumes. One context per
    endpoint (gateway/channel.py): a ticket goes back only to the worker that issued it."""

    peer_name: str | None = None
    stamp: tuple = ()                 # (file, mtime) of the material it was built from (gateway/channel.py)
    _ticket: ssl.SSLSession | None = None
    _last: ssl.SSLObject | None = None

    def resumable(self) -> ssl.SSLSession | None:
        """The newest unexpired session ticket a connection of this context received, if any."""
        try:
            last = self._last.session if self._last is not None else None
        except ValueError:          # "i2d() failed": that connection is still in its handshake, no session yet
            last = None
        if last is not None and last.has_ticket:
            self._ticket = last
        t = self._ticket
        if t is not None and time.time() >= t.time + min(t.timeout, t.ticket_lifetime_hint or t.timeout):
            self._ticket = t = None
        return t

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):  # noqa: ANN001
        if session is None and not server_side:
            session = self.resumable()
        obj = super().wrap_bio(incoming, outgoing, server_side=server_side,
                               server_hostname=self.peer_name or server_hostname, session=session)
        if not server_side:
            self._last = obj
        return obj

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True,  # noqa: ANN001
                    suppress_ragged_eofs=True, server_hostname=None, session=None):
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=self.peer_name or server_hostname, session=session)


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The worker side, as vLLM's --ssl-certfile/--ssl-keyfile/--ssl-ca-certs/--ssl-cert-reqs 2 make it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def refusal(exc: BaseException) -> str:
    """One line saying why a TLS channel was refused, for /admin/endpoints."""
    text = str(getattr(exc, "verify_message", "") or getattr(exc, "reason", "") or exc)
    seen = f"{text} {exc}".lower()
    if "expired" in seen:
        return "tls: the worker's certificate has expired"
    if "not yet valid" in seen:
        return "tls: the worker's certificate is not yet valid"
    if "unable to get local issuer" in seen or "self-signed" in seen or "self signed" in seen:
        return "tls: the worker's certificate is not signed by the stack's CA"
    if "hostname mismatch" in seen or "doesn't match" in seen or "not valid for" in seen:
        return "tls: the worker's certificate names another endpoint"
    if "wrong version number" in seen or "record layer failure" in seen or "http request" in seen \
            or "packet length too long" in seen or "unknown protocol" in seen:
        return "tls: the worker answered in plain HTTP, not TLS"
    if "certificate required" in seen or "unknown ca" in seen or "bad certificate" in seen:
        return "tls: the worker refused the gateway's client certificate"
    return f"tls: handshake failed ({text[:120]})"


# ---- certificates for the local stack (and tests) ----------------------------------------------

@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str, days: int = CA_DAYS, key_pem: bytes | None = None) -> Issued:
    """A self-signed CA. With ``key_pem``, a renewal: the same key and name, a new validity. A
    certificate issued under the old CA certificate chains to the renewed one (same issuer name,
    same key, same key identifier), so peers holding either trust each other across the renewal:
    that is the rotation's overlap. pulumi-tls renews the stack CA the same way (its SelfSignedCert
    is re-issued at early_renewal_hours; the PrivateKey resource stays: fleet/components/certs.py)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    # the stack CA's key is P-256, made by _key() (or by pulumi-tls as ECDSA P256: fleet/components/certs.py)
    key = cast("ec.EllipticCurvePrivateKey", serialization.load_pem_private_key(key_pem, None)) if key_pem else _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def issue(ca: Issued, common_name: str, *, server: bool, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
          days: int = LEAF_DAYS, not_before: dt.datetime | None = None) -> Issued:
    """A leaf certificate signed by `ca`: a worker's (server) or the gateway's (client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = cast("ec.EllipticCurvePrivateKey", serialization.load_pem_private_key(ca.key_pem, None))   # P-256
    key = _key()
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   cast("ec.EllipticCurvePublicKey", ca_cert.public_key())),
                              critical=False))
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def _days_left(cert_pem: bytes) -> float:
    from cryptography import x509
    end = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
    return (end - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400


class LocalCerts:
    """The local stack's CA and certificates in ``<state>/tls``, made at `infermesh up` and kept
    while valid (a leaf within RENEW_DAYS of its end, or one from another CA, is re-issued)."""

    def __init__(self, state: Path, stack: str, host: str = "127.0.0.1") -> None:
        self.dir, self.stack, self.host = state / "tls", stack, host

    @property
    def ca(self) -> Path:
        return self.dir / CA_FILE

    def ensure_ca(self) -> Issued:
        crt, key = self.dir / CA_FILE, self.dir / "ca.key"
        if crt.exists() and key.exists() and _days_left(crt.read_bytes()) > RENEW_DAYS:
            return Issued(crt.read_bytes(), key.read_bytes())
        # renewed over the same key: leaves issued before still chain to it (make_ca); a new key
        # (none yet, or lost) makes every leaf issued before it useless
        renewal = key.exists()
        ca = make_ca(f"infermesh {self.stack} local CA", key_pem=key.read_bytes() if renewal else None)
        write_private(key, ca.key_pem)
        write_private(crt, ca.cert_pem, mode=0o644)
        if not renewal:
            for stale in (self.dir / CLIENT_CERT, *self.dir.glob("workers/*.crt")):
                stale.unlink(missing_ok=True)
        return ca

    def _leaf(self, cert: Path, key: Path, ca: Issued, **kw) -> tuple[Path, Path]:
        if not (cert.exists() and key.exists() and _days_left(cert.read_bytes()) > RENEW_DAYS):
            leaf = issue(ca, **kw)
            write_private(key, leaf.key_pem)
            write_private(cert, leaf.cert_pem, mode=0o644)
        return cert, key

    def client(self) -> tuple[Path, Path]:
        ca = self.ensure_ca()
        return self._leaf(self.dir / CLIENT_CERT, self.dir / CLIENT_KEY, ca,
                          common_name=f"infermesh {self.stack} gateway", server=False)

    def worker(self, lease: str) -> tuple[Path, Path]:
        ca = self.ensure_ca()
        crt, key = worker_files(lease)
        return self._leaf(self.dir / crt, self.dir / key, ca, common_name=worker_server_name(self.stack, lease),
                          server=True, dns=(worker_server_name(self.stack, lease),), ips=(self.host,))

    def client_context(self, server_name: str | None = None) -> ssl.SSLContext:
        """For the operator's tools (health waits, drains, tests): the gateway's client identity."""
        cert, key = self.client()
        return client_context(self.ca, cert, key, server_name)
