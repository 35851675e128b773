"""Tenants and API keys in PostgreSQL, for replicas: `infermesh keys` writes, every gateway reads.

The write side (:class:`PgKeyAdmin`) has KeyAdmin's interface (gateway/keys.py) and the same
key format and hashing. The read side (:class:`PgKeyStore`) keeps KeyStore's in-memory map, so
authentication never waits on the database; once a second it reads one row
(``state_versions['keys']``, bumped by a trigger on every change to tenants or keys) and reloads
the map when it moved. A key created or revoked anywhere therefore holds on every replica within
``refresh_s`` (1 s) plus one query. While PostgreSQL is unreachable the last map stays in force.

Each load is also kept on the replica's local disk (``cache``: the rows as loaded, key hashes only,
0600, replaced atomically), and a replica that starts while PostgreSQL is unreachable serves from
it. A replica with no key set at all (PostgreSQL down and no cache) is not *ready*: ``/ready``
answers 503 and it does not join the shared port (gateway/__main__.py), so nothing is sent to it;
a request that reaches it anyway gets 503 ``keys_unavailable`` (retried by SDKs), never 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from pathlib import Path

import psycopg

from gateway.keys import (
    KEY_PREFIX,
    KeyInfo,
    Principal,
    check_region,
    check_scope,
    check_tenant,
    hash_key,
    new_key,
    principal,
)
from gateway.state.health import Health

log = logging.getLogger("infermesh.state")
_ERRORS = (psycopg.Error, OSError, asyncio.TimeoutError)
_LOAD = ("SELECT k.hash, k.id, k.tenant, t.tier, t.debug_log_until, k.models, k.monthly_spend_micro_usd, k.region "
         "FROM api_keys k JOIN tenants t ON t.name = k.tenant WHERE k.revoked_at IS NULL")
_SELECT = ("SELECT k.id, k.tenant, t.tier, k.prefix, k.created_at, k.revoked_at, k.models, k.monthly_spend_micro_usd, "
           "k.region FROM api_keys k JOIN tenants t ON t.name = k.tenant")


class PgKeyAdmin:
    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)

    def close(self) -> None:
        self.conn.close()

    def create(self, tenant: str, tier: str | None, models: list[str] | None = None,
               monthly_spend_micro_usd: int | None = None, region: str | None = None) -> tuple[str, KeyInfo]:
        check_tenant(tenant)
        scope = check_scope(models, monthly_spend_micro_usd)
        check_region(region)
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
            self.conn.execute("INSERT INTO api_keys (id, tenant, hash, prefix, created_at, models, "
                              "monthly_spend_micro_usd, region) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                              (key_id, tenant, hash_key(key), key[:10], now, scope, monthly_spend_micro_usd, region))
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


def _key_map(rows) -> dict[str, tuple[str, Principal]]:
    """Rows of _LOAD (a cache from before key scopes has five columns: no scope; from before key
    regions, seven: no region)."""
    return {r[1][4:]: (r[0], principal(*r[1:])) for r in rows}


def write_cache(path: Path, version: int, rows: list) -> None:
    """The key set as loaded (hashes, never keys), 0600, replacing the last one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump({"version": version, "saved_at": time.time(), "rows": [list(r) for r in rows]}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_cache(path: Path) -> tuple[float, list] | None:
    """(saved_at, rows) from a cache file, or None where there is none or it is unreadable."""
    try:
        data = json.loads(path.read_text())
        return float(data["saved_at"]), [tuple(r) for r in data["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PgKeyStore:
    """bearer token -> Principal from memory; the map follows PostgreSQL within refresh_s."""

    def __init__(self, dsn: str, health: Health, refresh_s: float = 1.0, cache: Path | None = None) -> None:
        self.dsn, self.health, self.refresh_s, self.cache = dsn, health, refresh_s, cache
        self._by_id: dict[str, tuple[str, Principal]] = {}
        self._version: int | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._task: asyncio.Task | None = None
        self.loaded_at = 0.0
        self.ready = False             # a key set is loaded (from PostgreSQL or the disk cache)
        self.source = "none"           # where the map in force came from: none, postgres, cache
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
        version = (await cur.fetchone())[0]  # type: ignore[index]  # state_versions has its 'keys' row (migrations)
        if version == self._version:
            return False
        cur = await self._conn.execute(_LOAD)
        rows = await cur.fetchall()
        self._by_id = _key_map(rows)
        self._version = version
        self.loaded_at = time.time()
        self.ready, self.source = True, "postgres"
        if self.cache is not None:
            try:
                await asyncio.to_thread(write_cache, self.cache, version, rows)
            except OSError as e:       # a full disk costs the next outage's start, not this request
                log.warning("key cache not written (%s)", type(e).__name__)
        return True

    def load_cache(self) -> bool:
        """Serve the key set last kept on disk (at a start while PostgreSQL is unreachable)."""
        got = read_cache(self.cache) if self.cache is not None else None
        if got is None:
            return False
        saved_at, rows = got
        self._by_id = _key_map(rows)
        self._version = None           # the next answer from PostgreSQL reloads, whatever its version
        self.loaded_at = saved_at
        self.ready, self.source = True, "cache"
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
        if not self.ready:
            if self.load_cache():
                log.warning("PostgreSQL unreachable at start: %d keys from the disk cache (saved %.0f s ago) "
                            "are in force until it answers", len(self._by_id), time.time() - self.loaded_at)
            else:
                log.error("PostgreSQL unreachable at start and no key cache: not ready (/ready 503, off the "
                          "shared port) until it answers")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
