"""The gateway's state backends, chosen by the stack (gateway.state), behind one interface.

=================  ==========================  ===========================================
                   embedded (one replica)      shared (several replicas)
=================  ==========================  ===========================================
limits             LocalLimiter (memory)       RedisLimiter: one Lua round trip per request
ledger             SQLite ledger.db            SQLite spool per replica -> PostgreSQL
tenants and keys   SQLite keys.db              PostgreSQL (with ``ledger: postgres``)
=================  ==========================  ===========================================

``State(spec, state_dir, instance)`` builds them; ``start``/``stop`` run their background tasks
(Redis probe, ledger shipping, key refresh). A replica's spool lives in
``state_dir/instances/<instance>/ledger.db`` so several replicas can share one state dir.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge

from fleet.paths import private_dir
from gateway import ledger as sqlite_ledger
from gateway import sla
from gateway.keys import KeyAdmin, KeyStore
from gateway.ledger import Ledger
from gateway.limits import LocalLimiter
from gateway.state.health import Health

if TYPE_CHECKING:
    from fleet.spec import Spec, Tier


# fleet/spec.py requires gateway.state.postgres_dsn with ledger: postgres and redis_url with limits: redis;
# where this module reads them, mypy is told so (`type: ignore[arg-type]`: it sees `str | None`).

SPOOL_LOCK_WAIT_S = 60.0   # how long a starting replica waits for its spool's lock (an adopter holds it ~10 s at most)


def fails_open(tier: Tier, tiers: list[Tier]) -> bool:
    """When shared limits are unreachable: the tier's limits_fail_open if set; otherwise open for
    paid tiers and closed for free tiers and for the lowest tier (lowest priority)."""
    if tier.limits_fail_open is not None:
        return tier.limits_fail_open
    lowest = tier.priority <= min(t.priority for t in tiers)
    return tier.paid and not lowest


def redis_prefix(spec: Spec) -> str:
    return f"infermesh:{spec.stack}:"


def uses_postgres(spec: Spec) -> bool:
    return spec.gateway.state.ledger == "postgres"


def key_admin(spec: Spec, state_dir: Path):
    """Where `infermesh keys` writes: PostgreSQL with ``ledger: postgres``, else keys.db."""
    if uses_postgres(spec):
        from gateway.state.migrate import migrate
        from gateway.state.pg_keys import PgKeyAdmin
        migrate(spec.gateway.state.postgres_dsn)  # type: ignore[arg-type]
        return PgKeyAdmin(spec.gateway.state.postgres_dsn)  # type: ignore[arg-type]
    return KeyAdmin(state_dir / "keys.db")


def usage_rows(spec: Spec, state_dir: Path, tenant: str | None = None, since: float | None = None) -> list[dict]:
    if uses_postgres(spec):
        from gateway.state import pg_ledger
        return pg_ledger.query(spec.gateway.state.postgres_dsn, tenant, since)  # type: ignore[arg-type]
    return sqlite_ledger.query(state_dir / "ledger.db", tenant, since)


class State:
    def __init__(self, spec: Spec, state_dir: Path, instance: str | None = None) -> None:
        backends = spec.gateway.state
        self.spec, self.state_dir = spec, state_dir
        self.health = Health()
        self.shipper: Any = None            # a PgShipper with ledger: postgres
        self._migrating: asyncio.Task | None = None
        self.pg = uses_postgres(spec)
        if self.pg:
            from gateway.state.pg_keys import PgKeyStore
            from gateway.state.pg_ledger import Adopter, PgShipper, SpoolLedger, SpoolLock
            home = state_dir / "instances" / instance if instance else state_dir
            spool = home / "ledger.db"
            private_dir(spool.parent)        # 0700, like the state dir: the spool holds prompts when opted in
            # a replica's spool is locked while it lives; the others ship it when it is dead
            # (pg_ledger.Adopter). The lock comes first: no spool is opened, or written, without it,
            # so a survivor shipping this spool (after this replica's previous process died) finishes
            # its drain before this process touches the file, and two live processes never share it.
            self.spool_lock = SpoolLock(spool)
            if not self.spool_lock.acquire(SPOOL_LOCK_WAIT_S):
                raise RuntimeError(f"the ledger spool {spool} stayed locked for {SPOOL_LOCK_WAIT_S:.0f} s: another "
                                   f"live process holds it (a second replica named {instance!r} on this state dir?)")
            self.shipper = PgShipper(spool, backends.postgres_dsn, self.health, instance)  # type: ignore[arg-type]
            self.adopter = Adopter(state_dir / "instances", home, backends.postgres_dsn) if instance else None  # type: ignore[arg-type]
            self.ledger: Ledger = SpoolLedger(spool, self.shipper.wake)
            # the last key set loaded, on this replica's disk: a start while PostgreSQL is down serves it
            self.keys: Any = PgKeyStore(backends.postgres_dsn, self.health, cache=home / "keys.cache.json")  # type: ignore[arg-type]
            self.rollup = sla.Rollup(spec, spool, sla.PgTarget(backends.postgres_dsn), self.shipper.instance_id)  # type: ignore[arg-type]
        else:
            self.ledger = Ledger(state_dir / "ledger.db")
            self.keys = KeyStore(state_dir / "keys.db")
            self.rollup = sla.Rollup(spec, self.ledger.path, sla.SqliteTarget(self.ledger.path), "local")
        if backends.limits == "redis":
            from gateway.state.redis_limits import RedisLimiter
            tiers = list(spec.tiers)
            self.limiter: Any = RedisLimiter(backends.redis_url, redis_prefix(spec),  # type: ignore[arg-type]
                                             lambda t: fails_open(t, tiers), self.health)
        else:
            self.limiter = LocalLimiter()
        # an external upstream's own concurrency and rpm (gateway/state/upstream_limits.py), across replicas on Redis
        from gateway.state import upstream_limits
        self.upstream_limits: Any = (upstream_limits.RedisUpstreamLimits(backends.redis_url, redis_prefix(spec))  # type: ignore[arg-type]
                                     if backends.limits == "redis" else upstream_limits.LocalUpstreamLimits())

    @property
    def ready(self) -> bool:
        """Whether this replica can serve: it has a key set (embedded keys always have one)."""
        return self.keys.ready

    async def start(self, registry: CollectorRegistry) -> None:
        self.health.bind(registry)
        if self.pg:
            from gateway.state.migrate import migrate
            try:
                await asyncio.to_thread(migrate, self.spec.gateway.state.postgres_dsn)  # type: ignore[arg-type]
            except Exception as e:   # PostgreSQL down at start: serve from the spool, migrate when it answers
                self.health.report("postgres", "ledger", False, e)
                self._migrating = asyncio.create_task(self._migrate_later())
            self.shipper.backlog_gauge = Gauge("infermesh_ledger_spool_backlog",
                                               "Usage records in the local spool not yet in PostgreSQL",
                                               registry=registry)
            await self.keys.start()
            self.shipper.start()
            if self.adopter is not None:
                self.adopter.start()
        await self.limiter.start()

    async def _migrate_later(self) -> None:
        from gateway.state.migrate import migrate
        while True:
            await asyncio.sleep(2.0)
            try:
                await asyncio.to_thread(migrate, self.spec.gateway.state.postgres_dsn)  # type: ignore[arg-type]
                return
            except Exception:
                continue

    async def stop(self) -> None:
        if self._migrating is not None:
            self._migrating.cancel()
        await self.limiter.stop()
        if hasattr(self.upstream_limits, "close"):
            await self.upstream_limits.close()
        if self.pg:
            if self.adopter is not None:
                await self.adopter.stop()
            await self.keys.stop()
            # the rows still queued are committed, then everything unshipped goes to PostgreSQL, and only
            # then is the spool's lock let go (a survivor's adopter ships what a failed drain left)
            self.ledger.close()
            await self.shipper.stop()
            self.spool_lock.release()

    def sla_query(self) -> sla.Query:
        """Where the SLA reports read rollups: the shared PostgreSQL or this gateway's ledger.db."""
        return self.rollup.target.query

    async def usage_rows(self, since: float | None = None) -> list[dict]:
        if self.pg:
            return await asyncio.to_thread(usage_rows, self.spec, self.state_dir, None, since)
        return sqlite_ledger.query(self.ledger.path, since=since)


def sla_target(spec: Spec, state_dir: Path) -> sla.SqliteTarget | sla.PgTarget:
    """Where a stack's rollups are, for the CLI's reports."""
    if uses_postgres(spec):
        return sla.PgTarget(spec.gateway.state.postgres_dsn)  # type: ignore[arg-type]
    return sla.SqliteTarget(state_dir / "ledger.db")


__all__ = ["State", "fails_open", "key_admin", "usage_rows", "redis_prefix", "sla_target"]
