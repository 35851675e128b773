"""Synthetic probes: a known prompt to every pool every ``gateway.probe_interval_s`` seconds.

A probe is a streamed chat completion sent straight to one endpoint of the pool (round robin
over its endpoints, ejected and unhealthy ones included: a probe measures the pool, and a
pool whose workers are down must not look good). It passes when the worker answers 200, the
stream carries non-empty content and ends with ``[DONE]`` and no error event, and its TTFT and
TTLT are within the model's probe limits:

- TTFT limit: the strictest (lowest) ``slo.ttft_p95_ms`` of the tiers that serve the model;
- TTLT limit: the strictest ``slo.ttlt_p95_ms`` of those tiers (a probe asks for only
  ``PROBE_MAX_TOKENS`` tokens, so this is loose: it catches a stalled stream, not a slow one).

Tier-independent: one probe verifies what the most demanding customer of the model is promised.
A model no tier serves directly (a fallback only) gets the default ``Slo``'s limits.

A failed probe counts as one passive failure of the endpoint (gateway/router.py: three in a
row eject it); a passed one as a success. A probe that failed on TTFT alone counts only when
the router's outlier test finds the endpoint slow against its peers (as a slow answer to a
customer would): when every endpoint of a model is slow, the probes fail (the promise is not
met, and the pass rate says so) but nothing is ejected. Results go to metrics (``infermesh_probes`` by result,
``infermesh_probe_ttft_seconds``, ``infermesh_probe_pass_rate`` per pool over
``PASS_RATE_WINDOW_S``), to ``GET /admin/endpoints`` (per pool: pass rate, count, last result)
and to :class:`ProbeLog`, whose ``window(since)`` gives the per-pool pass counts the canary
analysis reads (``GET /admin/sli``, gateway/sli.py). Probes never reach the usage ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from fleet.spec import Slo, Spec
from gateway.backends import UpstreamLimits
from gateway.metrics import Metrics
from gateway.router import Endpoint, RoutePool, Router
from gateway.sla import Rollup

PROBE_PROMPT = "infermesh synthetic probe: reply with a few words."
PROBE_MAX_TOKENS = 4
PASS_RATE_WINDOW_S = 600.0


@dataclass(frozen=True)
class ProbeLimits:
    ttft_s: float
    ttlt_s: float


def limits_for(spec: Spec, model: str) -> ProbeLimits:
    """The model's probe limits: the strictest TTFT and TTLT SLO among the tiers serving it."""
    slos = [t.slo for t in spec.tiers if model in t.models] or [Slo()]
    return ProbeLimits(min(s.ttft_p95_ms for s in slos) / 1000, min(s.ttlt_p95_ms for s in slos) / 1000)


@dataclass
class ProbeResult:
    pool: str
    endpoint: str
    passed: bool
    result: str                  # pass | status | connect | ttft | ttlt | content | error_event | reset
    ttft_ms: float | None
    ttlt_ms: float | None
    at: float                    # wall clock

    def view(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "passed": self.passed, "result": self.result,
                "ttft_ms": self.ttft_ms, "ttlt_ms": self.ttlt_ms, "at": self.at}


class ProbeLog:
    """Probe outcomes per pool, in memory: ``window(since) -> {pool: {"passed": n, "total": n}}``."""

    def __init__(self, max_events: int = 100_000) -> None:
        self._events: deque[tuple[float, str, bool]] = deque(maxlen=max_events)
        self.last: dict[str, ProbeResult] = {}

    def record(self, r: ProbeResult) -> None:
        self._events.append((r.at, r.pool, r.passed))
        self.last[r.pool] = r

    def window(self, since: float) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t, pool, passed in reversed(self._events):
            if t < since:
                break
            c = out.setdefault(pool, {"passed": 0, "total": 0})
            c["total"] += 1
            c["passed"] += passed
        return out

    def pass_rates(self, since: float) -> dict[str, float]:
        return {pool: c["passed"] / c["total"] for pool, c in self.window(since).items() if c["total"]}


async def probe_embedding(session: aiohttp.ClientSession, ep: Endpoint, limits: ProbeLimits,
                          headers: dict[str, str]) -> ProbeResult:
    """One probe of an embedding model's endpoint: a vector for the probe text within the TTFT limit."""
    body = orjson.dumps({"model": ep.pool.send_model, "input": PROBE_PROMPT})
    started = time.perf_counter()
    result, took = "pass", None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(2.0, limits.ttft_s))
    try:
        async with asyncio.timeout(limits.ttft_s):
            async with session.post(ep.routes["embeddings"], data=body, headers=headers, timeout=timeout) as r:
                if r.status != 200:
                    result = "status"
                else:
                    data = orjson.loads(await r.read()).get("data") or [{}]
                    vector = data[0].get("embedding") if isinstance(data[0], dict) else None
                    result = "pass" if isinstance(vector, (list, str)) and vector else "content"
                took = round((time.perf_counter() - started) * 1000, 1)
    except TimeoutError:
        result = "ttft"
    except aiohttp.ClientConnectorError:
        result = "connect"
    except (aiohttp.ClientError, OSError, orjson.JSONDecodeError, AttributeError):
        result = "reset"
    return ProbeResult(ep.pool.name, ep.id, result == "pass", result, took, took, time.time())


async def probe(session: aiohttp.ClientSession, ep: Endpoint, limits: ProbeLimits,
                headers: dict[str, str], kind: str = "chat") -> ProbeResult:
    """One probe of one endpoint."""
    if kind == "embedding":
        return await probe_embedding(session, ep, limits, headers)
    body = orjson.dumps({"model": ep.pool.send_model, "messages": [{"role": "user", "content": PROBE_PROMPT}],
                         "max_tokens": PROBE_MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}})
    started = time.perf_counter()
    ttft = ttlt = None
    content = False

    def done(result: str) -> ProbeResult:
        ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
        return ProbeResult(ep.pool.name, ep.id, result == "pass", result, ms(ttft), ms(ttlt), time.time())

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(2.0, limits.ttft_s))
    loop = asyncio.get_running_loop()
    try:
        # Waits no longer than the TTFT limit for the first token (a hung worker must not hold
        # the round up), then up to the TTLT limit for the rest.
        async with asyncio.timeout(limits.ttft_s) as deadline:
            async with session.post(ep.routes["chat"], data=body, headers=headers,
                                    timeout=timeout) as resp:
                if resp.status != 200:
                    return done("status")
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        ttlt = time.perf_counter() - started
                        break
                    event = orjson.loads(data)
                    if "error" in event:
                        return done("error_event")
                    for c in event.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content") or c.get("text")
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - started
                                deadline.reschedule(loop.time() + max(0.0, limits.ttlt_s - ttft))
                            content = True
                else:
                    return done("reset")
    except TimeoutError:
        return done("ttlt" if ttft is not None else "ttft")
    except aiohttp.ClientConnectorError:
        return done("connect")
    except (aiohttp.ClientError, OSError, orjson.JSONDecodeError, AttributeError):
        return done("reset")
    if not content:
        return done("content")
    if ttft is not None and ttft > limits.ttft_s:     # (content means a first token: ttft is set)
        return done("ttft")
    return done("pass")


class Prober:
    """Probes every pool of every model (drained pools excepted) every ``probe_interval_s``. What it
    uses: the router (targets, health), the upstreams' own limits, the metrics, the SLA rollup's probe
    minutes, the spec (``spec``: replaced live with the gateway config); ``run`` is given the HTTP session."""

    def __init__(self, spec: Spec, router: Router, upstream_limits: UpstreamLimits, metrics: Metrics,
                 rollup: Rollup) -> None:
        self.spec, self.router, self.upstream_limits, self.metrics, self.rollup = (
            spec, router, upstream_limits, metrics, rollup)
        self.log = ProbeLog()
        self._turn: dict[str, int] = {}
        self._limits: dict[str, ProbeLimits] = {}

    def limits(self, model: str) -> ProbeLimits:
        lim = self._limits.get(model)
        if lim is None:
            lim = self._limits[model] = limits_for(self.spec, model)
        return lim

    def _target(self, pool: RoutePool) -> Endpoint:
        i = self._turn.get(pool.name, 0)
        self._turn[pool.name] = i + 1
        return pool.endpoints[i % len(pool.endpoints)]

    async def round(self, session: aiohttp.ClientSession) -> list[ProbeResult]:
        router, metrics, upstream_limits = self.router, self.metrics, self.upstream_limits
        targets = [(self._target(p), m.kind) for m in router.models.values() for p in m.pools
                   if p.role != "drained" and p.endpoints]
        # an upstream with declared limits is probed within them (gateway/state/upstream_limits.py): no slot, no probe
        slots: dict[Endpoint, str | None] = {}
        for ep, _ in targets:
            if ep.limits is not None:
                slots[ep] = await upstream_limits.take(*ep.limits)
        targets = [(ep, kind) for ep, kind in targets if ep.limits is None or slots[ep] is not None]
        try:
            results = await asyncio.gather(*(probe(session, ep, self.limits(ep.pool.model), ep.headers, kind)
                                             for ep, kind in targets))
        finally:
            for ep, slot in slots.items():
                if slot is not None and ep.limits is not None:
                    upstream_limits.give_back(ep.limits[0], slot)
        for (ep, _), r in zip(targets, results, strict=True):
            self.log.record(r)
            pool = ep.pool
            self.rollup.probe(r.at, pool.model, pool.region, r.passed)     # the SLA's probe minutes
            metrics.probes.labels(pool.model, pool.name, r.result).inc()
            if r.ttft_ms is not None:
                metrics.probe_ttft.labels(pool.model, pool.name).observe(r.ttft_ms / 1000)
            if r.passed:
                if r.ttft_ms is not None:      # always, for a passed probe
                    router.observe_ttft(ep, r.ttft_ms / 1000)
                router.success(ep)
            elif r.result == "ttft":
                # Slowness goes through the request path's outlier test: a model slow everywhere
                # (overload) ejects nothing. A probe that got no token in time counts just over its limit.
                limit = self.limits(pool.model).ttft_s
                seconds = r.ttft_ms / 1000 if r.ttft_ms is not None else limit + 0.001
                if router.observe_ttft(ep, seconds):
                    router.failure(ep, cause="probe: ttft")
            else:
                router.failure(ep, cause=f"probe: {r.result}")
        rates = self.log.pass_rates(time.time() - PASS_RATE_WINDOW_S)
        for m in router.models.values():
            for p in m.pools:
                if p.name in rates:
                    metrics.probe_pass_rate.labels(m.id, p.name).set(rates[p.name])
        return results

    async def run(self, session: aiohttp.ClientSession) -> None:
        interval = self.spec.gateway.probe_interval_s
        while True:
            started = time.monotonic()
            with contextlib.suppress(Exception):      # a probe bug must never stop the loop
                await self.round(session)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def status(self) -> dict[str, dict[str, Any]]:
        """Per pool: probes and pass rate over the last PASS_RATE_WINDOW_S, and the last result."""
        window = self.log.window(time.time() - PASS_RATE_WINDOW_S)
        out = {}
        for pool, last in self.log.last.items():
            c = window.get(pool, {"passed": 0, "total": 0})
            out[pool] = {"probes": c["total"], "pass_rate": round(c["passed"] / c["total"], 4) if c["total"] else None,
                         "window_s": PASS_RATE_WINDOW_S, "last": last.view()}
        return out
