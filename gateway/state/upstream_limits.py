"""An external upstream's own limits (the overflow, e.g. GonkaGate: 50 concurrent requests and 600
per minute per key), enforced by the gateway so that they are never exceeded.

The stack declares them on the provider (``providers[].max_concurrency``, ``providers[].rpm``);
the routing config carries them on each of its endpoints, keyed by the provider's credentials
(the limit is the key's, shared by every pool and region that uses it). Before an attempt on
such an endpoint the call takes a *slot*: one of the concurrent requests, and one of the
requests of the last 60 s. With no slot the endpoint is skipped for this request (another
endpoint, pool or the fallback serves it; nothing at all: 503 no_capacity), never queued at
the upstream. The slot is given back when the attempt ends (a stream: when it ends).

- One replica (``limits: local``): counters in the process.
- Replicas (``limits: redis``): one Lua call on Redis per take, atomic across replicas; a slot
  is a member of a sorted set scored by its expiry (``LEASE_S``), so a replica that dies
  holding slots gives them back when they expire. The minute's requests are a second sorted
  set (a sliding window of 60 s). While Redis is unreachable nothing is sent to the upstream
  (its limits cannot be proven): fail closed, the other endpoints serve.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid

log = logging.getLogger("infermesh.state")
LEASE_S = 600.0                  # a slot a dead replica held is free again after this

# KEYS: concurrency set, minute set. ARGV: slot id, max concurrent (0: none), rpm (0: none), lease.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local conc, rpm = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60)
if conc > 0 and redis.call('ZCARD', KEYS[1]) >= conc then return 0 end
if rpm > 0 and redis.call('ZCARD', KEYS[2]) >= rpm then return -1 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4])) + 60)
redis.call('EXPIRE', KEYS[2], 120)
return 1
"""


class LocalUpstreamLimits:
    """Per-process counters (one replica)."""

    def __init__(self) -> None:
        self.running: dict[str, int] = collections.Counter()
        self.minute: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    async def take(self, key: str, max_concurrency: int, rpm: int) -> str | None:
        now = time.monotonic()
        window = self.minute[key]
        while window and window[0] <= now - 60:
            window.popleft()
        if max_concurrency and self.running[key] >= max_concurrency:
            return None
        if rpm and len(window) >= rpm:
            return None
        self.running[key] += 1
        window.append(now)
        return key

    def give_back(self, key: str, slot: str) -> None:
        self.running[key] -= 1


class RedisUpstreamLimits:
    """Shared by every replica (see the module's text)."""

    def __init__(self, url: str, prefix: str) -> None:
        from redis.asyncio import Redis

        self.redis = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.prefix = prefix + "upstream:"
        self._take = self.redis.register_script(TAKE)
        self._pending: set = set()

    async def take(self, key: str, max_concurrency: int, rpm: int) -> str | None:
        from redis.exceptions import RedisError

        slot = uuid.uuid4().hex
        try:
            got = await self._take(keys=[self.prefix + key + ":c", self.prefix + key + ":m"],
                                   args=[slot, max_concurrency, rpm, LEASE_S])
        except (RedisError, OSError) as e:
            log.warning("upstream limits unavailable (%s): the upstream is skipped", type(e).__name__)
            return None
        return slot if got == 1 else None

    def give_back(self, key: str, slot: str) -> None:
        import asyncio

        task = asyncio.ensure_future(self._give_back(key, slot))     # the request does not wait for it
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _give_back(self, key: str, slot: str) -> None:
        from redis.exceptions import RedisError

        try:
            await self.redis.zrem(self.prefix + key + ":c", slot)
        except (RedisError, OSError):
            pass                                  # it expires after LEASE_S

    async def close(self) -> None:
        await self.redis.aclose()
