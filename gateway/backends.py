"""What the request path asks of its state backends, as structural types (``typing.Protocol``).

Each backend has two implementations, chosen by the stack (gateway/state/__init__.py):

- ``Keys`` (admission authenticates with it): keys.KeyStore (SQLite) and state.pg_keys.PgKeyStore
  (PostgreSQL, held in memory).
- ``Limiter`` (admission admits and holds spend, the meter settles): limits.LocalLimiter (in
  memory) and state.redis_limits.RedisLimiter (Redis).
- ``UsageLedger`` (the meter writes rows and debug logs, the app purges and closes):
  ledger.Ledger (SQLite) and state.pg_ledger.SpoolLedger (a SQLite spool shipped to PostgreSQL).
- ``UpstreamLimits`` (a call's and a probe's slot of an external upstream's own limits):
  state.upstream_limits.LocalUpstreamLimits (in memory) and .RedisUpstreamLimits (Redis).

The implementations do not name these types: a class with the methods conforms. The block under
``TYPE_CHECKING`` at the end has mypy check that each of them does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fleet.spec import Tier
    from gateway.keys import Principal
    from gateway.ledger import UsageRecord
    from gateway.limits import LimitDecision


class Keys(Protocol):
    """Bearer token -> Principal, from a key set held in memory."""

    @property
    def ready(self) -> bool:
        """Whether a key set is loaded (PostgreSQL may be down at start with no cache)."""
        ...

    def authenticate(self, token: str) -> Principal | None: ...


class Limiter(Protocol):
    """Rate limits per tenant and key (token buckets) and spend per key and month (gateway/limits.py)."""

    async def admit(self, tenant: str, key_id: str, tier: Tier, tokens: int) -> LimitDecision: ...

    def settle(self, tenant: str, key_id: str, charged: int, actual: int) -> None:
        """Correct the up-front token charge; never waits."""
        ...

    async def reserve_spend(self, key_id: str, month: str, limit: int, amount: int, tier: Tier,
                            seed: Callable[[], Awaitable[int]]) -> bool | None: ...

    def settle_spend(self, key_id: str, month: str, delta: int) -> None: ...


class UsageLedger(Protocol):
    """The request path's writer of usage rows (group commit) and opted-in debug logs."""

    path: Path                   # the SQLite file: the ledger itself, or the spool shipped to PostgreSQL

    async def commit(self, rec: UsageRecord) -> None: ...

    def commit_soon(self, rec: UsageRecord) -> None: ...

    def debug_log(self, request_id: str, tenant: str, prompt: str, completion: str, until: float,
                  redacted: str = "") -> None: ...

    def purge_expired(self, now: float | None = None) -> int: ...

    def close(self) -> None: ...


class UpstreamLimits(Protocol):
    """An external upstream's own concurrency and requests per minute, as slots."""

    async def take(self, key: str, max_concurrency: int, rpm: int) -> str | None: ...

    def give_back(self, key: str, slot: str) -> None: ...


if TYPE_CHECKING:     # every implementation conforms (checked by mypy, never run)
    from gateway.keys import KeyStore
    from gateway.ledger import Ledger
    from gateway.limits import LocalLimiter
    from gateway.state.pg_keys import PgKeyStore
    from gateway.state.pg_ledger import SpoolLedger
    from gateway.state.redis_limits import RedisLimiter
    from gateway.state.upstream_limits import LocalUpstreamLimits, RedisUpstreamLimits

    def _conforms(k1: KeyStore, k2: PgKeyStore, l1: LocalLimiter, l2: RedisLimiter, u1: Ledger, u2: SpoolLedger,
                  s1: LocalUpstreamLimits, s2: RedisUpstreamLimits) -> None:
        keys: list[Keys] = [k1, k2]
        limiters: list[Limiter] = [l1, l2]
        ledgers: list[UsageLedger] = [u1, u2]
        slots: list[UpstreamLimits] = [s1, s2]
        del keys, limiters, ledgers, slots
