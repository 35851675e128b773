"""Rate limits per tenant and per key: requests and tokens per minute, as token buckets.

A bucket holds up to one minute's allowance and refills continuously. Tokens are charged
up front with an estimate (prompt estimate + max_tokens, as OpenAI does) and corrected once
the upstream's ``usage`` is known, so long completions count what they really produced.
The headers follow OpenAI's: x-ratelimit-{limit,remaining,reset}-{requests,tokens}; where a
key has its own limits (Tier.key_rpm / key_tpm) the headers show the tighter of key and tenant.

Two implementations with one interface (``await admit``, plain ``settle``): :class:`LocalLimiter`
(in-process, one replica) and ``gateway.state.redis_limits.RedisLimiter`` (shared by replicas,
one atomic Lua round trip per request). Both take every bucket of a request or none.

Both also keep each spend-limited key's spend per calendar month (micro-dollars, at its tier's
prices): ``reserve_spend`` holds the most a request can cost before it is dispatched (refused when
that would pass the key's limit), ``settle_spend`` replaces the hold with what it cost. A month
unknown to the store (a new process, Redis restarted) starts from the ledger's sum for the key.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.spec import Tier


@dataclass(slots=True)
class Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def seconds_until(self, amount: float) -> float:
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity


@dataclass(slots=True)
class LimitDecision:
    allowed: bool
    headers: dict[str, str]
    retry_after: float = 0.0
    reason: str = ""
    unavailable: bool = False     # shared limits unreachable and the tier fails closed


@dataclass(frozen=True, slots=True)
class LimitPlan:
    """The buckets one request touches: (scope, capacity) pairs for requests and for tokens."""

    requests: tuple[tuple[str, int], ...]
    tokens: tuple[tuple[str, int], ...]
    want: int = field(default=0)


def plan(tenant: str, key_id: str, tier: Tier, tokens: int) -> LimitPlan:
    req = [("t:" + tenant, tier.rpm)]
    tok = [("t:" + tenant, tier.tpm)]
    if tier.key_rpm:
        req.append(("k:" + key_id, tier.key_rpm))
    if tier.key_tpm:
        tok.append(("k:" + key_id, tier.key_tpm))
    return LimitPlan(tuple(req), tuple(tok), tokens)


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds < 60 else f"{seconds / 60:.1f}m"


def decide(p: LimitPlan, req: list[tuple[float, float]], tok: list[tuple[float, float]],
           allowed: bool) -> LimitDecision:
    """Headers and verdict from each bucket's (level after the take, wait) — shared by both limiters,
    so they answer alike. The headers show the tightest bucket of each kind."""
    def tightest(caps, states):
        i = min(range(len(states)), key=lambda j: (math.floor(states[j][0]), j))
        cap, level = caps[i][1], states[i][0]
        return cap, level, max(0.0, (cap - level) * 60.0 / cap)

    rcap, rlevel, rreset = tightest(p.requests, req)
    tcap, tlevel, treset = tightest(p.tokens, tok)
    headers = {
        "x-ratelimit-limit-requests": str(rcap),
        "x-ratelimit-remaining-requests": str(max(0, math.floor(rlevel))),
        "x-ratelimit-reset-requests": _fmt(rreset),
        "x-ratelimit-limit-tokens": str(tcap),
        "x-ratelimit-remaining-tokens": str(max(0, math.floor(tlevel))),
        "x-ratelimit-reset-tokens": _fmt(treset),
    }
    if allowed:
        return LimitDecision(True, headers)
    wait_req = max(w for _, w in req)
    wait_tok = max(w for _, w in tok)
    retry = max(wait_req, wait_tok)
    headers["retry-after"] = str(max(1, math.ceil(retry)))
    reason = "requests per minute" if wait_req >= wait_tok else "tokens per minute"
    return LimitDecision(False, headers, retry, reason)


class LocalLimiter:
    """In-process buckets: exact for one replica; per-process (so N x the limit) across N."""

    def __init__(self) -> None:
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self._spend: dict[tuple[str, str], int] = {}     # (key id, YYYY-MM) -> micro-dollars spent and held

    # ---- spend per key and calendar month (key scopes, docs/money.md) ----------------------------
    def reserve_spend_now(self, key_id: str, month: str, limit: int, amount: int, seed: int | None) -> bool | None:
        """Hold `amount` micro-dollars of the key's month if that stays within `limit`: True (held),
        False (over the limit). None: the month's spend is not known here yet (call again with `seed`,
        what the ledger says was spent)."""
        k = (key_id, month)
        cur = self._spend.get(k)
        if cur is None:
            if seed is None:
                return None
            cur = self._spend[k] = seed
        if cur + amount > limit:
            return False
        self._spend[k] = cur + amount
        return True

    def settle_spend_now(self, key_id: str, month: str, delta: int) -> None:
        """What a held request really cost: delta = actual - held (negative gives back)."""
        k = (key_id, month)
        if k in self._spend:
            self._spend[k] += delta

    async def reserve_spend(self, key_id: str, month: str, limit: int, amount: int, tier: Tier,
                            seed: Callable[[], Awaitable[int]]) -> bool | None:
        got = self.reserve_spend_now(key_id, month, limit, amount, None)
        if got is None:
            got = self.reserve_spend_now(key_id, month, limit, amount, await seed())
        return got

    def settle_spend(self, key_id: str, month: str, delta: int) -> None:
        if delta:
            self.settle_spend_now(key_id, month, delta)

    def _bucket(self, table: dict[str, Bucket], key: str, capacity: float, now: float) -> Bucket:
        b = table.get(key)
        if b is None:
            b = table[key] = Bucket(capacity, capacity, now)
        elif b.capacity != capacity:          # tier changed: keep the used share
            b.level = b.level * capacity / b.capacity
            b.capacity = capacity
        b.refill(now)
        return b

    def admit_now(self, tenant: str, key_id: str, tier: Tier, tokens: int) -> LimitDecision:
        p = plan(tenant, key_id, tier, tokens)
        now = time.monotonic()
        reqs = [self._bucket(self._requests, k, cap, now) for k, cap in p.requests]
        toks = [self._bucket(self._tokens, k, cap, now) for k, cap in p.tokens]
        # a request larger than a minute's allowance waits a full minute
        req_waits = [b.seconds_until(1) for b in reqs]
        tok_takes = [min(tokens, b.capacity) for b in toks]
        tok_waits = [b.seconds_until(t) for b, t in zip(toks, tok_takes, strict=True)]
        allowed = not any(req_waits) and not any(tok_waits)
        if allowed:
            for b in reqs:
                b.level -= 1
            for b, t in zip(toks, tok_takes, strict=True):
                b.level -= t
        return decide(p, [(b.level, w) for b, w in zip(reqs, req_waits, strict=True)],
                      [(b.level, w) for b, w in zip(toks, tok_waits, strict=True)], allowed)

    def settle_now(self, tenant: str, key_id: str, charged: int, actual: int) -> None:
        for k in ("t:" + tenant, "k:" + key_id):
            b = self._tokens.get(k)
            if b is not None:
                b.level = min(b.capacity, b.level + charged - actual)

    async def admit(self, tenant: str, key_id: str, tier: Tier, tokens: int) -> LimitDecision:
        return self.admit_now(tenant, key_id, tier, tokens)

    def settle(self, tenant: str, key_id: str, charged: int, actual: int) -> None:
        """Correct the up-front token charge with what the request really used. Synchronous and
        non-blocking in both limiters (Redis queues it), so the request path needs no task for it."""
        self.settle_now(tenant, key_id, charged, actual)

    async def start(self, metrics=None) -> None:
        pass

    async def stop(self) -> None:
        pass
