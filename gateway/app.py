"""The OpenAI-compatible gateway: FastAPI app, its state, and the request path's wiring.

A request on a hot route (``Gateway.handle``) reads top to bottom: its id, admission
(gateway/admission.py: the key, body, tier and model checks, degradation, shedding, limits),
the upstream call (gateway/proxy.py: routing, retries before the first byte, the relay), and
the meter (gateway/meter.py: the ledger row, settling what admission charged, the counts).
The hot path avoids per-request logging and JSON round trips of stream chunks; see proxy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from fleet.paths import ADMIN_TOKEN_ENV, admin_token_path
from fleet.spec import Spec, SpecError
from gateway import channel, sla, sli
from gateway.admission import Admission, Admitted, bearer
from gateway.backends import Keys, Limiter, UsageLedger
from gateway.channel import ChannelConnector
from gateway.door import FailureLimiter, InFlight
from gateway.errors import ApiError
from gateway.ledger import UsageRecord
from gateway.meter import Meter
from gateway.metrics import Metrics
from gateway.money import Money, spent_since
from gateway.overload import InFlightCount, LoopLag
from gateway.probes import Prober, limits_for
from gateway.proxy import Call, Upstreams, request_region
from gateway.risk import Breaker, RiskWindow
from gateway.router import Endpoint, Router
from gateway.state import State
from gateway.wire import ClientGone, Incoming, Reply, send_reply

log = logging.getLogger("infermesh.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_JSON = "application/json"
IDLE_SWEEP_S = 0.25
ROLLUP_S = 10.0                  # the SLA rollups (gateway/sla.py) catch up with the ledger this often
STATUS_CACHE_S = 60.0            # the public status page is computed at most this often
MODELS_CREATED = 1_700_000_000   # a fixed `created` for /v1/models: the catalogue is declared, not trained


@dataclass
class Settings:
    spec: Spec
    routing_path: Path
    state_dir: Path
    admin_token: str | None = None
    instance: str | None = None        # this replica's name when several share the state dir


class Gateway:
    """Everything a request needs, created once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spec = spec = settings.spec
        self.state = State(spec, settings.state_dir, settings.instance)   # embedded or shared (gateway/state)
        self.keys: Keys = self.state.keys
        self.ledger: UsageLedger = self.state.ledger
        self.limiter: Limiter = self.state.limiter
        self.money = Money(spec)             # price and cost of each request (gateway/money.py)
        self.metrics = Metrics()
        self.attempts = sli.AttemptLog()     # failed upstream attempts, for per-pool SLIs
        self.router = Router(self._read_routing())
        self.router.on_eject = self._ejected
        self.router.home_region = os.environ.get("INFERMESH_REGION") or spec.gateway.region
        self.metrics.watch(self.router, self.state.shipper)     # per-endpoint signals, ledger lag (gateway/metrics.py)
        # TTFT above which a streamed answer may count as slow (outlier detection, gateway/router.py)
        self.router.slow_s = {m.id: limits_for(spec, m.id).ttft_s for m in spec.models}
        self.prober = Prober(spec, self.router, self.state.upstream_limits, self.metrics,
                             self.state.rollup)  # synthetic probes per pool (gateway/probes.py)
        self.probe_log = self.prober.log     # per-pool probe pass counts for /admin/sli
        self.risk = RiskWindow()             # SLO at risk -> max_tokens capped (gateway/risk.py)
        self.breaker = Breaker(spec, self.metrics.registry)   # the latency circuit breaker (gateway/risk.py)
        self._routing_mtime = self._mtime()
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # set in start()
        self.in_flight = InFlightCount(self.metrics.in_flight)   # admitted requests, gateway-wide (shedding)
        self.door = InFlight()               # per tenant and key, from authentication on (gateway/door.py)
        g = spec.gateway
        self.failures = FailureLimiter(g.failures_per_minute, g.trusted_proxies)
        self.lag = LoopLag()                 # the event loop's lateness: overload shedding (gateway/overload.py)
        # the request path: admission, then the upstream call (proxy.Call), then the meter
        self.admission = Admission(spec, self.keys, self.limiter, self.router, self.metrics, self.in_flight,
                                   self.lag, self.door, self.failures, self.risk, self.breaker, self.money,
                                   self._spent_since)
        self.meter = Meter(spec, self.ledger, self.limiter, self.money, self.metrics, self.router, self.risk,
                           self.breaker, self.in_flight, self.door)
        self.upstreams = Upstreams(self.router, self.meter, self.metrics, self.attempts, self.state.upstream_limits)
        self.streams = self.upstreams.streams    # started streams being relayed (idle timeouts)
        self.admin_token = settings.admin_token or _admin_token(settings.state_dir)
        self._tasks: list[asyncio.Task[None]] = []
        self._status: tuple[float, bytes] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        # each mTLS endpoint's own SSLContext, by its address (gateway/channel.py)
        connector = self._connector = ChannelConnector(self.router, limit=0, ttl_dns_cache=300,
                                                       keepalive_timeout=30)
        # workers set no cookies: DummyCookieJar skips aiohttp's cookie filtering on every request
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent",), cookie_jar=aiohttp.DummyCookieJar())
        self.upstreams.session = self.session
        await self.state.start(self.metrics.registry)
        await self.router.check_all(self.session)
        self._update_health_gauges()
        self._tasks = [asyncio.create_task(c) for c in
                       (self._health_loop(), self._watch_routing(), self._purge_loop(), self._idle_loop(),
                        self.prober.run(self.session), self.lag.run(self.metrics.loop_lag),
                        self._rollup_loop())]
        g = self.spec.gateway
        if g.liveness_interval_s > 0:         # black holes out in about a second (gateway/router.py, liveness)
            self.router.loop_lag = self.lag.level
            self._tasks.append(asyncio.create_task(
                self.router.liveness(self.session, g.liveness_interval_s, g.liveness_timeout_s)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.session.close()
        await self.state.stop()
        self.ledger.close()
        with contextlib.suppress(Exception):     # what the last minutes added (the next start catches up anyway)
            await asyncio.to_thread(self.state.rollup.run_once)

    async def _rollup_loop(self) -> None:
        """Per-minute SLA rollups from the ledger, in a thread: never on the event loop."""
        while True:
            await asyncio.sleep(ROLLUP_S)
            await self.roll_up()

    async def roll_up(self) -> bool:
        try:
            await asyncio.to_thread(self.state.rollup.run_once)
            return True
        except Exception as e:     # PostgreSQL down, a locked file: the next run catches up, nothing lost
            log.warning("SLA rollup not written: %s", type(e).__name__)
            return False

    async def status_page(self) -> bytes:
        """GET /status's JSON: per model and region, 90 days of daily availability and the state
        now (healthy endpoints), no tenant names; computed in a thread at most every STATUS_CACHE_S."""
        now = time.monotonic()
        if self._status is None or now - self._status[0] > STATUS_CACHE_S:
            await self.roll_up()
            days = await asyncio.to_thread(sla.status, self.state.sla_query(), self.spec)
            live: dict[tuple[str, str], tuple[int, int]] = {}     # (model, region) -> (available, endpoints)
            t = time.monotonic()
            for m in self.router.models.values():
                for p in m.pools:
                    if p.role == "drained":
                        continue
                    up, total = live.get((m.id, p.region), (0, 0))
                    live[(m.id, p.region)] = (up + sum(ep.available(t) for ep in p.endpoints), total + len(p.endpoints))
            for d in days:
                up, total = live.get((d["model"], d["region"]), (0, 0))
                d["state"] = "operational" if total and up == total else "degraded" if up else "down"
            self._status = (now, orjson.dumps({"generated_at": int(time.time()), "days": sla.STATUS_DAYS,
                                                "services": days}))
        return self._status[1]

    # ---- routing config -----------------------------------------------------------------------
    def _mtime(self) -> float:
        try:
            return self.settings.routing_path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _read_routing(self) -> dict[str, Any]:
        return orjson.loads(self.settings.routing_path.read_bytes())

    def reload_routing(self) -> bool:
        """Apply the routing file if it is valid; a broken file keeps the running config."""
        try:
            config = self._read_routing()
            spec = self._config_spec(config)
            self.router.apply(config)
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, SpecError) as e:
            log.error("routing config %s not applied: %s", self.settings.routing_path, type(e).__name__)
            return False
        if spec is not None and spec != self.spec:
            self.apply_spec(spec)
        self._routing_mtime = self._mtime()
        self._update_health_gauges()
        log.info("routing config applied (version %d)", self.router.version)
        return True

    def _config_spec(self, config: dict[str, Any]) -> Spec | None:
        """The spec in a gateway config (`python -m gateway --config`: fleet.routing.gateway_config), if any."""
        if "spec" not in config:
            return None
        from fleet.routing import spec_from_gateway_config
        return spec_from_gateway_config(config)

    def apply_spec(self, spec: Spec) -> None:
        """A changed gateway config, live: tiers (limits, SLOs, priorities) and the `gateway:` settings read
        per request. State backends and listening ports are set at start: a change to them is logged."""
        old = self.spec
        self.spec = self.meter.spec = self.prober.spec = spec
        self.admission.configure(spec)
        self.router.slow_s = {m.id: limits_for(spec, m.id).ttft_s for m in spec.models}
        fixed = [f for f in ("state", "port", "replicas") if getattr(spec.gateway, f) != getattr(old.gateway, f)]
        if fixed:
            log.warning("gateway config: %s changed; applied at the next restart", ", ".join(fixed))
        log.info("gateway config applied (tiers: %s)", ", ".join(sorted(self.admission.tiers)))

    async def _watch_routing(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            # a new routing config, or renewed TLS material under it (a rotated Secret): apply, check at once
            if self._mtime() != self._routing_mtime or channel.material_changed(self.router):
                self.reload_routing()
                self._connector.forget_stale()
                await self.router.check_all(self.session)

    async def _health_loop(self) -> None:
        interval = self.spec.gateway.health_interval_s
        while True:
            await asyncio.sleep(interval)
            await self.router.check_all(self.session)
            self._update_health_gauges()

    async def _idle_loop(self) -> None:
        """End started streams whose upstream has been quiet for longer than their tier's idle_s:
        one sweep every IDLE_SWEEP_S instead of a timer reset on every chunk (bench/ S3). Closing
        the upstream response makes the relay's pending read fail; it ends the client's stream
        with an error event and meters it as 504 idle_timeout."""
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            now = time.monotonic()
            for events in [e for e in self.streams if now - e.last > e.idle_s]:
                events.expired = True
                events.resp.close()

    async def _purge_loop(self) -> None:
        while True:
            self.ledger.purge_expired()
            await asyncio.sleep(60)

    def _update_health_gauges(self) -> None:
        now = time.monotonic()
        self.metrics.healthy.clear()          # a pool removed or given another role leaves no stale series
        for m in self.router.models.values():
            for p in m.pools:
                self.metrics.healthy.labels(m.id, p.name, p.provider, p.region, p.role).set(
                    sum(1 for ep in p.endpoints if ep.available(now)))

    def _ejected(self, ep: Endpoint) -> None:
        p = ep.pool
        self.metrics.ejections.labels(p.model, p.name, p.provider, p.region).inc()
        self._update_health_gauges()

    async def _spent_since(self, key_id: str, since: int) -> int:
        """A key's spend in the ledger since ``since`` (micro-dollars), in a thread: what a spend
        limit's month starts from where no limiter store knows it yet (Admission.hold_spend)."""
        pg = self.state.pg
        return await asyncio.to_thread(spent_since, key_id, since, None if pg else self.ledger.path,
                                       self.spec.gateway.state.postgres_dsn if pg else None)

    # ---- the request path -----------------------------------------------------------------------
    async def handle(self, request: Incoming, route: str) -> Reply:
        """A request on a hot route: its id, admission, the upstream call, the meter."""
        started = time.perf_counter()
        rid = request_id(request.headers.get("x-request-id"))
        try:
            held = self.admission.identify(request)
        except ApiError as e:
            return e.reply(rid)                  # no key: nobody to meter it against
        principal = held.principal
        rec = UsageRecord(rid, principal.tenant, principal.key_id, principal.tier, route, "")
        headers = {"x-request-id": rid}
        adm: Admitted | None = None
        call: Call | None = None
        try:
            adm = await self.admission.admit(request, route, held, rec, headers)
            call = Call(self.upstreams, adm, route, rid, started, rec, headers,
                        region=request_region(self.router, request.headers, principal.region))   # header, key, gateway
            return await call.run()
        except ApiError as e:
            return await self.meter.refused(e, rec, adm, headers, started)
        except ClientGone:
            raise
        except Exception as exc:   # a bug: metered and counted like any 500, so the SLO sees it
            log.error("unexpected %s on %s", type(exc).__name__, route, exc_info=exc)
            err = ApiError(500, "The server had an error while processing your request.", code="internal_error")
            try:
                return await self.meter.refused(err, rec, adm, headers, started)
            except Exception:      # the ledger itself failed: the client still gets the 500
                return err.reply(rid)
        finally:
            if call is None or not call.streaming:
                self.meter.end(held)             # a started stream's relay ends it instead (Call._closed)

    # ---- models -------------------------------------------------------------------------------
    def model_object(self, model_id: str) -> dict[str, Any]:
        """OpenAI's model object, plus what clients of open models read: its kind (chat or
        embedding) and context length as vLLM names it (`max_model_len`)."""
        route = self.router.models.get(model_id)
        return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "infermesh",
                "kind": route.kind if route else "chat",
                "max_model_len": route.context_length if route else None}


def request_id(raw: str | None) -> str:
    """The client's x-request-id when it is a sane token, else one of ours."""
    if raw is None or not _REQUEST_ID.match(raw):
        return "req_" + secrets.token_hex(12)
    return raw


def _admin_token(state_dir: Path) -> str:
    """The operator's token for /admin/*: INFERMESH_ADMIN_TOKEN, else one kept in the state dir
    (made at the first start; fleet.paths.admin_token is how the operator's tools read it)."""
    env = os.environ.get(ADMIN_TOKEN_ENV)
    if env:
        return env
    path = admin_token_path(state_dir)
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            # a prefix: a bare token_urlsafe starts with '-' one time in 64, which argparse then reads
            # as an option (`--admin-token -x...`: the canary tests' old intermittent failure)
            f.write("adm-" + secrets.token_urlsafe(32))
    return path.read_text().strip()


class GatewayApp(FastAPI):
    """FastAPI, with the two hot routes served on raw ASGI before anything else (gateway/wire.py).

    Starlette's middleware, Request and Response objects around every request cost about half
    of the gateway's CPU in bench/ S1; the completion routes need none of them (Gateway.handle
    turns every failure into an OpenAI-shaped reply itself). Everything else goes through FastAPI.
    """

    HOT = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
           "/v1/embeddings": "embeddings"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):       # a trailing slash is the same route, never a redirect
            path = path.rstrip("/") or "/"
            scope = {**scope, "path": path, "raw_path": path.encode("latin-1", "replace")}
        if scope["method"] == "POST":
            root = scope.get("root_path")
            if root and path.startswith(root):
                path = path[len(root):]
            route = self.HOT.get(path)
            if route is not None:
                await self.serve(scope, receive, send, route)
                return
        # every other route echoes x-request-id too (the hot routes set it in Gateway.handle)
        raw = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id(raw.decode("latin-1") if raw is not None else None).encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid)]
            await send(message)

        await super().__call__(scope, receive, send_with_id)

    async def serve(self, scope, receive, send, route: str) -> None:
        try:
            reply = await self.state.gateway.handle(Incoming(scope, receive), route)
        except ClientGone:
            return                          # nobody to answer
        except Exception as exc:   # a bug: the customer still gets OpenAI's shape, never a traceback
            log.error("unexpected %s on %s", type(exc).__name__, scope["path"], exc_info=exc)
            reply = ApiError(500, "The server had an error while processing your request.",
                             code="internal_error").reply()
        await send_reply(reply, receive, send)


def create_app(settings: Settings) -> FastAPI:
    gw = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = GatewayApp(title="infermesh gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                     redirect_slashes=False)     # a redirect would name whatever Host the client sent
    app.state.gateway = gw

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        message = "Unknown request URL." if status == 404 else (exc.detail or "Request not allowed.")
        return ApiError(status, f"{message} ({request.method} {request.url.path})",
                        code="unknown_url" if status == 404 else None).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return ApiError(500, "The server had an error while processing your request.",
                        code="internal_error").response(request.headers.get("x-request-id"))

    # POSTs to the hot routes never reach the router (GatewayApp.serve answers them); these
    # routes make any other method a 405 in OpenAI's error shape instead of a 404.
    async def hot_route(request: Request) -> Response:
        raise StarletteHTTPException(405)

    for path in GatewayApp.HOT:
        app.add_route(path, hot_route, methods=["POST"])

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            principal = gw.admission.authenticate(request.headers.get("authorization"))
            tier = gw.admission.tier_of(principal)
        except ApiError as e:
            return e.response()
        data = [gw.model_object(m) for m in tier.models if gw.router.has_model(m)
                and (principal.models is None or m in principal.models)]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=_JSON)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        try:
            principal = gw.admission.authenticate(request.headers.get("authorization"))
            gw.admission.check_model(gw.admission.tier_of(principal), model_id)
            if principal.models is not None and model_id not in principal.models:
                raise ApiError(403, f"This API key may not use the model '{model_id}'.", code="model_not_allowed",
                               param="model")
        except ApiError as e:
            return e.response()
        return Response(orjson.dumps(gw.model_object(model_id)), media_type=_JSON)

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: 503 while this replica has no key set (it would refuse every key); /health is liveness."""
        if not gw.state.ready:
            return Response(b'{"status":"not_ready","reason":"no_keys"}', status_code=503, media_type=_JSON)
        return Response(b'{"status":"ready"}', media_type=_JSON)

    def admin(handler):
        """Operator-only routes (/admin/*, /metrics): the admin token, compared in constant time,
        as a bearer token or in X-Infermesh-Admin-Token (the Kubernetes API's pod proxy, which the
        canary reads through, drops Authorization)."""
        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            token = (bearer(request.headers.get("authorization"))
                     or request.headers.get("x-infermesh-admin-token") or "")
            if not secrets.compare_digest(token.encode("utf-8", "replace"), gw.admin_token.encode()):
                return ApiError(401, "Admin token required.", code="invalid_admin_token").response()
            return await handler(request)
        return guarded

    @app.get("/metrics")
    @admin
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: they name pools, providers and regions, so they are the operator's
        (scrape with the admin token: the PodMonitor does)."""
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/endpoints")
    @admin
    async def admin_endpoints(request: Request) -> Response:
        pools = gw.router.status()
        probes = gw.prober.status()
        for p in pools:
            p["probes"] = probes.get(p["pool"])
        return Response(orjson.dumps({"version": gw.router.version, "pools": pools}), media_type=_JSON)

    @app.get("/admin/slo")
    @admin
    async def admin_slo(request: Request) -> Response:
        """The SLA report (gateway/sla.py) over the last `hours`, from the rollups, in a thread."""
        try:
            hours = float(request.query_params.get("hours", 24 * 30))
        except ValueError:
            hours = -1.0
        if not 0 < hours <= 24 * 366:
            return ApiError(400, "hours: a number more than 0 and at most 8784.", code="invalid_window",
                            param="hours").response()
        await gw.roll_up()
        now = time.time()
        period = sla.window_period(now - hours * 3600, None, now)
        rep = await asyncio.to_thread(sla.report, gw.state.sla_query(), gw.spec, period)
        return Response(orjson.dumps(rep), media_type=_JSON)

    @app.get("/status")
    @app.get("/status.json")
    async def status(request: Request) -> Response:
        """Public: per model and region, daily availability for 90 days and the state now."""
        return Response(await gw.status_page(), media_type=_JSON)

    @app.get("/admin/sli")
    @admin
    async def admin_sli(request: Request) -> Response:
        try:
            since = request.query_params.get("since")       # epoch seconds: from then on
            window = time.time() - float(since) if since else float(request.query_params.get("window", 600))
        except ValueError:
            window = -1.0
        if not 0 < window <= 31 * 86400:
            return ApiError(400, "window: seconds, more than 0 and at most 2678400; since: a past epoch time.",
                            code="invalid_window", param="window").response()
        now = time.time()
        rows = await gw.state.usage_rows(since=now - window)
        return Response(orjson.dumps(sli.report(rows, gw.attempts, window, now, gw.probe_log)),
                        media_type=_JSON)

    @app.post("/admin/reload")
    @admin
    async def admin_reload(request: Request) -> Response:
        if not gw.reload_routing():
            return ApiError(400, "The routing config could not be applied; the running one is kept.",
                            code="bad_routing_config").response()
        await gw.router.check_all(gw.session)
        return Response(orjson.dumps({"version": gw.router.version}), media_type=_JSON)

    return app
