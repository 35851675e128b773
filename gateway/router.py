"""Which worker serves a request: models -> pools -> endpoints, with health.

Pool roles: `primary` pools share traffic by weight; a `canary` pool takes its weight as a
share of the model's traffic; `standby` pools take traffic when the primaries are short (below);
`drained` pools take none (in-flight requests finish).

N+1 as planned: the standby is the plan's spare capacity, so it takes traffic as soon as the
primaries are short, not only when none is left. (a) Declared demand: where the stack has a
forecast for the model, the routing config carries the primary GPUs the plan sized for it
(``required_gpus``, with headroom); while the available primary endpoints hold fewer, the
standby pools take that missing share of new requests (2 of 4 GPUs left: half). (b) In-flight
load: an endpoint is *full* when it runs its pool's ``max_concurrency`` requests through this
gateway or its vLLM queues; a request whose chosen primary endpoint is full goes to a standby
endpoint with room. With no standby available, everything stays on the primaries, as before.

Choice, so that declared weights hold at any load:

1. *Pool*: drawn at random in proportion to the weights of the pools of the active role that
   have an available endpoint (a pool with none drops out and the others share its weight).
2. *Endpoint* inside the pool: power-of-two-choices on the load score, the lower wins. The
   score is outstanding requests through this gateway plus, where the worker's vLLM
   ``/metrics`` is readable, its queue (``vllm:num_requests_waiting``) and a penalty when its KV
   cache is nearly full (``vllm:gpu_cache_usage_perc`` / ``vllm:kv_cache_usage_perc``). Those
   two are the signals that predict TTFT on vLLM: a waiting request has not started prefill,
   and a full KV cache means preemption.
3. *Spill-over*: when the endpoint so chosen is saturated (requests waiting or KV cache over
   90%), a second pool is drawn and the less loaded of the two endpoints wins, so an overloaded
   pool sheds to the others only while it queues.

Regions: a request is served in its region (the request's ``x-infermesh-region`` header naming a
region, else its key's region from ``keys create --region``, else the gateway's own,
``gateway.region`` or INFERMESH_REGION) while the
model has an available endpoint there, else in that region's declared ``backup`` while it has
one, else anywhere. The proxy marks a failover (``x-infermesh-region-failover``) and the ledger
records the region that served (gateway/proxy.py). Without a region, regions are pools like any.

Multi-turn chats carry an affinity key (the conversation's prefix): rendezvous hashing keeps
them on one worker while it is available and not overloaded, so vLLM's prefix cache stays warm.

Health:

- Active checks: ``/health`` and ``/metrics`` of every endpoint every ``health_interval_s``.
  A failing check takes the endpoint out at once; it returns at the next passing check.
- Liveness (black holes: a worker that accepts connections and never answers): ``/health`` of
  every available worker every ``liveness_interval_s`` (0.5 s) within ``liveness_timeout_s``
  (0.5 s); a miss is confirmed by a second ping at once, and two misses in a row take the
  endpoint out, so a black hole is out about 1 to 1.5 s after it stopped answering. Misses
  while the gateway's own event loop runs late (gateway/overload.py) do not count: that lag is
  ours, not the worker's. External upstreams are left to the active checks (their RPM is paid).
- An endpoint found *lost* (out by a check or a ping, or ejected) lets go of its requests at
  once: those still waiting for its first token (streams; whole answers too when it is found
  dead) are retried elsewhere, and its started streams that have been quiet for ``STALL_S``
  end with an error event and ``[DONE]``. A stream still flowing from an ejected endpoint
  is alive and is left to finish.
- Passive outlier detection: a missed deadline (connect, first token, or a stream's idle gap)
  ejects at once; otherwise ``EJECT_AFTER_FAILURES`` (3) consecutive failures eject an
  endpoint for 5 s, doubling with each ejection up to 5 min (a success after its return
  steps the doubling back by one). A failure is a connect error, a reset, a 5xx or 429, a
  TTFT or idle timeout, a broken stream, a failed synthetic probe (gateway/probes.py), or a
  *slow* answer (below). At most half of a pool's endpoints are ejected at once; as in
  Envoy, one endpoint may always be ejected, so a one-endpoint pool can be ejected whole (the
  model's other pools, its standby and its fallback carry it). An ejected endpoint returns
  only after its ejection time passed *and* a later active check passed, or at once when it
  answers a request and was ejected for a refused connection, a reset or a 5xx.
- Before a request leaves its model for the fallback model (nothing of the model available),
  the model's ejected endpoints whose active checks pass are tried, if the ejection was for a
  refused connection, a reset or a 5xx (``pick_ejected``; Envoy's panic routing, narrowed): in
  the request's region, then its backup region. A spurious ejection of a model's last capacity
  must not send every request to a smaller model for the whole ejection time. After the
  fallback, ``pick_panic`` is the last resort.
- TTFT degradation: each streamed answer's TTFT, measured from the start of the upstream
  attempt (so it is the endpoint's, not the gateway's queueing), is *slow* when it exceeds the
  model's slow limit (the strictest TTFT SLO, p95, of the tiers that serve the model; set by
  the app in ``slow_s``) *and* is more than ``SLOW_RELATIVE`` (2) times the (upper) median
  recent TTFT of its peers. Peers: the model's other endpoints in primary and canary pools
  (all but drained ones for a standby endpoint: an idle standby's fast answers say nothing
  about a loaded primary) with an answer or probe in the last ``PEER_FRESH_S`` (30 s),
  ejected ones included; an endpoint's recent TTFT is the larger of an EWMA and its last
  answer, so a model-wide slowdown registers with the peers' next answer. The second condition
  makes it an *outlier* test: when every endpoint is slow (overload) nothing is ejected, since
  ejecting would only concentrate the load. A slow answer is still
  delivered; it counts as one failure. So a pool whose TTFT degrades is ejected after three
  slow answers or failed probes.
"""

from __future__ import annotations

import asyncio
import os
import hashlib
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from fleet import prometheus
from fleet.routing import secret_env_name
from gateway import channel

log = logging.getLogger("infermesh.router")

EJECT_AFTER_FAILURES = 3
EJECT_BASE_S = 5.0
EJECT_MAX_S = 300.0
MAX_EJECTED_SHARE = 0.5
KV_PRESSURE = 0.9
SLOW_RELATIVE = 2.0               # a slow answer is also this many times the peers' median TTFT
TTFT_EWMA_ALPHA = 0.5
PEER_FRESH_S = 30.0
# ejections that an ejected-but-checked-healthy endpoint may be tried again for before a model
# fallback (Router.pick_ejected): cheap to try; a missed deadline (timeout) is not
RETRYABLE_EJECTIONS = frozenset(("connect", "reset", "status_5xx"))
STALL_S = 1.0                     # a started stream quiet this long on a lost endpoint is ended at once


def _expire(deadline) -> None:
    """Make a waiting request's asyncio.Timeout fire now. One that is already firing (the request
    whose own deadline passed is the one reporting the endpoint lost) or done is left alone:
    asyncio refuses to reschedule it."""
    if deadline.when() is None or not deadline.expired():
        try:
            deadline.reschedule(0)
        except RuntimeError:
            pass


@dataclass(eq=False)
class Endpoint:
    id: str
    url: str
    pool: RoutePool
    outstanding: int = 0
    healthy: bool = True              # active checks: down on an answer that says so, or 2 timeouts in a row
    check_timeouts: int = 0
    refused: bool = False             # the last check was refused or answered non-200: really down
    checked_at: float = 0.0           # monotonic time of the last passing check
    failures: int = 0                 # consecutive passive failures
    ejections: int = 0
    ejected_until: float = 0.0
    eject_cause: str = ""             # the failure that ejected it last (an error class, ``probe: ...``)
    waiting: float = 0.0              # from the worker's /metrics
    kv_usage: float = 0.0
    gpu_util: float | None = None     # where the worker's /metrics has DCGM names (gateway/metrics.py)
    gpu_mem_used: float | None = None     # bytes
    gpu_mem_total: float | None = None    # bytes
    ttft_ewma: float = 0.0            # seconds, streamed answers (attempt start -> first event)
    ttft_last: float = 0.0
    ttft_at: float = float("-inf")    # monotonic time of the last TTFT sample
    slow: int = 0                     # slow answers seen (outlier detection)
    api: str = ""                     # OpenAI base URL (…/v1) the requests go to
    routes: dict = field(default_factory=dict)   # route name (chat, completions, ...) -> parsed URL (yarl), once
    health_url: str = ""
    external: bool = False            # an OpenAI-compatible upstream (no vLLM /health or /metrics)
    headers: dict[str, str] = field(default_factory=dict)
    channel: str = ""                 # mtls | wireguard | https | "" (unstated: plain as the URL says)
    ssl: Any = None                   # mtls: this endpoint's ssl.SSLContext (gateway/channel.py), by its address
    reason: str = ""                  # why the last check failed (a TLS refusal names itself), for /admin/endpoints
    # deadlines (asyncio.Timeout) of non-stream requests waiting on this endpoint: an answer
    # arrives whole, after the generation, so only a failed active check can tell a lost worker
    # from a long answer; it expires them at once (proxy.Call._attempt retries elsewhere)
    waiting_calls: set = field(default_factory=set)
    stream_waits: set = field(default_factory=set)   # deadlines of streams waiting for this endpoint's first token
    streams: set = field(default_factory=set)        # started streams' readers (proxy.SSEReader) relayed from it
    ping_misses: int = 0
    limits: tuple[str, int, int] | None = None   # an upstream's (key, max concurrent, rpm), enforced by the proxy

    def abandon_waiting(self) -> None:
        for deadline in self.waiting_calls:
            _expire(deadline)              # in the past: TimeoutError in that request at once

    def lost(self, dead: bool = True, now: float | None = None) -> int:
        """Let go of what waits on this endpoint (see the module's text): streams waiting for a first
        token retry elsewhere, whole answers too when it is ``dead``; started streams quiet for
        STALL_S end now (the relay sends an error event and [DONE]). Returns the streams ended."""
        for deadline in self.stream_waits:
            _expire(deadline)
        if dead:
            self.abandon_waiting()
        return self.end_quiet_streams(time.monotonic() if now is None else now)

    def end_quiet_streams(self, now: float) -> int:
        """End the started streams quiet for STALL_S (the liveness loop sweeps lost endpoints with
        this, so a stream that fell silent just before its endpoint was found lost ends soon after)."""
        quiet = [events for events in self.streams if now - events.last > STALL_S]
        for events in quiet:
            events.resp.close()            # the relay's pending read fails: error event, [DONE]
        return len(quiet)

    def available(self, now: float) -> bool:
        if not self.healthy:
            return False
        if self.ejected_until == 0.0:
            return True
        return now >= self.ejected_until and self.checked_at >= self.ejected_until

    def ejected_retryably(self) -> bool:
        """Ejected last for a failure that is cheap to try again (RETRYABLE_EJECTIONS)."""
        return self.eject_cause.split(":", 1)[0] in RETRYABLE_EJECTIONS

    def score(self) -> float:
        """Load: requests through us, the worker's queue, a penalty when its KV cache is nearly full."""
        return self.outstanding + self.waiting + (8.0 if self.kv_usage >= KV_PRESSURE else 0.0)

    def saturated(self) -> bool:
        return self.waiting > 0 or self.kv_usage >= KV_PRESSURE


@dataclass(eq=False)
class RoutePool:
    name: str
    provider: str
    region: str
    role: str
    weight: float
    model: str
    endpoints: list[Endpoint] = field(default_factory=list)
    send_model: str = ""              # the model id the upstream knows (an external upstream's may differ)
    max_concurrency: int = 0          # sequences one endpoint runs at once (0: unknown, e.g. an external upstream)
    gpus: int = 1                     # GPUs per endpoint, for the plan's required_gpus

    @property
    def endpoint_weight(self) -> float:
        return max(self.weight, 1e-9) / max(1, len(self.endpoints))


@dataclass(eq=False)
class ModelRoute:
    id: str
    fallback: str | None
    pools: list[RoutePool]
    kind: str = "chat"                # chat | embedding (fleet.spec.Model.kind)
    context_length: int | None = None
    required_gpus: int = 0            # primary GPUs the plan sized for the forecast (0: no forecast)
    required_by_region: dict = field(default_factory=dict)   # the same, per region


class Router:
    def __init__(self, config: dict[str, Any], rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.models: dict[str, ModelRoute] = {}
        self.version = 0
        self.on_eject = lambda ep: None   # metrics hooks, set by the app
        self.slow_s: dict[str, float] = {}  # model -> TTFT above which an answer may be "slow"
        self.tls: dict[tuple[str | None, int | None], Any] = {}   # (host, port) -> SSLContext of mTLS endpoints
        self.home_region: str | None = None   # the gateway's region (set by the app): requests stay there
        self.apply(config)

    # ---- configuration ----------------------------------------------------------------
    def apply(self, config: dict[str, Any]) -> None:
        """Swap in a new routing config. Endpoints that persist keep their health and load."""
        old = {ep.id: ep for ep in self.endpoints()}
        models: dict[str, ModelRoute] = {}
        tls_dir = config.get("tls_dir")
        for m in config.get("models", []):
            pools = []
            for p in m.get("pools", []):
                pool = RoutePool(p["name"], p.get("provider", ""), p.get("region", ""), p.get("role", "primary"),
                            float(p.get("weight", 1.0)), m["id"], send_model=p.get("upstream_model") or m["id"],
                            max_concurrency=int(p.get("max_concurrency") or 0), gpus=int(p.get("gpus") or 1))
                for e in p.get("endpoints", []):
                    ep = old.get(e["id"])
                    if ep is None or ep.url != e["url"].rstrip("/"):
                        ep = Endpoint(e["id"], e["url"].rstrip("/"), pool)
                    ep.pool = pool
                    _configure(ep, e, tls_dir)
                    # an external upstream's own limits, per key (gateway/state/upstream_limits.py)
                    ep.limits = ((e.get("credentials") or ep.id, int(e.get("max_concurrency") or 0),
                                  int(e.get("rpm") or 0)) if e.get("max_concurrency") or e.get("rpm") else None)
                    pool.endpoints.append(ep)
                pools.append(pool)
            models[m["id"]] = ModelRoute(m["id"], m.get("fallback"), pools, m.get("kind", "chat"),
                                         m.get("context_length"), int(m.get("required_gpus") or 0),
                                         dict(m.get("required_gpus_by_region") or {}))
        self.models = models
        self.backups: dict[str, str] = dict(config.get("region_backups") or {})
        self.regions = {p.region for m in models.values() for p in m.pools}
        # the upstream session's connector finds each mTLS endpoint's context by its address
        self.tls = {(ep.routes["chat"].host, ep.routes["chat"].port): ep.ssl
                    for ep in self.endpoints() if ep.ssl is not None}
        self.version += 1

    def endpoints(self) -> Iterable[Endpoint]:
        for m in self.models.values():
            for p in m.pools:
                yield from p.endpoints

    # ---- choice -----------------------------------------------------------------------
    def serving_region(self, route: ModelRoute, region: str, exclude: set[Endpoint] | frozenset,
                       now: float) -> str | None:
        """Where a request from ``region`` is served: there while the model has an available endpoint
        there, else in its declared backup region while that has one; None: anywhere."""
        for r in (region, self.backups.get(region)):
            if r is not None and any(p.region == r and p.role != "drained" and p.weight > 0
                                     and any(ep not in exclude and ep.available(now) for ep in p.endpoints)
                                     for p in route.pools):
                return r
        return None

    def pick(self, model: str, exclude: set[Endpoint] | frozenset = frozenset(),
             affinity: str | None = None, region: str | None = None) -> Endpoint | None:
        route = self.models.get(model)
        if route is None:
            return None
        now = time.monotonic()
        pools, required = route.pools, route.required_gpus
        if region is not None:
            served = self.serving_region(route, region, exclude, now)
            if served is not None:
                pools = [p for p in route.pools if p.region == served]
                required = route.required_by_region.get(served, 0)
        by_role: dict[str, list[tuple[RoutePool, list[Endpoint]]]] = {"primary": [], "canary": [], "standby": []}
        for pool in pools:
            groups = by_role.get(pool.role)
            if groups is None or pool.weight <= 0:
                continue
            eps = [ep for ep in pool.endpoints if ep not in exclude and ep.available(now)]
            if eps:
                groups.append((pool, eps))
        canary = by_role["canary"]
        if canary and by_role["primary"]:
            if self.rng.random() < sum(pool.weight for pool, _ in canary):
                return self._p2c(self._draw(canary)[1])
        standby = by_role["standby"]
        groups = by_role["primary"] or canary or standby
        if not groups:
            return None
        if standby and groups is not standby:
            # N+1 as planned: the standby takes the demand the primaries left short (Router.standby_share)
            share = self.standby_share(required, groups)
            if share and self.rng.random() < share:
                groups = standby
        if affinity is not None:
            candidates = [ep for _, eps in groups for ep in eps]
            ep = self._rendezvous(candidates, affinity)
            if not ep.saturated() and ep.outstanding < 4 * (1 + min(e.outstanding for e in candidates)):
                return ep
        pool, eps = self._draw(groups)
        ep = self._p2c(eps)
        if ep.saturated() and len(groups) > 1:
            # the drawn pool queues: draw a second pool and keep the less loaded endpoint
            other = self._p2c(self._draw([g for g in groups if g[0] is not pool])[1])
            if other.score() < ep.score():
                ep = other
        if standby and groups is not standby and self._full(ep):
            # the excess over what the primaries run at once goes to the standby while it has room
            spare = [e for _, s_eps in standby for e in s_eps if not self._full(e)]
            if spare:
                return self._p2c(spare)
        return ep

    @staticmethod
    def _full(ep: Endpoint) -> bool:
        cap = ep.pool.max_concurrency
        return ep.saturated() or (cap > 0 and ep.outstanding >= cap)

    @staticmethod
    def standby_share(required_gpus: int, groups: list[tuple[RoutePool, list[Endpoint]]]) -> float:
        """The share of new requests the standby pools take: the part of the plan's required primary
        GPUs (the forecast with headroom) that the available primary endpoints no longer provide.
        0 when the primaries carry it, or when the model has no forecast (then only the in-flight
        excess goes to the standby: ``pick``)."""
        if required_gpus <= 0:
            return 0.0
        have = sum(pool.gpus * len(eps) for pool, eps in groups)
        return max(0.0, 1.0 - have / required_gpus)

    def pick_ejected(self, model: str, exclude: set[Endpoint] | frozenset = frozenset(),
                     region: str | None = None) -> Endpoint | None:
        """Before a request leaves its model for the fallback: the model's endpoints that requests
        ejected (passive health) while their active checks still pass, for a failure that costs
        little to try again (a refused connection, a reset, a 5xx), never for a missed deadline.
        Envoy's panic routing, narrowed: a spurious ejection of a model's last healthy capacity (the
        backup region's only worker, say) must not send everyone to a smaller model for its whole
        ejection time. An attempt that succeeds ends the ejection (``success``). In the request's
        region first, then its backup region, then anywhere."""
        route = self.models.get(model)
        if route is None:
            return None
        now = time.monotonic()
        eps = [ep for pool in route.pools if pool.role != "drained" and pool.weight > 0 for ep in pool.endpoints
               if ep not in exclude and ep.healthy and not ep.refused and now < ep.ejected_until
               and ep.ejected_retryably()]
        if not eps:
            return None
        for r in (region, self.backups.get(region)) if region is not None else ():
            here = [ep for ep in eps if ep.pool.region == r]
            if here:
                return self._p2c(here)
        return self._p2c(eps)

    def pick_panic(self, model: str, exclude: set[Endpoint] | frozenset = frozenset()) -> Endpoint | None:
        """The last resort when no endpoint of the model is available (Envoy's panic mode):
        endpoints taken out by ejection or by check *timeouts* may be an overloaded gateway's own
        lag, not a dead worker, so try them rather than refuse everyone. Endpoints that refused
        or answered their check with an error stay out."""
        route = self.models.get(model)
        if route is None:
            return None
        eps = [ep for pool in route.pools if pool.role != "drained" and pool.weight > 0
               for ep in pool.endpoints if ep not in exclude and not ep.refused]
        return self._p2c(eps) if eps else None

    def _draw(self, groups: list[tuple[RoutePool, list[Endpoint]]]) -> tuple[RoutePool, list[Endpoint]]:
        if len(groups) == 1:
            return groups[0]
        return self.rng.choices(groups, weights=[pool.weight for pool, _ in groups])[0]

    def _p2c(self, eps: list[Endpoint]) -> Endpoint:
        if len(eps) == 1:
            return eps[0]
        a, b = self.rng.sample(eps, 2)
        return a if a.score() <= b.score() else b

    @staticmethod
    def _rendezvous(eps: list[Endpoint], key: str) -> Endpoint:
        def rank(ep: Endpoint) -> float:
            h = int.from_bytes(hashlib.blake2b(f"{key}|{ep.id}".encode(), digest_size=8).digest(), "big")
            return (h + 1) / 2**64 * ep.pool.endpoint_weight
        return max(eps, key=rank)

    def has_model(self, model: str) -> bool:
        return model in self.models

    # ---- passive health ---------------------------------------------------------------
    def success(self, ep: Endpoint) -> None:
        ep.failures = 0
        if not ep.ejected_until:
            return
        if ep.available(time.monotonic()):
            ep.ejections = max(0, ep.ejections - 1)
            ep.ejected_until = 0.0
        elif ep.healthy and ep.ejected_retryably():
            # an answer during an ejection for a refused connection, a reset or a 5xx (pick_ejected
            # tried it, or a request that was already on it) shows that failure has passed: back now;
            # the ejection count stays, so a flapping endpoint's next ejection is longer
            ep.ejected_until = 0.0

    def observe_ttft(self, ep: Endpoint, seconds: float) -> bool:
        """Record a streamed answer's TTFT (from the attempt's start). True when it is *slow*: over
        the model's slow limit and an outlier against the model's other available endpoints."""
        prev = ep.ttft_ewma
        ep.ttft_ewma = seconds if prev == 0.0 else prev + TTFT_EWMA_ALPHA * (seconds - prev)
        now = ep.ttft_at = time.monotonic()
        ep.ttft_last = seconds
        if not self.outlier(ep, seconds, now):
            return False
        ep.slow += 1
        return True

    def outlier(self, ep: Endpoint, seconds: float, now: float | None = None) -> bool:
        """Is this TTFT over the model's slow limit and twice its fresh peers' median? The relay
        asks again when a slow stream ends: when every endpoint slows at once (an overload),
        the first slow answers are compared with peers' fast figures from before, and only by
        the stream's end have the peers' own slow answers come in."""
        now = time.monotonic() if now is None else now
        limit = self.slow_s.get(ep.pool.model)
        route = self.models.get(ep.pool.model)
        if limit is None or seconds <= limit or route is None:
            return False
        roles = ("primary", "canary", "standby") if ep.pool.role == "standby" else ("primary", "canary")
        peers = sorted(max(e.ttft_ewma, e.ttft_last) for p in route.pools if p.role in roles
                       for e in p.endpoints if e is not ep and now - e.ttft_at < PEER_FRESH_S)
        return not (peers and seconds <= SLOW_RELATIVE * peers[len(peers) // 2])

    def failure(self, ep: Endpoint, at_once: bool = False, cause: str = "") -> None:
        """A failed attempt; ``at_once`` (a missed connect, first-token or idle deadline) ejects
        without waiting for EJECT_AFTER_FAILURES. ``cause`` (the error class, or ``probe: ...``)
        goes into the ejection's log line."""
        ep.failures += 1
        now = time.monotonic()
        if (ep.failures < EJECT_AFTER_FAILURES and not at_once) or now < ep.ejected_until:
            return
        pool = ep.pool
        ejected = sum(1 for e in pool.endpoints if e.ejected_until > now)
        if ejected + 1 > MAX_EJECTED_SHARE * len(pool.endpoints) and len(pool.endpoints) > 1:
            return  # keep a share of the pool in rotation; active checks still take dead ones out
        ep.ejections += 1
        ep.ejected_until = now + min(EJECT_MAX_S, EJECT_BASE_S * 2 ** (ep.ejections - 1))
        ep.failures = 0
        ep.eject_cause = cause
        log.warning("endpoint %s of pool %s ejected for %.0fs (%s%s)", ep.id, pool.name, ep.ejected_until - now,
                    cause or "failed", ", at once" if at_once else f", {EJECT_AFTER_FAILURES} in a row")
        self.on_eject(ep)
        ep.lost(dead=False, now=now)

    # ---- active health ----------------------------------------------------------------
    async def check(self, session: aiohttp.ClientSession, ep: Endpoint, timeout: float = 2.0) -> bool:
        """A refused connection or a non-200 /health marks the endpoint down at once. A timeout
        needs a second one in a row: under load the gateway's own event loop can lag past the
        check's timeout, and a single late answer must not take the last endpoint of a model out."""
        to = aiohttp.ClientTimeout(total=timeout)
        if ep.reason.startswith("config:"):          # unusable TLS material: never dialled
            ep.healthy, ep.refused = False, True
            ep.abandon_waiting()
            return False
        try:
            async with session.get(ep.health_url, headers=ep.headers, timeout=to) as r:
                ok = r.status == 200
            if ok and not ep.external:
                await self._read_load(session, ep, to)
            ep.check_timeouts = 0
            ep.refused = not ok
            ep.reason = "" if ok else f"health: answered {r.status}"
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            ep.check_timeouts += 1
            ok = ep.check_timeouts < 2 and ep.healthy
            ep.reason = "health: timed out"
        except (aiohttp.ClientError, OSError) as e:
            ok, ep.refused = False, True
            ep.reason = channel.refusal_of(e, ep.channel) or f"health: {type(e).__name__}"
        if ok != ep.healthy:
            log.warning("endpoint %s of pool %s is %s", ep.id, ep.pool.name, "healthy" if ok else "unhealthy")
        ep.healthy = ok
        if not ok:
            ep.lost()
        if ok:
            ep.checked_at = time.monotonic()
            ep.ping_misses = 0
        return ok

    def disable(self, ep: Endpoint, reason: str) -> None:
        """An upstream that refused our key (auth) or has no quota left: out for EJECT_MAX_S, never
        retried meanwhile (an active check answering 200 does not bring it back before then)."""
        now = time.monotonic()
        ep.healthy, ep.refused, ep.reason = False, True, reason
        ep.ejections += 1
        ep.ejected_until = now + EJECT_MAX_S
        log.warning("endpoint %s of pool %s out for %.0fs: %s", ep.id, ep.pool.name, EJECT_MAX_S, reason)
        self.on_eject(ep)
        ep.lost(now=now)

    # ---- liveness (black holes) ---------------------------------------------------------
    loop_lag = staticmethod(lambda: 0.0)     # seconds the gateway's event loop runs late (set by the app)

    async def ping(self, session: aiohttp.ClientSession, ep: Endpoint, timeout: float) -> bool:
        """One liveness round for an endpoint (see the module's text); False when it took it out."""
        to = aiohttp.ClientTimeout(total=timeout)
        for _ in range(2):
            try:
                async with session.get(ep.health_url, headers=ep.headers, timeout=to) as r:
                    if r.status == 200:
                        ep.ping_misses = 0
                        return True
                    reason = f"health: answered {r.status}"
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                if self.loop_lag() > timeout / 2:
                    return True                # our lateness, not the worker's
                ep.ping_misses += 1
                if ep.ping_misses < 2:
                    continue                   # confirm at once
                reason = f"liveness: no answer within {timeout:g}s, twice"
            except (aiohttp.ClientError, OSError) as e:
                reason = channel.refusal_of(e, ep.channel) or f"health: {type(e).__name__}"
            break
        if ep.healthy:
            log.warning("endpoint %s of pool %s is unhealthy (%s)", ep.id, ep.pool.name, reason)
            ep.healthy, ep.refused, ep.reason = False, True, reason     # lag-checked: really out
            self.on_eject(ep)
            ep.lost()
        return False

    async def liveness(self, session: aiohttp.ClientSession, interval: float, timeout: float) -> None:
        """Ping every available worker every ``interval`` (gateway.liveness_interval_s)."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            eps = []
            for ep in self.endpoints():
                if ep.available(now):
                    if not ep.external and ep.pool.role != "drained":
                        eps.append(ep)
                elif ep.streams:
                    ep.end_quiet_streams(now)
            if eps:
                await asyncio.gather(*(self.ping(session, ep, timeout) for ep in eps))

    @staticmethod
    async def _read_load(session: aiohttp.ClientSession, ep: Endpoint, to: aiohttp.ClientTimeout) -> None:
        try:
            async with session.get(ep.url + "/metrics", timeout=to) as r:
                if r.status != 200:
                    return
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return
        found = prometheus.collect(text, _LOAD)
        waiting = sum(found["vllm:num_requests_waiting"])
        kv = max(found["vllm:gpu_cache_usage_perc"] + found["vllm:kv_cache_usage_perc"], default=0.0)
        gpu = {name: found[name] for name in _DCGM if found[name]}
        ep.waiting, ep.kv_usage = waiting, kv
        # GPU figures, for metrics only (routing does not read them); MiB per GPU in DCGM's units
        util, used = gpu.get("DCGM_FI_DEV_GPU_UTIL"), gpu.get("DCGM_FI_DEV_FB_USED")
        free, reserved = gpu.get("DCGM_FI_DEV_FB_FREE"), gpu.get("DCGM_FI_DEV_FB_RESERVED", [])
        ep.gpu_util = sum(util) / len(util) / 100 if util else None
        ep.gpu_mem_used = sum(used) * 2**20 if used else None
        ep.gpu_mem_total = (sum(used) + sum(free) + sum(reserved)) * 2**20 if used and free else None

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        eps = [ep for ep in self.endpoints() if ep.pool.role != "drained"]
        if eps:
            await asyncio.gather(*(self.check(session, ep) for ep in eps))

    def status(self) -> list[dict[str, Any]]:
        """Admin view: per pool, endpoint health. Operators only: holds addresses."""
        now = time.monotonic()
        out = []
        for m in self.models.values():
            for p in m.pools:
                out.append({
                    "model": m.id, "pool": p.name, "provider": p.provider, "region": p.region,
                    "role": p.role, "weight": p.weight,
                    "endpoints": [{
                        "id": ep.id, "url": ep.url, "available": ep.available(now), "healthy": ep.healthy,
                        "channel": ep.channel, "reason": ep.reason,
                        "ejected_for_s": round(max(0.0, ep.ejected_until - now), 1),
                        "outstanding": ep.outstanding, "waiting": ep.waiting, "kv_usage": ep.kv_usage,
                        "ejections": ep.ejections, "consecutive_failures": ep.failures,
                        "ttft_ewma_ms": round(ep.ttft_ewma * 1000, 1), "slow_answers": ep.slow,
                    } for ep in p.endpoints],
                })
        return out


_DCGM = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_RESERVED")
_LOAD = ("vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc", *_DCGM)


def _configure(ep: Endpoint, entry: dict[str, Any], tls_dir: str | None = None) -> None:
    """Workers (vLLM or sim) are addressed by their root URL; an external OpenAI-compatible
    upstream (an entry with `credentials`) by its API base URL, with its key from the environment
    (INFERMESH_SECRET_<NAME>, set from the stack's secret) and `/models` as its health check.
    An ``mtls`` endpoint gets its client SSLContext from the TLS material its ``tls`` names in
    ``tls_dir`` (gateway/channel.py); material that cannot be loaded takes it out with the reason."""
    ep.headers = {"content-type": "application/json"}
    ep.channel = entry.get("channel", "")
    ep.ssl = None
    if ep.reason.startswith("config:"):
        ep.reason = ""
    if ep.channel == "mtls":
        try:
            ep.ssl = channel.endpoint_context(entry, tls_dir)
        except channel.ChannelError as e:
            ep.reason, ep.healthy, ep.refused = f"config: {e}", False, True
    secret = entry.get("credentials")
    if secret:
        ep.external, ep.api, ep.health_url = True, ep.url, ep.url + "/models"
        key = os.environ.get(secret_env_name(secret))
        if key:
            ep.headers["authorization"] = f"Bearer {key}"
    else:
        ep.external, ep.api, ep.health_url = False, ep.url + "/v1", ep.url + "/health"
    # parsed once: aiohttp would parse a string URL on every request
    ep.routes = {"chat": URL(ep.api + "/chat/completions"), "completions": URL(ep.api + "/completions"),
                 "responses": URL(ep.api + "/responses"), "embeddings": URL(ep.api + "/embeddings")}
