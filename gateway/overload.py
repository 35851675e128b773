"""How far behind the gateway's event loop runs: the overload signal that an in-flight count misses.

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
anyone, while a loop that stays late does. ``Gateway.shed`` refuses the lowest tiers first,
at the same shares of the limit as for the in-flight budget.
"""

from __future__ import annotations

import asyncio


class LoopLag:
    PROBE_S = 0.05
    ALPHA = 0.2

    def __init__(self) -> None:
        self.mean = 0.0            # seconds late, smoothed: what shedding reads
        self.last = 0.0            # the latest sample

    def observe(self, late: float) -> None:
        self.last = late
        self.mean += self.ALPHA * (late - self.mean)

    async def run(self, gauge=None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.PROBE_S)
            self.observe(max(0.0, loop.time() - asked - self.PROBE_S))
            if gauge is not None:
                gauge.set(self.mean)
