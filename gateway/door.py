"""The door: what a client may cost the gateway before it has been admitted.

A request costs memory and a socket from its first byte, long before its body is parsed and
its limits are checked. An attacker (or a broken client) who holds many connections open, sends
huge or endless headers, or dribbles a body, would otherwise starve every other tenant. So:

- *Headers* (``GuardedHttpTools``, uvicorn's httptools protocol with limits): at most
  ``max_header_bytes`` bytes and ``max_headers`` fields in a request head, answered 431; the
  whole head within ``header_timeout_s`` of the connection opening (or of the previous response
  on a kept-alive connection), else 408. Both close the connection. A silent connection holds a
  socket for header_timeout_s at most; the head's bytes are counted as they arrive, so a
  64 MiB header block is refused after max_header_bytes, not buffered.
- *Bodies* (Admission.read_body): the body within ``body_timeout_s`` of the head, else 408; by
  then the key is known, so the 408 is metered against its tenant.
- *Concurrency per tenant and per key* (``InFlight``): counted from authentication, before the
  body is read, against the tier's ``max_concurrent_requests`` and
  ``key_max_concurrent_requests``; above them the request gets a 429 that names the tenant's
  own limit. A tenant holding slow requests exhausts its own allowance, never another's: the
  gateway-wide shedding (Admission.shed) counts only requests that were admitted.
- *Failures per client address* (``FailureLimiter``): requests that fail authentication or name
  a model that does not exist are counted per address; above ``failures_per_minute`` the
  address gets 429 before any work. Behind a proxy listed in ``trusted_proxies``, the address
  is the last one in X-Forwarded-For that the proxy appended.

Limits are per gateway process (replicas each hold their own); their values are in the stack
file (gateway: and tiers:), documented in fleet/spec.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import ApiError

if TYPE_CHECKING:
    from fleet.spec import Gateway as GatewaySpec
    from fleet.spec import Tier
    from gateway.keys import Principal

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
LINGER_S = 2.0                  # after a refusal: read and drop what the client still sends, this long ...
LINGER_BYTES = 16 << 20         # ... or this much
DRAIN_IDLE_S = 1.0              # at SIGTERM, an idle kept-alive connection stays open this long for a request


class _Refuse(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on the request head (see the module's text).
    ``protocol_class(spec.gateway)`` makes the class with a stack's limits."""

    max_header_bytes = 64 * 1024
    max_headers = 100
    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._discarded = 0
        self._drain_timer: asyncio.TimerHandle | None = None
        self._await_head()
        if getattr(self.server_state, "draining", False):    # accepted in the listener's last burst
            self.shutdown()

    # ---- graceful shutdown (SIGTERM) --------------------------------------------------------
    # uvicorn closes an idle kept-alive connection at once when it starts to drain; a request the
    # client sent on it a moment before is then lost (the client reads a reset, no answer). Here
    # an idle connection stays open for DRAIN_IDLE_S: a request that arrives is served with
    # ``Connection: close`` (the client's next request opens a new connection, to a live replica),
    # and the connection closes if none comes. A request in progress ends with Connection: close.
    def shutdown(self) -> None:
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            if self._drain_timer is None and self.transport is not None and not self.transport.is_closing():
                self._drain_timer = self.loop.call_later(DRAIN_IDLE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        self._drain_timer = None
        if (self.cycle is None or self.cycle.response_complete) and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.close()

    def _await_head(self) -> None:
        """A request head is due: count its bytes, and start its deadline."""
        self._in_head = True
        self._head_bytes = 0
        self._head_fields = 0
        self._tail = b""
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the head counted as it arrives and our refusals answered."""
        if self._lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._close_now()
            return
        if self._in_head:
            end = (self._tail + data).find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end - len(self._tail))
            self._tail = data[-3:]
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"The request headers are larger than {self.max_header_bytes} bytes.",
                             "headers_too_large")
                return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Refuse):       # raised by on_header below
                r = e.__context__
                self._refuse(r.status, r.message, r.code)
            else:
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.max_headers:
            raise _Refuse(431, f"The request has more than {self.max_headers} header fields.", "too_many_headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if getattr(self, "_draining", False) and self.cycle is not None:
            self.cycle.keep_alive = False        # served, then closed: Connection: close

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport is not None and not self.transport.is_closing():
            self._await_head()           # the next request's head on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and self.transport is not None and not self.transport.is_closing():
            if self._head_bytes == 0 and self.cycle is not None:
                self.transport.close()   # idle after a response: uvicorn's keep-alive end, no answer owed
                return
            self._refuse(408, f"The request headers did not arrive within {self.header_timeout_s:g} s.",
                         "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer in OpenAI's error shape and close. The close lingers (as nginx's
        lingering_close): our side is shut for writing and what the client still sends is read
        and dropped for up to LINGER_S or LINGER_BYTES, so the answer is not lost to the reset
        that closing on unread data would send."""
        body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": code}})
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)))
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._in_head = False
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(head + body)
            if t.can_write_eof():
                t.write_eof()
                self._lingering = True
                self.loop.call_later(LINGER_S, self._close_now)
            else:
                t.close()

    def _close_now(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def protocol_class(g: GatewaySpec) -> type[GuardedHttpTools]:
    """GuardedHttpTools with a stack's limits (uvicorn.Config(http=...) takes a class)."""
    return type("GuardedHttpTools", (GuardedHttpTools,), {
        "max_header_bytes": g.max_header_bytes, "max_headers": g.max_headers,
        "header_timeout_s": g.header_timeout_s})


class InFlight:
    """Requests in flight per tenant and per key, from authentication to the end of the answer."""

    def __init__(self) -> None:
        self.tenants: dict[str, int] = {}
        self.keys: dict[str, int] = {}

    def enter(self, p: Principal, tier: Tier) -> None:
        """Count one more request of this key, or refuse it (429 naming the tenant's own limit)."""
        t, k = self.tenants.get(p.tenant, 0), self.keys.get(p.key_id, 0)
        if t >= tier.max_concurrent_requests:
            raise ApiError(429, f"Too many concurrent requests: your plan allows {tier.max_concurrent_requests} "
                                f"in flight for your organization. Wait for some to finish.",
                           code="concurrent_requests_exceeded", headers={"retry-after": "1"})
        if tier.key_max_concurrent_requests and k >= tier.key_max_concurrent_requests:
            raise ApiError(429, f"Too many concurrent requests: your plan allows "
                                f"{tier.key_max_concurrent_requests} in flight per API key. Wait for some to finish.",
                           code="concurrent_requests_exceeded", headers={"retry-after": "1"})
        self.tenants[p.tenant] = t + 1
        self.keys[p.key_id] = k + 1

    def leave(self, p: Principal) -> None:
        for counts, name in ((self.tenants, p.tenant), (self.keys, p.key_id)):
            n = counts.get(name, 0) - 1
            if n > 0:
                counts[name] = n
            else:
                counts.pop(name, None)


class FailureLimiter:
    """Failed requests (bad key, unknown model) per client address, as token buckets of
    ``per_minute`` that refill continuously; at most ``max_addresses`` remembered (oldest out)."""

    def __init__(self, per_minute: int, trusted_proxies: list[str], max_addresses: int = 65536) -> None:
        self.per_minute = per_minute
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # address -> (level, stamp)

    def address(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address: the peer, or behind a trusted proxy the address it forwarded."""
        if not self.trusted or not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop[:64]
        return peer

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def _level(self, addr: str, now: float) -> float:
        level, stamp = self._buckets.get(addr, (float(self.per_minute), now))
        return min(float(self.per_minute), level + (now - stamp) * self.per_minute / 60.0)

    def blocked(self, addr: str) -> bool:
        return addr in self._buckets and self._level(addr, time.monotonic()) < 1.0

    def failed(self, addr: str) -> None:
        now = time.monotonic()
        self._buckets[addr] = (max(0.0, self._level(addr, now) - 1.0), now)
        self._buckets.move_to_end(addr)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def refusal(self) -> ApiError:
        return ApiError(429, "Too many failed requests from your address. Check your API key and model name, "
                             "then retry in a minute.", code="too_many_failed_requests", headers={"retry-after": "60"})
