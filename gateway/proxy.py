"""The upstream call: pick an endpoint, call it, retry before the first byte, relay, then the meter.

A request that has not sent a byte to the client may be retried on another endpoint (and
another pool) within its deadline. Once a stream has started it is never retried: if the
upstream breaks, the client gets an OpenAI-style error event and the stream ends cleanly.
Streams are relayed as events arrive; only events that mention ``usage`` are parsed (to
meter), everything else passes through as bytes. Events that arrived together (one upstream
read) leave together (one write to the client): a gateway that falls behind catches up with
fewer, larger writes instead of one write per event.

The Responses API streams typed events (``event: response.created`` ...) and ends with
``response.completed`` instead of ``[DONE]``. Its first events (created, in_progress, the output
item and content part added) say nothing yet: they are held back until the first content event,
so a worker that fails after ``response.created`` is still retried elsewhere, and the client
sees one clean stream from the endpoint that answered.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

import aiohttp
import orjson

from gateway.admission import Admitted
from gateway.backends import UpstreamLimits
from gateway.errors import ApiError, stream_error_event
from gateway.ledger import UsageRecord
from gateway.meter import Meter
from gateway.metrics import Metrics
from gateway.router import Endpoint, Router
from gateway.sli import AttemptLog
from gateway.wire import Reply

MAX_ATTEMPTS = 4
DRAIN_S = 0.25                 # at most this long for a stream's body to end after its [DONE] (the client has it)
DONE = b"data: [DONE]\n\n"
# Responses API stream events before any content, held back (and dropped on a retry)
PREAMBLE = frozenset((b"response.created", b"response.in_progress", b"response.output_item.added",
                      b"response.content_part.added"))
RESPONSE_END = frozenset((b"response.completed", b"response.incomplete"))
RESPONSE_FAILED = frozenset((b"response.failed", b"error"))


class UpstreamFailure(Exception):
    """A failure before the first byte reached the client: worth another endpoint."""

    def __init__(self, error_class: str, detail: str = "") -> None:
        super().__init__(error_class)
        self.error_class = error_class      # connect | timeout | reset | status_5xx | status_429
        self.detail = detail                # for the operator's log only: the exception's class and errno


def _detail(e: BaseException) -> str:
    """An upstream error as one short line for the operator's log: its class and, for a socket
    error, the errno's name (never a body, a header or an address)."""
    os_error = getattr(e, "os_error", e)
    errno_ = getattr(os_error, "errno", None)
    return type(e).__name__ + (f" ({errno.errorcode.get(errno_, errno_)})" if errno_ else "")


class Upstreams:
    """What every Call shares, made once per process: the router, the HTTP session to the workers,
    the meter, the metrics, the log of failed attempts (per-pool SLIs), the upstreams' own limits
    and the started streams (Gateway._idle_loop ends those gone quiet)."""

    __slots__ = ("router", "session", "meter", "metrics", "attempts", "limits", "streams")

    def __init__(self, router: Router, meter: Meter, metrics: Metrics, attempts: AttemptLog,
                 limits: UpstreamLimits) -> None:
        self.router, self.meter, self.metrics, self.attempts, self.limits = router, meter, metrics, attempts, limits
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # set in Gateway.start()
        self.streams: set[SSEReader] = set()


@dataclass(slots=True)
class Call:
    """One admitted request's upstream call, from the pick of an endpoint to the meter."""

    up: Upstreams
    adm: Admitted
    route: str                  # "chat" | "completions" | "responses" | "embeddings"
    request_id: str
    started: float
    rec: UsageRecord
    headers: dict[str, str]
    streaming: bool = False     # the response outlives handle(): the relay ends the request
    region: str | None = None   # where the request is to be served (request_region); None: anywhere
    slot: str | None = None     # a slot of an upstream's own limits (gateway/state/upstream_limits.py)
    slot_key: str = ""

    # ---- the public entry ------------------------------------------------------------------
    async def run(self) -> Reply:
        up, adm = self.up, self.adm
        tier = adm.tier
        deadline = self.started + tier.timeouts.total_s
        model = adm.model
        exclude: set[Endpoint] = set()
        last_class = ""
        attempts = 0
        refused = 0                     # attempts whose connection was refused: they cost nothing, so they
                                        # do not count against MAX_ATTEMPTS (a dead region's workers, say)
        while True:
            ep = up.router.pick(model, exclude, adm.affinity, self.region)
            if ep is None:       # before another model: this one's ejected endpoints that checks call healthy
                ep = up.router.pick_ejected(model, exclude, self.region)
            if ep is None:
                fallback = up.router.models[model].fallback
                if (not self.rec.fallback and fallback and tier.allow_fallback and up.router.has_model(fallback)):
                    model = fallback
                    self.rec.fallback = True
                    self.headers["x-infermesh-fallback"] = fallback
                    up.metrics.fallbacks.labels(adm.model, fallback, tier.name).inc()
                    exclude = set()
                    continue
                ep = up.router.pick_panic(model, exclude) if not attempts else None
                if ep is None:
                    raise self._exhausted(last_class)
            if attempts - refused >= MAX_ATTEMPTS or time.perf_counter() >= deadline:
                raise self._exhausted(last_class or "timeout")
            if ep.limits is not None:
                key, most, rpm = ep.limits
                self.slot, self.slot_key = await up.limits.take(key, most, rpm), key
                if self.slot is None:          # the upstream's own limit is reached: another endpoint serves
                    exclude.add(ep)
                    continue
            if attempts:
                self.rec.retries += 1
                up.metrics.retries.labels(adm.model).inc()
            attempts += 1
            self.rec.served_model = model
            self._at(ep)
            if attempts == 1:                   # the gateway's own wait, before any worker saw the request
                pool = ep.pool
                up.metrics.queue.labels(pool.model, pool.name, pool.provider, pool.region).observe(
                    time.perf_counter() - self.started)
            adm.payload["model"] = ep.pool.send_model
            try:
                return await self._attempt(ep, deadline)
            except UpstreamFailure as f:
                last_class = f.error_class
                refused += f.error_class == "connect"
                exclude.add(ep)
                # a missed deadline counts at once (a black hole is out before the next request waits on it)
                up.router.failure(ep, at_once=f.error_class == "connect" or (f.error_class == "timeout" and adm.stream),
                                  cause=f"{f.error_class}: {f.detail}" if f.detail else f.error_class)
                pool = ep.pool
                up.attempts.failed(pool.name, f.error_class)     # per-pool SLIs (gateway/sli.py)
                up.metrics.upstream_errors.labels(pool.model, pool.name, pool.provider, pool.region,
                                                  f.error_class).inc()

    def _at(self, ep: Endpoint) -> None:
        self.rec.pool, self.rec.provider, self.rec.region = ep.pool.name, ep.pool.provider, ep.pool.region
        if self.region is not None:
            self.headers["x-infermesh-region"] = ep.pool.region
            if ep.pool.region != self.region:           # served away from its region: marked
                self.headers["x-infermesh-region-failover"] = self.region
            else:
                self.headers.pop("x-infermesh-region-failover", None)

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
        up, adm = self.up, self.adm
        to = adm.tier.timeouts
        left = max(0.05, deadline - time.perf_counter())
        body = orjson.dumps(adm.payload)
        url = ep.routes[self.route]
        ep.outstanding += 1
        released = False
        resp = None
        waits = expiry = None
        sent = time.perf_counter()
        try:
            try:
                # The whole attempt runs under this one deadline (a non-stream body is read inside
                # it, too): aiohttp gets no total timer of its own, and idle gaps in a stream are
                # policed by Gateway._idle_loop, not by a timer per chunk.
                timeout = _connect_timeout(to.connect_s)
                async with asyncio.timeout(min(left, to.ttft_s) if adm.stream else left) as expiry:
                    if adm.stream:
                        # until its first content event: an endpoint found lost expires it (router.Endpoint.lost)
                        waits = ep.stream_waits
                        waits.add(expiry)
                        resp = await up.session.post(url, data=body, headers=ep.headers, timeout=timeout)
                    else:
                        # the answer arrives whole, after the generation: the wait follows the
                        # worker's health (Endpoint.abandon_waiting expires it)
                        ep.waiting_calls.add(expiry)
                        try:
                            resp = await up.session.post(url, data=body, headers=ep.headers, timeout=timeout)
                        finally:
                            ep.waiting_calls.discard(expiry)
                    if ep.external and resp.status in (401, 403, 429):
                        await self._upstream_refusal(ep, resp)
                    if resp.status >= 500 or resp.status == 429:
                        resp.release()
                        raise UpstreamFailure("status_429" if resp.status == 429 else "status_5xx")
                    if resp.status >= 400:
                        return await self._client_error(ep, resp)
                    if not adm.stream:
                        return await self._whole(ep, resp)
                    responses = self.route == "responses"
                    events = SSEReader(resp, to.idle_s, keep_event=responses)
                    head: list[bytes] = []           # the events before content (Responses API), then the first
                    first = await events.next()
                    while responses and first is not None and event_type(first) in PREAMBLE:
                        head.append(first)
                        first = await events.next()      # held back until content arrives
                    if first is None:
                        raise UpstreamFailure("reset")
                    head.append(first)
                    if responses and event_type(first) in RESPONSE_FAILED:
                        raise UpstreamFailure("status_5xx")   # failed before any output: worth a retry
                    ttft = time.perf_counter() - sent
                    slow = ttft if up.router.observe_ttft(ep, ttft) else 0.0
                    ep.stream_waits.discard(expiry)
            except TimeoutError:
                raise UpstreamFailure("timeout" if ep.available(time.monotonic()) else "unhealthy") from None
            except aiohttp.ClientConnectorError as e:
                raise UpstreamFailure("connect", _detail(e)) from None
            except (aiohttp.ClientError, ConnectionError, OSError) as e:
                raise UpstreamFailure("reset", _detail(e)) from None
            released = True     # the stream owns the endpoint's slot from here on
            return self._stream(ep, resp, events, head, slow)
        finally:
            if waits is not None:
                waits.discard(expiry)
            if not released:
                self._give_slot()
                ep.outstanding -= 1
                if resp is not None:
                    resp.close() if adm.stream else resp.release()

    def _give_slot(self) -> None:
        if self.slot is not None:
            self.up.limits.give_back(self.slot_key, self.slot)
            self.slot = None

    async def _upstream_refusal(self, ep: Endpoint, resp: aiohttp.ClientResponse) -> None:
        """An external upstream refusing our key (401, 403) or out of quota (429 insufficient_quota):
        no retry there (it is out for a while: Router.disable); the request tries elsewhere. A plain
        429 (its rate limit) stays an ordinary, retried failure."""
        raw = await resp.read()
        if resp.status == 429 and b"insufficient_quota" not in raw:
            return
        reason = "upstream: insufficient_quota" if resp.status == 429 else f"upstream: key refused ({resp.status})"
        self.up.router.disable(ep, reason)
        raise UpstreamFailure("upstream_quota" if resp.status == 429 else "upstream_auth")

    async def _client_error(self, ep: Endpoint, resp: aiohttp.ClientResponse) -> Reply:
        """A 4xx from the worker (e.g. context too long): the client's fault, passed on without
        anything that names the worker."""
        raw = await resp.read()
        self.up.router.success(ep)
        message, param = "The model rejected the request.", None
        try:
            err = orjson.loads(raw).get("error") or {}
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                message = err["message"][:1000]
            if isinstance(err, dict) and isinstance(err.get("param"), str):
                param = err["param"][:200]
        except (orjson.JSONDecodeError, AttributeError):
            pass
        status = resp.status if resp.status in (400, 404, 413, 422) else 400
        raise ApiError(400 if status == 422 else status, message, code="upstream_rejected", param=param)

    async def _whole(self, ep: Endpoint, resp: aiohttp.ClientResponse) -> Reply:
        raw = await resp.read()
        now = time.perf_counter()
        try:
            doc = orjson.loads(raw)
            usage = doc.get("usage") or {}
        except (orjson.JSONDecodeError, AttributeError):
            raise UpstreamFailure("status_5xx") from None
        up, rec = self.up, self.rec
        up.router.success(ep)
        meter_usage(rec, usage)
        rec.status = 200
        rec.ttlt_ms = (now - self.started) * 1000    # a whole answer has no first token (gateway/sla.py)
        meter = up.meter
        if meter.debug_logging(self.adm.principal):
            meter.keep_debug_log(self.adm, rec, _completion_text(doc))
        await meter.finish(self.adm, rec)       # ledger commit before the client sees the body
        return Reply(200, self.headers, raw)

    def _stream(self, ep: Endpoint, resp: aiohttp.ClientResponse, events: SSEReader, head: list[bytes],
                slow: float) -> Reply:
        self.headers["cache-control"] = "no-cache"
        self.streaming = True
        relay = self._relay_responses if self.route == "responses" else self._relay
        return Reply(200, self.headers, stream=relay(ep, resp, events, head, slow))

    async def _completed(self, ep: Endpoint, slow: float, text: str | None) -> None:
        """A stream that ended well: the endpoint's health, the debug log, the ledger row
        (committed before the stream's last event reaches the client)."""
        up, rec = self.up, self.rec
        rec.status = 200
        rec.ttlt_ms = (time.perf_counter() - self.started) * 1000
        if slow and up.router.outlier(ep, slow):
            up.router.failure(ep, cause="slow_ttft")
            pool = ep.pool
            up.metrics.upstream_errors.labels(pool.model, pool.name, pool.provider, pool.region, "slow_ttft").inc()
        else:
            up.router.success(ep)
        if text is not None:
            up.meter.keep_debug_log(self.adm, rec, text)
        await up.meter.finish(self.adm, rec)

    def _broken(self, ep: Endpoint, events: SSEReader, e: BaseException) -> tuple[str, str]:
        """A started stream that broke (it is never retried): meter it; (message, code) for the
        error event that ends the client's stream."""
        up, rec = self.up, self.rec
        timed_out = events.expired or isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower()
        rec.status, rec.error = (504, "idle_timeout") if timed_out else (502, "stream_interrupted")
        up.router.failure(ep, at_once=timed_out,       # a missed inter-token deadline counts at once
                          cause="stream_" + ("timeout" if timed_out else "reset"))
        pool = ep.pool
        up.metrics.upstream_errors.labels(pool.model, pool.name, pool.provider, pool.region,
                                          "stream_" + ("timeout" if timed_out else "reset")).inc()
        return "The model stream was interrupted. Please retry.", "upstream_timeout" if timed_out else "upstream_error"

    def _error_event(self, ep: Endpoint) -> None:
        """A started stream the worker ended with an error event: an attempt that failed after its
        first byte, counted as such (the canary's per-pool SLIs read it: fleet/canary.py)."""
        pool = ep.pool
        self.up.metrics.upstream_errors.labels(pool.model, pool.name, pool.provider, pool.region,
                                               "stream_error_event").inc()

    def _closed(self, ep: Endpoint, resp: aiohttp.ClientResponse, events: SSEReader) -> None:
        """Every stream's end, however it ended."""
        up, rec = self.up, self.rec
        up.streams.discard(events)
        ep.streams.discard(events)
        self._give_slot()
        ep.outstanding -= 1
        resp.release() if rec.status == 200 else resp.close()
        if rec.ttlt_ms is None:
            rec.ttlt_ms = (time.perf_counter() - self.started) * 1000
        if rec.status != 200:
            up.meter.finish_soon(self.adm, rec)           # client gone (499) or upstream broke: still one record
        up.meter.end(self.adm.held)

    async def _relay(self, ep: Endpoint, resp: aiohttp.ClientResponse, events: SSEReader, head: list[bytes],
                     slow: float = 0.0) -> AsyncGenerator[bytes, None]:
        """Relay a started stream. ``slow``: its TTFT (seconds) if that made it an outlier
        (router.observe_ttft). If it still is one against its peers when the stream ends, the
        endpoint gets a failure instead of a success, though the client is served."""
        up, rec, adm = self.up, self.rec, self.adm
        rec.ttft_ms = (time.perf_counter() - self.started) * 1000
        keep = up.meter.debug_logging(adm.principal)
        text: list[bytes] = [] if keep else None  # type: ignore[assignment]
        rec.status = 499                       # until the stream ends one way or another
        batch: list[bytes] | None = head
        up.streams.add(events)                 # idle gaps: Gateway._idle_loop
        ep.streams.add(events)                 # ended at once if the endpoint is lost (router.Endpoint.lost)
        # stream_resume (opt-in per tier): what the client got, to continue from it elsewhere if the worker dies
        resume = Resume() if adm.tier.stream_resume and self.route == "chat" and (adm.payload.get("n") or 1) == 1 \
            else None
        try:
            while batch is not None:
                out: list[bytes] = []          # what goes to the client in one write
                for event in batch:
                    if resume is not None and event != DONE:
                        resume.saw(event)
                    if event == DONE:
                        await self._completed(ep, slow, _stream_text(text) if keep else None)
                        out.append(DONE)       # the ledger row is committed: [DONE] may go
                        yield b"".join(out)
                        await events.drain()   # the body's end: the connection can be reused
                        return
                    if b'"usage"' in event and _has_usage(event):
                        meter_usage(rec, orjson.loads(event[6:]).get("usage") or {})
                        if adm.include_usage:
                            out.append(event)
                    elif event.startswith(b'data: {"error"'):
                        rec.status, rec.error = 502, "upstream_error_event"
                        self._error_event(ep)
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
            failure = self._broken(ep, events, e)
            if resume is not None and resume.ok and resume.tokens:
                resp.close()                   # the broken stream's connection is not reused
                async for piece in self._resume(ep, resume):     # continued elsewhere: one stream, one [DONE]
                    yield piece
                if resume.done:
                    return
            if not (resume is not None and resume.done):
                # not resumable (or the resumption failed too): end cleanly with an error event
                yield stream_error_event(*failure)
                yield DONE
        finally:
            self._closed(ep, resp, events)

    async def _resume(self, broken: Endpoint, resume: Resume) -> AsyncGenerator[bytes, None]:
        """Continue a chat stream whose worker died after its first content event, on another endpoint:
        the text the client got is the assistant's prefix (vLLM: ``continue_final_message``,
        ``add_generation_prompt: false``), so the new worker writes the rest. Its chunks go out under
        the stream's own id; its usage is rebilled as the one request (the prefix is the client's
        completion, not its prompt). Sets ``resume.done`` when the stream ended with [DONE]."""
        up, adm, rec = self.up, self.adm, self.rec
        ep = up.router.pick(rec.served_model or adm.model, {broken}, None, self.region)
        if ep is None or ep.external:          # an external upstream knows no continue_final_message
            return
        left = adm.max_output - resume.tokens if adm.max_output else None
        if left is not None and left < 1:
            return
        payload = dict(adm.payload, model=ep.pool.send_model, stream=True,
                       messages=[*adm.payload["messages"], {"role": "assistant", "content": resume.text()}],
                       continue_final_message=True, add_generation_prompt=False,
                       stream_options={"include_usage": True})
        for field in ("max_tokens", "max_completion_tokens"):
            if field in payload and left is not None:
                payload[field] = left
        to = adm.tier.timeouts
        ep.outstanding += 1
        resp = events = None
        rec.retries += 1
        up.metrics.retries.labels(adm.model).inc()
        try:
            async with asyncio.timeout(to.ttft_s):
                resp = await up.session.post(ep.routes["chat"], data=orjson.dumps(payload), headers=ep.headers,
                                             timeout=_connect_timeout(to.connect_s))
                if resp.status != 200:
                    return
                events = SSEReader(resp, to.idle_s)
                batch = await events.batch()
            up.streams.add(events)
            ep.streams.add(events)
            self._at(ep)
            while batch is not None:
                out: list[bytes] = []
                for event in batch:
                    if event == DONE:
                        rec.error = None
                        await self._completed(ep, 0.0, None)
                        out.append(DONE)
                        resume.done = True
                        yield b"".join(out)
                        await events.drain()
                        return
                    if b'"usage"' in event and _has_usage(event):
                        u = orjson.loads(event[6:]).get("usage") or {}
                        # one request: the prefix was the client's completion, so bill it once, as such
                        prompt = max(0, _count(u.get("prompt_tokens")) - resume.tokens)
                        billed = {"prompt_tokens": prompt, "completion_tokens": resume.tokens
                                  + _count(u.get("completion_tokens")),
                                  "total_tokens": prompt + resume.tokens + _count(u.get("completion_tokens"))}
                        meter_usage(rec, billed)
                        if adm.include_usage:
                            out.append(resume.own_id(b'data: {"id":"x","object":"chat.completion.chunk","choices":[],'
                                                     b'"usage":' + orjson.dumps(billed) + b"}\n\n"))
                    elif event.startswith(b'data: {"error"'):
                        return
                    elif not resume.role_only(event):
                        out.append(resume.own_id(event))
                if out:
                    yield b"".join(out)
                batch = await events.batch()
        except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as e:
            up.router.failure(ep, cause="stream_" + type(e).__name__)
        finally:
            if events is not None:
                up.streams.discard(events)
                ep.streams.discard(events)
            ep.outstanding -= 1
            if resp is not None:
                resp.release() if resume.done else resp.close()

    async def _relay_responses(self, ep: Endpoint, resp: aiohttp.ClientResponse, events: SSEReader,
                               head: list[bytes], slow: float = 0.0) -> AsyncGenerator[bytes, None]:
        """Relay a started Responses API stream: typed events pass through as they came; usage
        is read from ``response.completed`` (or ``response.incomplete``), whose ledger row is
        committed before that last event leaves. A worker's ``response.failed`` or ``error``,
        or a body that ends or breaks before the end, ends the client's stream with one
        ``error`` event of our own (OpenAI's ResponseErrorEvent; nothing names the worker)."""
        up, rec, adm = self.up, self.rec, self.adm
        rec.ttft_ms = (time.perf_counter() - self.started) * 1000
        keep = up.meter.debug_logging(adm.principal)
        text: list[bytes] = []
        rec.status = 499
        batch: list[bytes] | None = head
        last = head[-1]
        up.streams.add(events)
        ep.streams.add(events)
        try:
            while batch is not None:
                out: list[bytes] = []
                for event in batch:
                    kind = event_type(event)
                    if kind in RESPONSE_END:
                        meter_usage(rec, (_data(event).get("response") or {}).get("usage") or {})
                        await self._completed(ep, slow, _response_stream_text(text) if keep else None)
                        out.append(event)
                        yield b"".join(out)
                        await events.drain()
                        return
                    if kind in RESPONSE_FAILED:
                        rec.status, rec.error = 502, "upstream_error_event"
                        self._error_event(ep)
                        out.append(response_error_event("The model failed while streaming.", "upstream_error",
                                                        last))
                        yield b"".join(out)
                        return
                    if keep and kind == b"response.output_text.delta":
                        text.append(event)
                    out.append(event)
                    last = event
                if out:
                    yield b"".join(out)
                batch = await events.batch()
            raise ConnectionResetError("stream ended without response.completed")
        except (aiohttp.ClientError, ConnectionError, OSError, TimeoutError) as e:
            message, code = self._broken(ep, events, e)
            yield response_error_event(message, code, last)
        finally:
            self._closed(ep, resp, events)


class Resume:
    """What a resumable chat stream delivered: its id, the content text and its token count (one per
    content chunk, as vLLM and the sim stream them); ``ok`` is False once the stream carried
    anything a text prefix cannot continue (tool-call deltas, several choices)."""

    __slots__ = ("id", "parts", "tokens", "ok", "done")

    def __init__(self) -> None:
        self.id: bytes | None = None
        self.parts: list[str] = []
        self.tokens = 0
        self.ok = True
        self.done = False

    def saw(self, event: bytes) -> None:
        try:
            doc = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            return
        if self.id is None and isinstance(doc.get("id"), str):
            self.id = doc["id"].encode()
        for c in doc.get("choices") or []:
            delta = c.get("delta") or {}
            if delta.get("tool_calls") or c.get("index", 0):
                self.ok = False
            piece = delta.get("content")
            if isinstance(piece, str) and piece:
                self.parts.append(piece)
                self.tokens += 1

    def text(self) -> str:
        return "".join(self.parts)

    @staticmethod
    def role_only(event: bytes) -> bool:
        """The new stream's opening chunk (the role, no content): the client had it already."""
        return b'"role":"assistant"' in event and b'"content":""' in event

    def own_id(self, event: bytes) -> bytes:
        """A chunk of the continuation under the stream's own id."""
        if self.id is None or not event.startswith(b'data: {"id":"'):
            return event
        end = event.find(b'"', 13)
        return event[:13] + self.id + event[end:] if end > 0 else event


class SSEReader:
    """Complete SSE events (``data: ...\n\n``) from an upstream body, read in whatever chunks
    arrive. The common chunk is exactly one event and is passed on as it came (no copy, no line
    scanning in Python); anything else is split into events, CRLF normalised, and lines other
    than ``data:`` (comments, ``event:``) dropped.

    ``last`` is when bytes last arrived: Gateway._idle_loop closes a stream quiet for longer
    than its tier's ``idle_s`` (``expired`` then tells the relay it was a timeout)."""

    __slots__ = ("resp", "content", "buf", "pending", "last", "idle_s", "expired", "keep_event")

    def __init__(self, resp: aiohttp.ClientResponse, idle_s: float = 0.0, keep_event: bool = False) -> None:
        self.resp, self.content = resp, resp.content
        self.buf = b""
        self.pending: list[bytes] = []
        self.last = time.monotonic()
        self.idle_s = idle_s
        self.expired = False
        self.keep_event = keep_event   # the Responses API: events keep their `event:` line

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
                if self.keep_event:
                    if b"data:" in block:
                        out.append(block + b"\n\n")
                    continue
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        data = line[5:].lstrip(b" ")
                        out.append(b"data: " + data + b"\n\n")
            if out:
                return out


def request_region(router: Router, headers: Mapping[str, str], key_region: str | None = None) -> str | None:
    """The region a request is served in: its x-infermesh-region header when it names a region
    the routing serves, else its key's region (``keys create --region``) when the routing serves
    it, else the gateway's own (None: anywhere)."""
    for asked in (headers.get("x-infermesh-region"), key_region):
        if asked is not None and asked in router.regions:
            return asked
    return router.home_region


@functools.cache
def _connect_timeout(connect_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect_s)


def event_type(event: bytes) -> bytes:
    """A Responses API event's type: its `event:` line, else the `type` in its data."""
    if event.startswith(b"event:"):
        return event[6:event.find(b"\n")].strip()
    t = _data(event).get("type")
    return t.encode() if isinstance(t, str) else b""


def _data(event: bytes) -> dict:
    """The JSON of an event's `data:` line ({} when it has none or it is not an object)."""
    at = event.find(b"data:")
    try:
        doc = orjson.loads(event[at + 5:]) if at >= 0 else None
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def response_error_event(message: str, code: str, last: bytes | None) -> bytes:
    """The event that ends a broken Responses API stream (OpenAI's ResponseErrorEvent), numbered
    after the last event the client got."""
    seq = _data(last).get("sequence_number") if last else None
    seq = seq + 1 if isinstance(seq, int) and not isinstance(seq, bool) else 0
    data = orjson.dumps({"type": "error", "code": code, "message": message, "param": None, "sequence_number": seq})
    return b"event: error\ndata: " + data + b"\n\n"


def meter_usage(rec: UsageRecord, usage: dict) -> None:
    """Token counts from an upstream's `usage` into the ledger's classes: chat and completions
    name them prompt/completion tokens, the Responses API input/output tokens; cached input
    (`*_tokens_details.cached_tokens`) is its own class, taken out of the uncached count."""
    if not isinstance(usage, dict):
        return
    if "input_tokens" in usage:
        total_in, out = usage.get("input_tokens"), usage.get("output_tokens")
        details = usage.get("input_tokens_details")
    else:
        total_in, out = usage.get("prompt_tokens"), usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details")
    total_in = _count(total_in)
    cached = min(_count(details.get("cached_tokens")), total_in) if isinstance(details, dict) else 0
    rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens = total_in - cached, cached, _count(out)


def _count(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _has_usage(event: bytes) -> bool:
    return b'"usage":null' not in event and b'"usage": null' not in event


def _completion_text(doc: dict) -> str:
    parts = []
    for c in doc.get("choices") or []:
        msg = c.get("message") or {}
        parts.append(msg.get("content") or c.get("text") or "")
    for item in doc.get("output") or []:                # the Responses API
        for c in (item.get("content") or []) if isinstance(item, dict) else []:
            parts.append(c.get("text") if isinstance(c, dict) else "")
    return "".join(p for p in parts if isinstance(p, str))


def _response_stream_text(events: list[bytes]) -> str:
    return "".join(d for d in (_data(ev).get("delta") for ev in events) if isinstance(d, str))


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
