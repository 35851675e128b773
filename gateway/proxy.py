"""The upstream call: pick an endpoint, call it, retry before the first byte, relay, meter.

A request that has not sent a byte to the client may be retried on another endpoint (and
another pool) within its deadline. Once a stream has started it is never retried: if the
upstream breaks, the client gets an OpenAI-style error event and the stream ends cleanly.
Streams are relayed as events arrive; only events that mention ``usage`` are parsed (to
meter), everything else passes through as bytes. Events that arrived together (one upstream
read) leave together (one write to the client): a gateway that falls behind catches up with
fewer, larger writes instead of one write per event.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import orjson

from gateway.errors import ApiError, stream_error_event
from gateway.ledger import UsageRecord
from gateway.router import Endpoint
from gateway.wire import Reply

if TYPE_CHECKING:
    from gateway.admission import Admitted
    from gateway.app import Gateway

MAX_ATTEMPTS = 4
DRAIN_S = 0.25                 # at most this long for a stream's body to end after its [DONE] (the client has it)
DONE = b"data: [DONE]\n\n"


class UpstreamFailure(Exception):
    """A failure before the first byte reached the client: worth another endpoint."""

    def __init__(self, error_class: str) -> None:
        super().__init__(error_class)
        self.error_class = error_class      # connect | timeout | reset | status_5xx | status_429


@dataclass(slots=True)
class Call:
    """One request's journey, for the ledger and the metrics."""

    gw: Gateway
    adm: Admitted
    route: str                  # "chat" | "completions"
    request_id: str
    started: float
    rec: UsageRecord
    headers: dict[str, str]
    streaming: bool = False     # the response outlives handle(): the relay ends the request

    # ---- the public entry ------------------------------------------------------------------
    async def run(self) -> Reply:
        gw, adm = self.gw, self.adm
        tier = adm.tier
        deadline = self.started + tier.timeouts.total_s
        model = adm.model
        exclude: set[Endpoint] = set()
        last_class = ""
        attempts = 0
        while True:
            ep = gw.router.pick(model, exclude, adm.affinity)
            if ep is None:
                fallback = gw.router.models[model].fallback
                if (not self.rec.fallback and fallback and tier.allow_fallback and gw.router.has_model(fallback)):
                    model = fallback
                    self.rec.fallback = True
                    self.headers["x-infermesh-fallback"] = fallback
                    gw.metrics.fallbacks.labels(adm.model, fallback, tier.name).inc()
                    exclude = set()
                    continue
                ep = gw.router.pick_panic(model, exclude) if not attempts else None
                if ep is None:
                    raise self._exhausted(last_class)
            if attempts >= MAX_ATTEMPTS or time.perf_counter() >= deadline:
                raise self._exhausted(last_class or "timeout")
            if attempts:
                self.rec.retries += 1
                gw.metrics.retries.labels(adm.model).inc()
            attempts += 1
            self.rec.served_model = model
            self._at(ep)
            adm.payload["model"] = ep.pool.send_model
            try:
                return await self._attempt(ep, deadline)
            except UpstreamFailure as f:
                last_class = f.error_class
                exclude.add(ep)
                gw.router.failure(ep)
                pool = ep.pool
                gw.attempts.failed(pool.name, f.error_class)     # per-pool SLIs (gateway/sli.py)
                gw.metrics.upstream_errors.labels(pool.model, pool.name, pool.provider, pool.region,
                                                  f.error_class).inc()

    def _at(self, ep: Endpoint) -> None:
        self.rec.pool, self.rec.provider, self.rec.region = ep.pool.name, ep.pool.provider, ep.pool.region

    def _exhausted(self, error_class: str) -> ApiError:
        retry = {"retry-after": "5"}
        if not error_class or error_class == "connect":
            # nothing to route to, or nothing that was tried took the connection: no capacity
            return ApiError(503, "The model has no healthy capacity right now. Please retry shortly.",
                            code="no_capacity", headers=retry)
        if error_class == "timeout":
            return ApiError(504, "The model did not answer in time.", code="upstream_timeout", headers=retry)
        return ApiError(502, "The model failed to answer. Please retry.", code="upstream_error", headers=retry)

    # ---- one endpoint ------------------------------------------------------------------------
    async def _attempt(self, ep: Endpoint, deadline: float) -> Reply:
        gw, adm = self.gw, self.adm
        to = adm.tier.timeouts
        left = max(0.05, deadline - time.perf_counter())
        body = orjson.dumps(adm.payload)
        url = ep.routes[self.route]
        ep.outstanding += 1
        released = False
        resp = None
        sent = time.perf_counter()
        try:
            try:
                # The whole attempt runs under this one deadline (a non-stream body is read inside
                # it, too): aiohttp gets no total timer of its own, and idle gaps in a stream are
                # policed by Gateway._idle_loop, not by a timer per chunk.
                timeout = _connect_timeout(to.connect_s)
                async with asyncio.timeout(min(left, to.ttft_s) if adm.stream else left) as expiry:
                    if adm.stream:
                        resp = await gw.session.post(url, data=body, headers=ep.headers, timeout=timeout)
                    else:
                        # the answer arrives whole, after the generation: the wait follows the
                        # worker's health (Endpoint.abandon_waiting expires it)
                        ep.waiting_calls.add(expiry)
                        try:
                            resp = await gw.session.post(url, data=body, headers=ep.headers, timeout=timeout)
                        finally:
                            ep.waiting_calls.discard(expiry)
                    if resp.status >= 500 or resp.status == 429:
                        resp.release()
                        raise UpstreamFailure("status_429" if resp.status == 429 else "status_5xx")
                    if resp.status >= 400:
                        return await self._client_error(ep, resp)
                    if not adm.stream:
                        return await self._whole(ep, resp)
                    events = SSEReader(resp, to.idle_s)
                    first = await events.next()
                    if first is None:
                        raise UpstreamFailure("reset")
                    ttft = time.perf_counter() - sent
                    slow = ttft if gw.router.observe_ttft(ep, ttft) else 0.0
            except TimeoutError:
                raise UpstreamFailure("timeout" if ep.healthy else "unhealthy") from None
            except aiohttp.ClientConnectorError:
                raise UpstreamFailure("connect") from None
            except (aiohttp.ClientError, ConnectionError, OSError):
                raise UpstreamFailure("reset") from None
            released = True     # the stream owns the endpoint's slot from here on
            return self._stream(ep, resp, events, first, slow)
        finally:
            if not released:
                ep.outstanding -= 1
                if resp is not None:
                    resp.close() if adm.stream else resp.release()

    async def _client_error(self, ep: Endpoint, resp: aiohttp.ClientResponse) -> Reply:
        """A 4xx from the worker (e.g. context too long): the client's fault, passed on without
        anything that names the worker."""
        raw = await resp.read()
        self.gw.router.success(ep)
        message = "The model rejected the request."
        try:
            err = orjson.loads(raw).get("error") or {}
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                message = err["message"][:1000]
        except (orjson.JSONDecodeError, AttributeError):
            pass
        status = resp.status if resp.status in (400, 404, 413, 422) else 400
        raise ApiError(400 if status == 422 else status, message, code="upstream_rejected")

    async def _whole(self, ep: Endpoint, resp: aiohttp.ClientResponse) -> Reply:
        raw = await resp.read()
        now = time.perf_counter()
        try:
            doc = orjson.loads(raw)
            usage = doc.get("usage") or {}
        except (orjson.JSONDecodeError, AttributeError):
            raise UpstreamFailure("status_5xx") from None
        self.gw.router.success(ep)
        rec = self.rec
        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        rec.completion_tokens = int(usage.get("completion_tokens") or 0)
        rec.status = 200
        rec.ttft_ms = rec.ttlt_ms = (now - self.started) * 1000
        if self.gw.debug_logging(self.adm.principal):
            self.gw.keep_debug_log(self, _completion_text(doc))
        await self.gw.finish(self)       # ledger commit before the client sees the body
        return Reply(200, self.headers, raw)

    def _stream(self, ep: Endpoint, resp: aiohttp.ClientResponse, events: SSEReader, first: bytes,
                slow: float) -> Reply:
        self.headers["cache-control"] = "no-cache"
        self.streaming = True
        return Reply(200, self.headers, stream=self._relay(ep, resp, events, first, slow))

    async def _relay(self, ep: Endpoint, resp: aiohttp.ClientResponse, events: SSEReader, first: bytes,
                     slow: float = 0.0) -> AsyncIterator[bytes]:
        """Relay a started stream. ``slow``: its TTFT (seconds) if that made it an outlier
        (router.observe_ttft). If it still is one against its peers when the stream ends, the
        endpoint gets a failure instead of a success, though the client is served."""
        gw, rec, adm = self.gw, self.rec, self.adm
        rec.ttft_ms = (time.perf_counter() - self.started) * 1000
        keep = gw.debug_logging(adm.principal)
        text: list[bytes] = [] if keep else None  # type: ignore[assignment]
        rec.status = 499                       # until the stream ends one way or another
        batch: list[bytes] | None = [first]
        gw.streams.add(events)                 # idle gaps: Gateway._idle_loop
        try:
            while batch is not None:
                out: list[bytes] = []          # what goes to the client in one write
                for event in batch:
                    if event == DONE:
                        rec.status = 200
                        rec.ttlt_ms = (time.perf_counter() - self.started) * 1000
                        if slow and gw.router.outlier(ep, slow):
                            gw.router.failure(ep)
                            pool = ep.pool
                            gw.metrics.upstream_errors.labels(pool.model, pool.name, pool.provider, pool.region,
                                                              "slow_ttft").inc()
                        else:
                            gw.router.success(ep)
                        if keep:
                            gw.keep_debug_log(self, _stream_text(text))
                        await gw.finish(self)  # ledger commit before [DONE] reaches the client
                        out.append(DONE)
                        yield b"".join(out)
                        await events.drain()   # the body's end: the connection can be reused
                        return
                    if b'"usage"' in event and _has_usage(event):
                        usage = orjson.loads(event[6:]).get("usage") or {}
                        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        rec.completion_tokens = int(usage.get("completion_tokens") or 0)
                        if adm.include_usage:
                            out.append(event)
                    elif event.startswith(b'data: {"error"'):
                        rec.status, rec.error = 502, "upstream_error_event"
                        out += (stream_error_event("The model failed while streaming.", "upstream_error"), DONE)
                        yield b"".join(out)
                        return
                    else:
                        if keep:
                            text.append(event)
                        out.append(event)
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
                batch = await events.batch()
            raise ConnectionResetError("stream ended without [DONE]")
        except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as e:
            # Started streams are never retried: end cleanly with an error event.
            timed_out = events.expired or isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower()
            rec.status, rec.error = (504, "idle_timeout") if timed_out else (502, "stream_interrupted")
            gw.router.failure(ep)
            pool = ep.pool
            gw.metrics.upstream_errors.labels(pool.model, pool.name, pool.provider, pool.region,
                                              "stream_" + ("timeout" if timed_out else "reset")).inc()
            yield stream_error_event("The model stream was interrupted. Please retry.",
                                     "upstream_timeout" if timed_out else "upstream_error")
            yield DONE
        finally:
            gw.streams.discard(events)
            ep.outstanding -= 1
            resp.release() if rec.status == 200 else resp.close()
            if rec.ttlt_ms is None:
                rec.ttlt_ms = (time.perf_counter() - self.started) * 1000
            if rec.status != 200:
                gw.finish_soon(self)           # client gone (499) or upstream broke: still one record
            gw.end_request()


class SSEReader:
    """Complete SSE events (``data: ...\n\n``) from an upstream body, read in whatever chunks
    arrive. The common chunk is exactly one event and is passed on as it came (no copy, no line
    scanning in Python); anything else is split into events, CRLF normalised, and lines other
    than ``data:`` (comments, ``event:``) dropped.

    ``last`` is when bytes last arrived: Gateway._idle_loop closes a stream quiet for longer
    than its tier's ``idle_s`` (``expired`` then tells the relay it was a timeout)."""

    __slots__ = ("resp", "content", "buf", "pending", "last", "idle_s", "expired")

    def __init__(self, resp: aiohttp.ClientResponse, idle_s: float = 0.0) -> None:
        self.resp, self.content = resp, resp.content
        self.buf = b""
        self.pending: list[bytes] = []
        self.last = time.monotonic()
        self.idle_s = idle_s
        self.expired = False

    async def drain(self, limit: int = 65536) -> None:
        """Read what is left of the body after [DONE] (normally just the chunked terminator,
        already buffered): aiohttp only puts a connection back in its pool when the body was
        read to its end; otherwise it closes it and the next stream pays for a new one."""
        content, seen = self.content, 0
        if content.at_eof():
            return
        try:
            async with asyncio.timeout(DRAIN_S):
                while seen < limit and not content.at_eof():
                    chunk = await content.readany()
                    if not chunk:
                        break
                    seen += len(chunk)
        except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError):
            pass                       # the relay's finally closes the response instead

    async def next(self) -> bytes | None:
        """The next event, or None at the end of the body."""
        if not self.pending:
            batch = await self.batch()
            if batch is None:
                return None
            self.pending = batch
        return self.pending.pop(0)

    async def batch(self) -> list[bytes] | None:
        """Every complete event that has arrived (at least one), or None at the end of the body."""
        if self.pending:
            out, self.pending = self.pending, []
            return out
        while True:
            chunk = await self.content.readany()
            if not chunk:
                return None
            self.last = time.monotonic()
            if (not self.buf and chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
                    and chunk.find(b"\n\n") == len(chunk) - 2 and b"\r" not in chunk):
                return [chunk]                 # the common case: exactly one event, passed on as it came
            buf = (self.buf + chunk).replace(b"\r\n", b"\n")
            blocks = buf.split(b"\n\n")
            self.buf = blocks.pop()            # an unfinished event waits for the rest
            out = []
            for block in blocks:
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        data = line[5:].lstrip(b" ")
                        out.append(b"data: " + data + b"\n\n")
            if out:
                return out


@functools.cache
def _connect_timeout(connect_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect_s)


def _has_usage(event: bytes) -> bool:
    return b'"usage":null' not in event and b'"usage": null' not in event


def _completion_text(doc: dict) -> str:
    parts = []
    for c in doc.get("choices") or []:
        msg = c.get("message") or {}
        parts.append(msg.get("content") or c.get("text") or "")
    return "".join(p for p in parts if isinstance(p, str))


def _stream_text(events: list[bytes]) -> str:
    out = []
    for ev in events:
        try:
            for c in orjson.loads(ev[6:]).get("choices") or []:
                piece = (c.get("delta") or {}).get("content") or c.get("text")
                if isinstance(piece, str):
                    out.append(piece)
        except (orjson.JSONDecodeError, AttributeError):
            continue
    return "".join(out)
