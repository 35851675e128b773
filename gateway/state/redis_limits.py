"""Rate limits shared by every gateway replica, in Redis: one atomic Lua call per request.

The buckets are the embedded limiter's (gateway/limits.py): per tenant, and per key where the
tier sets key_rpm/key_tpm; each a Redis hash {l: level, s: stamp, c: capacity}. ``ADMIT``
refills every bucket of the request from Redis's own clock (replicas' clocks never matter),
checks them all, and takes from all or none: one round trip (EVALSHA), no race between
replicas. ``SETTLE`` gives back (or takes) the difference between the up-front token charge and
the usage the upstream reported, for the responses of the last 20 ms at once. A bucket left
alone expires once it would be full again, which is what a missing bucket means, so Redis holds
only active tenants.

Outage: any Redis error marks it down (one log line, gauge 0) and the request is decided
locally — per-process buckets for tiers that fail open, a 503 for tiers that fail closed. While
down no request touches Redis (no reconnect storm): one PING per replica, backing off from
0.5 s to 2 s with jitter, finds it back within ~2.5 s of Redis answering, and the next request
uses the shared buckets again (as Redis kept them, or full if it kept nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.limits import LimitDecision, LocalLimiter, decide, plan

if TYPE_CHECKING:
    from fleet.spec import Tier
    from gateway.state.health import Health

log = logging.getLogger("infermesh.state")

# KEYS: the request buckets, then the token buckets. ARGV: tokens wanted, number of request
# buckets, then each bucket's capacity (per minute). Returns {allowed, level_1, wait_1, ...}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local want = tonumber(ARGV[1])
local nreq = tonumber(ARGV[2])
local level, cap, take, wait = {}, {}, {}, {}
local ok = 1
for i = 1, #KEYS do
  local c = tonumber(ARGV[2 + i])
  local h = redis.call('HMGET', KEYS[i], 'l', 's', 'c')
  local l, s, oc = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if l == nil then
    l = c
  else
    if oc ~= nil and oc ~= c then l = l * c / oc end
    l = math.min(c, l + math.max(0, now - s) * c / 60)
  end
  local a = 1
  if i > nreq then a = math.min(want, c) end
  local w = 0
  if a > l then
    w = (a - l) * 60 / c
    ok = 0
  end
  level[i], cap[i], take[i], wait[i] = l, c, a, w
end
local out = {ok}
for i = 1, #KEYS do
  if ok == 1 then level[i] = level[i] - take[i] end
  redis.call('HSET', KEYS[i], 'l', tostring(level[i]), 's', tostring(now), 'c', tostring(cap[i]))
  redis.call('PEXPIRE', KEYS[i], math.ceil((cap[i] - level[i]) * 60000 / cap[i]) + 1000)
  out[#out + 1] = tostring(level[i])
  out[#out + 1] = tostring(wait[i])
end
return out
"""

# KEYS: token buckets; ARGV[i]: tokens to give back to KEYS[i] (charged - actual; negative takes more).
SETTLE = """
for i = 1, #KEYS do
  local d = tonumber(ARGV[i])
  local h = redis.call('HMGET', KEYS[i], 'l', 'c')
  local l, c = tonumber(h[1]), tonumber(h[2])
  if l ~= nil and c ~= nil then
    l = math.min(c, l + d)
    redis.call('HSET', KEYS[i], 'l', tostring(l))
    redis.call('PEXPIRE', KEYS[i], math.ceil((c - l) * 60000 / c) + 1000)
  end
end
return 0
"""


# Spend per key and month. KEYS[1]: the key's counter for the month (micro-dollars spent and held).
# ARGV: limit, amount to hold, the ledger's sum to start from ('' when not read yet). Returns
# {1, level} held, {0, level} over the limit, {-1, 0} unknown month (call again with the ledger's sum).
SPEND = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  if ARGV[3] == '' then return {-1, '0'} end
  cur = ARGV[3]
  redis.call('SET', KEYS[1], cur)
end
cur = tonumber(cur)
local limit, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
if cur + amount > limit then return {0, tostring(cur)} end
redis.call('INCRBY', KEYS[1], amount)
redis.call('EXPIRE', KEYS[1], 3456000)
return {1, tostring(cur + amount)}
"""
# KEYS[1]: the counter; ARGV[1]: actual - held. A counter Redis lost is left to the next seed.
SPEND_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
return 0
"""


class RedisLimiter:
    def __init__(self, url: str, prefix: str, fails_open: Callable[[Tier], bool], health: Health,
                 timeout: float = 1.0, probe_interval: float = 0.5, max_backoff: float = 2.0) -> None:
        # ``timeout``: a call's socket deadline, which also counts the time this process's event loop
        # takes to read the answer. Redis answers in about a millisecond; at 0.25 s a loaded 2-core
        # machine (three replicas, their clients) marked a healthy Redis down, and every replica then
        # held a key's spend against its own counter: 132 requests admitted against a limit of 54
        # (tests/test_spend_shared.py, a fresh-clone CI run). A second of silence is a real outage.
        self.prefix = prefix
        self.fails_open = fails_open
        self.health = health
        self.probe_interval, self.max_backoff = probe_interval, max_backoff
        self.local = LocalLimiter()
        # no retries: an error marks Redis down at once, and the probe (not requests) reconnects
        self.redis = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                    retry=Retry(NoBackoff(), 0), decode_responses=True)
        self._admit = self.redis.register_script(ADMIT)
        self._settle = self.redis.register_script(SETTLE)
        self._spend = self.redis.register_script(SPEND)
        self._spend_settle = self.redis.register_script(SPEND_SETTLE)
        self._settling: set[asyncio.Task] = set()
        self.up = True
        self._probe: asyncio.Task | None = None
        self.settle_delay = 0.02
        self._pending: dict[tuple[str, str], int] = {}
        self._flusher: asyncio.Task | None = None
        health.register("redis", "limits")

    def _key(self, tenant: str, scope: str, kind: str) -> str:
        # the tenant in braces: a request's buckets share one hash slot (Redis Cluster)
        return f"{self.prefix}rl:{{{tenant}}}:{scope}:{kind}"

    async def admit(self, tenant: str, key_id: str, tier: Tier, tokens: int) -> LimitDecision:
        if self.up:
            p = plan(tenant, key_id, tier, tokens)
            keys = ([self._key(tenant, s, "r") for s, _ in p.requests]
                    + [self._key(tenant, s, "t") for s, _ in p.tokens])
            caps = [c for _, c in p.requests] + [c for _, c in p.tokens]
            try:
                out = await self._admit(keys=keys, args=[tokens, len(p.requests), *caps])
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                self._down(e)
            else:
                vals = [(float(out[1 + 2 * i]), float(out[2 + 2 * i])) for i in range(len(keys))]
                n = len(p.requests)
                return decide(p, vals[:n], vals[n:], bool(int(out[0])))
        if self.fails_open(tier):
            return self.local.admit_now(tenant, key_id, tier, tokens)
        return LimitDecision(False, {"retry-after": "1"}, 1.0, "shared limits unavailable", unavailable=True)

    def _spend_key(self, key_id: str, month: str) -> str:
        return f"{self.prefix}spend:{key_id}:{month}"

    async def reserve_spend(self, key_id: str, month: str, limit: int, amount: int, tier: Tier,
                            seed: Callable[[], Awaitable[int]]) -> bool | None:
        """One atomic script call (two when the month must be started from the ledger): every replica
        holds against the same counter, so a key's replicas together never pass its limit. Redis down:
        this process's own counter (started from the ledger) for tiers that fail open; None otherwise."""
        if self.up:
            key = self._spend_key(key_id, month)
            try:
                out = await self._spend(keys=[key], args=[limit, amount, ""])
                if int(out[0]) == -1:
                    out = await self._spend(keys=[key], args=[limit, amount, await seed()])
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                self._down(e)
            else:
                return int(out[0]) == 1
        if self.fails_open(tier):
            return await self.local.reserve_spend(key_id, month, limit, amount, tier, seed)
        return None

    def settle_spend(self, key_id: str, month: str, delta: int) -> None:
        if not delta:
            return
        if not self.up:
            self.local.settle_spend_now(key_id, month, delta)
            return
        task = asyncio.create_task(self._settle_spend(key_id, month, delta))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_spend(self, key_id: str, month: str, delta: int) -> None:
        try:
            await self._spend_settle(keys=[self._spend_key(key_id, month)], args=[delta])
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._down(e)

    def settle(self, tenant: str, key_id: str, charged: int, actual: int) -> None:
        """Queue the correction; corrections of the next settle_delay go to Redis together
        (one round trip per tenant, pipelined), so under load settling costs far less than one
        round trip per request. Buckets are corrected within ~settle_delay of a response."""
        if charged == actual:
            return
        if not self.up:
            self.local.settle_now(tenant, key_id, charged, actual)
            return
        for key in (self._key(tenant, "t:" + tenant, "t"), self._key(tenant, "k:" + key_id, "t")):
            self._pending[(tenant, key)] = self._pending.get((tenant, key), 0) + charged - actual
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.settle_delay)
        await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        by_tenant: dict[str, list[tuple[str, int]]] = {}
        for (tenant, key), delta in pending.items():
            if delta:
                by_tenant.setdefault(tenant, []).append((key, delta))
        if not by_tenant or not self.up:
            return
        calls = [([k for k, _ in items], [d for _, d in items]) for items in by_tenant.values()]
        try:
            if len(calls) == 1:
                await self._settle(keys=calls[0][0], args=calls[0][1])
            else:    # one tenant's buckets per script call (one hash slot), all in one round trip
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        await self._settle(keys=keys, args=args, client=pipe)
                    await pipe.execute()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._down(e)

    def _down(self, error: BaseException) -> None:
        if self.up:
            self.up = False
            self.health.report("redis", "limits", False, error)

    async def _probe_loop(self) -> None:
        """One PING per probe_interval while up; while down, PINGs back off (doubling up to
        max_backoff, with jitter so replicas do not probe in step): no reconnect storm."""
        delay = self.probe_interval
        while True:
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            try:
                await self.redis.ping()
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                self._down(e)
                delay = min(self.max_backoff, delay * 2)
                continue
            delay = self.probe_interval
            if not self.up:
                with contextlib.suppress(Exception):      # connections from before the outage: fresh ones
                    await self.redis.connection_pool.disconnect()
                self.up = True
                self.health.report("redis", "limits", True)

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._down(e)
        self._probe = asyncio.create_task(self._probe_loop())

    async def stop(self) -> None:
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=1.0)
        if self._flusher is not None:
            self._flusher.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 1.0)
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        with contextlib.suppress(Exception):
            await self.redis.aclose()
