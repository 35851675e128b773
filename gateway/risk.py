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

import math
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.spec import Tier

WINDOW_S = 60.0
MIN_SAMPLES = 10
REFRESH_S = 1.0
MAX_EVENTS = 5000


class RiskWindow:
    def __init__(self) -> None:
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
        while q and q[0][0] < now - WINDOW_S:
            q.popleft()
        ttfts = sorted(t for _, t, _ in q if t is not None)
        p95 = ttfts[max(0, math.ceil(0.95 * len(ttfts)) - 1)] if ttfts else 0.0
        errors = sum(1 for *_, e in q if e)
        out = (len(q), p95, errors / len(q) if q else 0.0)
        self._stats[model] = (now, *out)
        return out

    def at_risk(self, model: str, tier: Tier) -> bool:
        n, p95, error_share = self.stats(model)
        if n < MIN_SAMPLES:
            return False
        return p95 > tier.slo.ttft_p95_ms or error_share > 1 - tier.slo.availability / 100
