"""The event loop's lateness as the overload signal (gateway/overload.py): one slow moment is
smoothed away, a loop that stays late is not, and it comes back down once the loop is free.
The whole gateway under a stalled loop is drilled in tests/test_drills.py."""

from __future__ import annotations

import asyncio
import time

from gateway.overload import LoopLag


async def test_one_slow_moment_is_smoothed_a_loop_that_stays_late_is_not():
    lag = LoopLag()
    probe = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.3)
        assert lag.mean < 0.02
        time.sleep(0.08)                    # one pause (a GC pass, a slow flush): the loop blocked once
        await asyncio.sleep(0.12)
        assert 0.005 < lag.mean < 0.05, lag.mean   # seen, and well under the lowest tier's 70 ms
        for _ in range(12):                 # a loop with more work than time: late at every turn
            time.sleep(0.15)
            await asyncio.sleep(0)
        assert lag.mean > 0.1, lag.mean     # past the default limit (100 ms)
        await asyncio.sleep(1.2)
        assert lag.mean < 0.02, lag.mean
        time.sleep(0.5)                     # a stall, read before the probe has woken from it
        assert lag.mean < 0.02 and lag.level() > 0.09, (lag.mean, lag.level())
    finally:
        probe.cancel()
