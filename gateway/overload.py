"""The gateway's two overload signals: how many admitted requests are in flight, and how far
behind its event loop runs (the signal that an in-flight count misses).

One gateway process is one event loop on one core. When the core is saturated (bench/ S3:
1,000 streams at 50 tokens/s need more than one core can relay), every callback waits its
turn: a new request's first token waits behind everyone else's relaying, and TTFT grows
without bound (seconds, then client timeouts), though ``gateway.max_in_flight`` was never
reached. The in-flight count cannot know what a core can carry; the loop's lateness measures
it directly, the way event-loop servers shed (Node's toobusy, Envoy's overload manager on its
own resource monitors).

A probe sleeps PROBE_S and records how much later than asked it woke. The shedder reads an
exponentially weighted mean of those samples (``ALPHA`` per sample: about a quarter of a second
of memory at 50 ms probes), so one slow moment (a GC pass, a slow disk flush) does not refuse
anyone, while a loop that stays late does. A probe that is overdue right now counts as if it
had just woken (``level``): after a long stall the requests that waited through it can run
before the probe's own wake-up does. ``Admission.shed`` (gateway/admission.py) refuses the lowest
tiers first, at the same shares of the limit as for the in-flight budget.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Gauge


class InFlightCount:
    """Admitted requests not yet answered, gateway-wide (``gateway.max_in_flight``): raised by
    admission before it sheds (the request counts itself), lowered by the meter when the answer,
    or the stream, ends (``Meter.end``); mirrored in the ``infermesh_in_flight`` gauge."""

    __slots__ = ("n", "gauge")

    def __init__(self, gauge: Gauge) -> None:
        self.n = 0
        self.gauge = gauge

    def enter(self) -> None:
        self.n += 1
        self.gauge.inc()

    def leave(self) -> None:
        self.n -= 1
        self.gauge.dec()


class LoopLag:
    PROBE_S = 0.05
    ALPHA = 0.2

    def __init__(self) -> None:
        self.mean = 0.0            # seconds late, smoothed
        self.due = float("inf")    # when the sleeping probe should wake (time.monotonic)

    def observe(self, late: float) -> None:
        self.mean += self.ALPHA * (late - self.mean)

    def level(self) -> float:
        """What shedding reads: the smoothed lateness, with the probe's own delay counted as a
        sample if it is overdue now."""
        overdue = time.monotonic() - self.due
        return self.mean + self.ALPHA * (overdue - self.mean) if overdue > self.mean else self.mean

    async def run(self, gauge: Gauge | None = None) -> None:
        while True:
            self.due = time.monotonic() + self.PROBE_S
            await asyncio.sleep(self.PROBE_S)
            self.observe(max(0.0, time.monotonic() - self.due))
            if gauge is not None:
                gauge.set(self.mean)
