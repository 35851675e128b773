"""Is an SLO at risk right now? An in-memory rolling window per model, for degrading.

While a tier's SLO is at risk for the requested model, the gateway caps ``max_tokens`` of that
tier's requests at ``Tier.degraded_max_output_tokens`` (when set): shorter answers free
capacity sooner, which is what brings TTFT back down. The ledger is never queried on the
request path: the app feeds every routed request's outcome in (:meth:`RiskWindow.observe`).

"At risk", for a tier and a model, over the model's last ``WINDOW_S`` (60) seconds of requests
from every tier, once at least ``MIN_SAMPLES`` (10) requests were seen:

- the p95 TTFT of the model's successful requests exceeds the tier's ``slo.ttft_p95_ms``; or
- the share of the model's requests that ended in a 5xx exceeds the tier's error budget share
  (``1 - slo.availability / 100``): the budget is burning faster than 1x at request level.

The statistics are recomputed at most once a second per model, so a check is a dict look-up.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from gateway.sli import percentile

if TYPE_CHECKING:
    from fleet.spec import Tier
    from gateway.ledger import UsageRecord
    from gateway.metrics import Metrics
    from gateway.router import Router

WINDOW_S = 60.0
MIN_SAMPLES = 10
REFRESH_S = 1.0
MAX_EVENTS = 5000


class RiskWindow:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._events: dict[str, deque[tuple[float, float | None, bool]]] = {}
        self._stats: dict[str, tuple[float, int, float, float]] = {}   # model -> (at, n, p95 ttft ms, 5xx share)

    def observe(self, model: str, ttft_ms: float | None, server_error: bool) -> None:
        q = self._events.get(model)
        if q is None:
            q = self._events[model] = deque(maxlen=MAX_EVENTS)
        q.append((time.monotonic(), ttft_ms, server_error))

    def stats(self, model: str) -> tuple[int, float, float]:
        """(requests, p95 TTFT ms, 5xx share) over the window; cached for REFRESH_S."""
        now = time.monotonic()
        cached = self._stats.get(model)
        if cached is not None and now - cached[0] < REFRESH_S:
            return cached[1:]
        q = self._events.get(model) or deque()
        while q and q[0][0] < now - self.window_s:
            q.popleft()
        p95 = percentile([t for _, t, _ in q if t is not None], 95) or 0.0
        errors = sum(1 for *_, e in q if e)
        out = (len(q), p95, errors / len(q) if q else 0.0)
        self._stats[model] = (now, *out)
        return out

    def at_risk(self, model: str, tier: Tier) -> bool:
        n, p95, error_share = self.stats(model)
        if n < MIN_SAMPLES:
            return False
        return p95 > tier.slo.ttft_p95_ms or error_share > 1 - tier.slo.availability / 100


class Degrading(Protocol):
    """What the breaker uses of admission (gateway/admission.py): the catalogue, the metrics and its cap."""

    router: Router
    metrics: Metrics

    def degrade(self, payload: dict[str, Any], tier: Tier, model: str, max_output: int,
                headers: dict[str, str]) -> int: ...


class Breaker:
    """The seeds' latency circuit breaker, per model: *open* while the model's p95 TTFT over the last
    ``gateway.degrade.window_s`` (its own requests, as served: answers from a fallback count for
    the fallback) exceeds the strictest ``slo.ttft_p95_ms`` of the tiers that serve it, once
    MIN_SAMPLES answers were seen. While open, each request's tier contract (``tiers[].degrade``)
    says what applies to it, checked in this order:

    - ``fallback`` (below the model's top tier, with a fallback model): served by the fallback,
      marked as a runtime fallback is (x-infermesh-fallback, the ledger's ``fallback``);
    - ``shed`` (below the model's top tier): 429 ``degraded_shed`` with Retry-After;
    - ``pause_long_prompts``: a prompt over ``long_prompt_tokens`` gets 429 ``long_prompt_paused``;
    - ``cap_max_tokens``: max_tokens capped at the tier's ``degraded_max_output_tokens``.

    Each action is counted in ``infermesh_degradations{model,tier,action}``; the breaker's state is
    ``infermesh_breaker_open{model}``; refusals are ledger rows with their error code."""

    def __init__(self, spec, registry) -> None:
        from prometheus_client import Counter, Gauge

        self.window = RiskWindow(spec.gateway.degrade.window_s)
        self.long_prompt = spec.gateway.degrade.long_prompt_tokens
        self.limit_ms: dict[str, float] = {}
        self.top: dict[str, int] = {}
        for t in spec.tiers:
            for m in t.models:
                self.limit_ms[m] = min(self.limit_ms.get(m, float("inf")), t.slo.ttft_p95_ms)
                self.top[m] = max(self.top.get(m, 0), t.priority)
        self.fallback = {m.id: m.fallback for m in spec.models}
        self.used = any(t.degrade for t in spec.tiers)
        self.actions = Counter("infermesh_degradations", "Requests degraded by the latency breaker",
                               ("model", "tier", "action"), registry=registry)
        self.state = Gauge("infermesh_breaker_open", "1 while a model's p95 TTFT is over its SLO for the "
                           "breaker's window", ("model",), registry=registry)

    def observe(self, model: str, ttft_ms: float | None, server_error: bool) -> None:
        if self.used:
            self.window.observe(model, ttft_ms, server_error)

    def open(self, model: str) -> bool:
        n, p95, _ = self.window.stats(model)
        is_open = n >= MIN_SAMPLES and p95 > self.limit_ms.get(model, float("inf"))
        self.state.labels(model).set(1 if is_open else 0)
        return is_open

    def route(self, admission: Degrading, tier: Tier, model: str, rec: UsageRecord, headers: dict[str, str]) -> str:
        """The model a request is served by, or an ApiError (shed) while the model's breaker is open."""
        if not tier.degrade or not self.open(model) or tier.priority >= self.top.get(model, 0):
            return model
        fallback = self.fallback.get(model)
        if "fallback" in tier.degrade and fallback and admission.router.has_model(fallback):
            rec.fallback = True
            headers["x-infermesh-fallback"] = fallback      # counted in limit(), once it is not paused
            return fallback
        if "shed" in tier.degrade:
            from gateway.errors import ApiError
            self.actions.labels(model, tier.name, "shed").inc()
            raise ApiError(429, "The model is slower than its target right now; your plan's requests are paused. "
                                "Please retry shortly.", code="degraded_shed", headers={"retry-after": "30"})
        return model

    def limit(self, admission: Degrading, tier: Tier, model: str, prompt_tokens: int, payload: dict[str, Any],
              max_output: int, headers: dict[str, str]) -> int:
        """Long prompts paused and max_tokens capped, per the tier's contract, while the breaker of the
        model the client asked for (``model``) is open."""
        if not tier.degrade or not self.open(model):
            return max_output
        if "pause_long_prompts" in tier.degrade and prompt_tokens > self.long_prompt:
            from gateway.errors import ApiError
            self.actions.labels(model, tier.name, "pause_long_prompts").inc()
            raise ApiError(429, f"Prompts over {self.long_prompt} tokens are paused while the model is slower than "
                                "its target. Please retry shortly or send a shorter prompt.",
                           code="long_prompt_paused", headers={"retry-after": "30"})
        fallback = headers.get("x-infermesh-fallback")
        if fallback is not None:
            self.actions.labels(model, tier.name, "fallback").inc()
            admission.metrics.fallbacks.labels(model, fallback, tier.name).inc()
        if "cap_max_tokens" in tier.degrade and tier.degraded_max_output_tokens:
            max_output = admission.degrade(payload, tier, model, max_output, headers)
            if headers.get("x-infermesh-degraded") == "max_tokens":     # capped (here or by the SLO-risk cap)
                self.actions.labels(model, tier.name, "cap_max_tokens").inc()
        return max_output
