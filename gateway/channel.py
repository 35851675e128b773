"""The gateway's side of the channel to workers: one SSLContext per mTLS endpoint, found by address.

The routing config names, per endpoint, its channel and (for ``mtls``) its TLS material by
reference: the stack CA, the gateway's client certificate and key (file names in ``tls_dir``: a
mounted Kubernetes Secret, or the local stack's ``<state>/tls``) and the name the worker's
certificate must carry. Each endpoint gets its own ``ssl.SSLContext`` (verifying that name), built
once per distinct material and name and kept across reloads while the files are unchanged, so
pooled keep-alive connections stay valid and a reload costs no handshakes.

aiohttp takes one TLS setting per session; ``ChannelConnector`` answers per request with the
context of the endpoint at the request's address, so every caller (relay, probes, health
checks) goes through the endpoint's channel without passing anything. An https URL with no
context (an external upstream) gets the system's verified default.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp

from fleet.channel import client_context, refusal

_CONTEXTS: dict[tuple, ssl.SSLContext] = {}


class ChannelError(Exception):
    pass


def endpoint_context(entry: dict[str, Any], tls_dir: str | None) -> ssl.SSLContext:
    tls = entry.get("tls") or {}
    url = str(entry.get("url", ""))
    if not url.startswith("https://"):
        raise ChannelError(f"an mtls endpoint needs an https URL, got {url.split('://')[0]}://")
    missing = [k for k in ("ca", "cert", "key", "server_name") if not tls.get(k)]
    if missing:
        raise ChannelError(f"an mtls endpoint needs tls.{', tls.'.join(missing)}")
    base = Path(tls_dir) if tls_dir else Path(".")
    files = [base / tls[k] for k in ("ca", "cert", "key")]
    try:
        stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files)
    except OSError as e:
        raise ChannelError(f"TLS material {e.filename} is missing") from None
    key = (*stamp, tls["server_name"])
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        try:
            ctx = client_context(files[0], files[1], files[2], server_name=tls["server_name"])
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ChannelError(f"TLS material in {base} is not usable ({e})") from None
        ctx.stamp = stamp  # type: ignore[attr-defined]  # the files' mtimes it was built from: material_changed
        _CONTEXTS[key] = ctx
    return ctx


def material_changed(router: Any) -> bool:
    """Has any mTLS endpoint's TLS material changed on disk since its context was built (a renewed
    certificate, a rotated Kubernetes Secret)? Then the routing config is applied again."""
    for ctx in router.tls.values():
        stamp = getattr(ctx, "stamp", ())
        for path, mtime in stamp:
            try:
                if Path(path).stat().st_mtime_ns != mtime:
                    return True
            except OSError:
                return True
    return False


def refusal_of(exc: BaseException, channel: str) -> str | None:
    """The reason a TLS channel failed, when the failure (or its cause) is a TLS one."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, (ssl.SSLError, ssl.CertificateError)):
            return refusal(seen)
        if isinstance(seen, aiohttp.ClientConnectorCertificateError):
            return refusal(seen.certificate_error)
        if isinstance(seen, aiohttp.ClientSSLError) and getattr(seen, "os_error", None) is not None:
            return refusal(seen.os_error)
        seen = seen.__cause__ or seen.__context__
    if channel == "mtls" and isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return "tls: the worker closed the connection during or after the handshake (client certificate refused?)"
    return None


class ChannelConnector(aiohttp.TCPConnector):
    """A TCPConnector that gives each https request its endpoint's SSLContext (``router.tls``)."""

    def __init__(self, router: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self._router = router

    def _get_ssl_context(self, req: Any) -> ssl.SSLContext | None:   # aiohttp's hook (connector.py)
        if req.is_ssl():
            ctx = self._router.tls.get((req.url.host, req.url.port))
            if ctx is not None:
                return ctx
        return super()._get_ssl_context(req)

    # A connection keeps the TLS material it was made with; after a rotation (a new context for its
    # address) it is not reused: closed when released, and idle ones at forget_stale().
    def _stale(self, key: Any, protocol: Any) -> bool:
        ctx = self._router.tls.get((key.host, key.port))
        transport = getattr(protocol, "transport", None)
        used = transport.get_extra_info("sslcontext") if transport is not None else None
        return ctx is not None and used is not None and used is not ctx

    def _release(self, key: Any, protocol: Any, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close or (key.is_ssl and self._stale(key, protocol)))

    def forget_stale(self) -> int:
        """Close the idle pooled connections made with an endpoint's previous TLS material."""
        closed = 0
        for key, conns in list(getattr(self, "_conns", {}).items()):
            if not key.is_ssl:
                continue
            for item in [c for c in conns if self._stale(key, c[0])]:
                conns.remove(item)
                item[0].close()
                closed += 1
        return closed
