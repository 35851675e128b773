"""Tenants and API keys in PostgreSQL, for replicas: `infermesh keys` writes, every gateway reads.

The write side (:class:`PgKeyAdmin`) has KeyAdmin's interface (gateway/keys.py) and the same
key format and hashing. The read side (:class:`PgKeyStore`) keeps KeyStore's in-memory map, so
authentication never waits on the database; once a second it reads one row
(``state_versions['keys']``, bumped by a trigger on every change to tenants or keys) and reloads
the map when it moved. A key created or revoked anywhere therefore holds on every replica within
``refresh_s`` (1 s) plus one query. While PostgreSQL is unreachable the last map stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time

import psycopg

from gateway.keys import KEY_PREFIX, KeyInfo, Principal, check_tenant, hash_key, new_key
from gateway.state.health import Health

_ERRORS = (psycopg.Error, OSError, asyncio.TimeoutError)
_SELECT = ("SELECT k.id, k.tenant, t.tier, k.prefix, k.created_at, k.revoked_at "
           "FROM api_keys k JOIN tenants t ON t.name = k.tenant")


class PgKeyAdmin:
    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)

    def close(self) -> None:
        self.conn.close()

    def create(self, tenant: str, tier: str | None) -> tuple[str, KeyInfo]:
        check_tenant(tenant)
        now = time.time()
        key, key_id = new_key()
        with self.conn.transaction():
            row = self.conn.execute("SELECT tier FROM tenants WHERE name = %s FOR UPDATE", (tenant,)).fetchone()
            if row is None:
                if tier is None:
                    raise LookupError(f"tenant {tenant!r} is new: give its --tier")
                self.conn.execute("INSERT INTO tenants (name, tier, created_at) VALUES (%s, %s, %s)",
                                  (tenant, tier, now))
            elif tier is not None and tier != row[0]:
                self.conn.execute("UPDATE tenants SET tier = %s WHERE name = %s", (tier, tenant))
            self.conn.execute("INSERT INTO api_keys (id, tenant, hash, prefix, created_at) VALUES (%s, %s, %s, %s, %s)",
                              (key_id, tenant, hash_key(key), key[:10], now))
        return key, self.get(key_id)

    def get(self, key_id: str) -> KeyInfo:
        row = self.conn.execute(_SELECT + " WHERE k.id = %s", (key_id,)).fetchone()
        if row is None:
            raise LookupError(f"no key {key_id!r}")
        return KeyInfo(*row)

    def list(self, tenant: str | None = None) -> list[KeyInfo]:
        if tenant:
            rows = self.conn.execute(_SELECT + " WHERE k.tenant = %s ORDER BY k.created_at", (tenant,)).fetchall()
        else:
            rows = self.conn.execute(_SELECT + " ORDER BY k.created_at").fetchall()
        return [KeyInfo(*r) for r in rows]

    def revoke(self, key_id: str) -> KeyInfo:
        cur = self.conn.execute("UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
                                (time.time(), key_id))
        if cur.rowcount == 0:
            info = self.get(key_id)
            raise LookupError(f"key {info.id} is already revoked")
        return self.get(key_id)

    def set_debug_log(self, tenant: str, hours: float) -> float | None:
        until = time.time() + hours * 3600 if hours > 0 else None
        cur = self.conn.execute("UPDATE tenants SET debug_log_until = %s WHERE name = %s", (until, tenant))
        if cur.rowcount == 0:
            raise LookupError(f"no tenant {tenant!r}")
        return until


class PgKeyStore:
    """bearer token -> Principal from memory; the map follows PostgreSQL within refresh_s."""

    def __init__(self, dsn: str, health: Health, refresh_s: float = 1.0) -> None:
        self.dsn, self.health, self.refresh_s = dsn, health, refresh_s
        self._by_id: dict[str, tuple[str, Principal]] = {}
        self._version: int | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task | None = None
        self.loaded_at = 0.0
        health.register("postgres", "keys")

    def authenticate(self, token: str) -> Principal | None:
        ident, dot, _ = token.removeprefix(KEY_PREFIX).partition(".")
        entry = self._by_id.get(ident) if dot and token.startswith(KEY_PREFIX) else None
        if entry is None:
            return None
        stored, principal = entry
        return principal if hmac.compare_digest(stored, hash_key(token)) else None

    async def refresh(self) -> bool:
        """Reload the map if the keys' version moved; True if it did."""
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=3)
        cur = await self._conn.execute("SELECT version FROM state_versions WHERE name = 'keys'")
        version = (await cur.fetchone())[0]
        if version == self._version:
            return False
        cur = await self._conn.execute(
            "SELECT k.hash, k.id, k.tenant, t.tier, t.debug_log_until FROM api_keys k "
            "JOIN tenants t ON t.name = k.tenant WHERE k.revoked_at IS NULL")
        rows = await cur.fetchall()
        self._by_id = {kid[4:]: (h, Principal(kid, tenant, tier, until)) for h, kid, tenant, tier, until in rows}
        self._version = version
        self.loaded_at = time.time()
        return True

    async def _once(self) -> None:
        try:
            await asyncio.wait_for(self.refresh(), max(5.0, self.refresh_s * 5))
        except _ERRORS as e:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.pgconn.finish()
            self.health.report("postgres", "keys", False, e)
        else:
            self.health.report("postgres", "keys", True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._once()

    async def start(self) -> None:
        await self._once()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
