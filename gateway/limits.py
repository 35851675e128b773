"""In-process rate limits per tenant: requests and tokens per minute, as token buckets.

A bucket holds up to one minute's allowance and refills continuously. Tokens are charged
up front with an estimate (prompt estimate + max_tokens, as OpenAI does) and corrected once
the upstream's ``usage`` is known, so long completions count what they really produced.
The headers follow OpenAI's: x-ratelimit-{limit,remaining,reset}-{requests,tokens}.
The shared (Redis) limiter of several replicas keeps the same interface.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass(slots=True)
class Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def seconds_until(self, amount: float) -> float:
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity


@dataclass(slots=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    retry_after: float = 0.0
    reason: str = ""


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds < 60 else f"{seconds / 60:.1f}m"


class LocalLimiter:
    def __init__(self) -> None:
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    def _bucket(self, table: dict[str, Bucket], key: str, capacity: float, now: float) -> Bucket:
        b = table.get(key)
        if b is None:
            b = table[key] = Bucket(capacity, capacity, now)
        elif b.capacity != capacity:          # tier changed: keep the used share
            b.level = b.level * capacity / b.capacity
            b.capacity = capacity
        b.refill(now)
        return b

    def admit(self, key: str, rpm: int, tpm: int, tokens: int) -> Decision:
        now = time.monotonic()
        req = self._bucket(self._requests, key, rpm, now)
        tok = self._bucket(self._tokens, key, tpm, now)
        tokens = min(tokens, tpm)             # a request larger than a minute's allowance waits a full minute
        wait_req, wait_tok = req.seconds_until(1), tok.seconds_until(tokens)
        allowed = wait_req == 0 and wait_tok == 0
        if allowed:
            req.level -= 1
            tok.level -= tokens
        headers = {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(max(0, math.floor(req.level))),
            "x-ratelimit-reset-requests": _fmt(req.seconds_until(req.capacity)),
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-tokens": str(max(0, math.floor(tok.level))),
            "x-ratelimit-reset-tokens": _fmt(tok.seconds_until(tok.capacity)),
        }
        if allowed:
            return Decision(True, headers)
        retry = max(wait_req, wait_tok)
        headers["retry-after"] = str(max(1, math.ceil(retry)))
        reason = "requests per minute" if wait_req >= wait_tok else "tokens per minute"
        return Decision(False, headers, retry, reason)

    def settle(self, key: str, charged: int, actual: int) -> None:
        """Correct the up-front token charge with what the request really used."""
        b = self._tokens.get(key)
        if b is not None:
            b.level = min(b.capacity, b.level + charged - actual)
