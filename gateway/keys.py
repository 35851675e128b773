"""Tenants and API keys, stored in SQLite (keys.db under the stack's state dir).

A key is shown once, at creation; only its SHA-256 is stored. A key reads
``im-<id>.<secret>``: the id (not secret) finds the record, then the SHA-256 of the whole key is
compared with the stored one in constant time. The secret is 256 random bits, so a fast
unsalted hash is the right tool (a password KDF buys nothing here and would cost every request).
The gateway keeps an in-memory map hash -> key and refreshes it
whenever another connection committed to the file (SQLite's ``PRAGMA data_version``), so a
key created or revoked by ``infermesh keys`` takes effect on the next request.

A key may be scoped (models, a monthly spend) and may carry a region (``keys create --region``):
its requests are served in that region unless they name one in ``x-infermesh-region`` (the
region of the gateway that took them otherwise; gateway/router.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.paths import private_file

KEY_PREFIX = "im-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name            TEXT PRIMARY KEY,
    tier            TEXT NOT NULL,
    created_at      REAL NOT NULL,
    debug_log_until REAL            -- prompts/completions kept only while set and in the future
);
CREATE TABLE IF NOT EXISTS keys (
    id          TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL REFERENCES tenants(name),
    hash        TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,      -- first characters, to recognise a key in listings
    created_at  REAL NOT NULL,
    revoked_at  REAL,
    models      TEXT,               -- scope: comma-separated model ids (NULL: every model of the tier)
    monthly_spend_micro_usd INTEGER, -- scope: spend per calendar month (UTC) at the tier's prices (NULL: none)
    region      TEXT                -- where its requests are served when they name none (NULL: the gateway's)
);
"""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the result of authentication."""

    key_id: str
    tenant: str
    tier: str
    debug_log_until: float | None
    models: frozenset[str] | None = None     # the key's models (None: the tier's)
    spend_limit: int | None = None           # micro-dollars a calendar month (None: no limit)
    region: str | None = None                # its requests' region unless they name one (None: the gateway's)


@dataclass(frozen=True)
class KeyInfo:
    id: str
    tenant: str
    tier: str
    prefix: str
    created_at: float
    revoked_at: float | None
    models: str | None = None                # comma-separated
    monthly_spend_micro_usd: int | None = None
    region: str | None = None


def principal(kid: str, tenant: str, tier: str, until: float | None, models: str | None = None,
              spend: int | None = None, region: str | None = None) -> Principal:
    """A key's Principal from its stored row (models comma-separated)."""
    return Principal(kid, tenant, tier, until, frozenset(models.split(",")) if models else None,
                     int(spend) if spend is not None else None, region or None)


REGION_PATTERN = r"[a-z0-9]([a-z0-9._/-]*[a-z0-9])?"   # a region name as a stack file declares it (fleet/spec.py)


def check_region(region: str | None) -> str | None:
    """A key's region as stored: a region name (the CLI also checks that the stack declares it)."""
    if region is not None and (not isinstance(region, str) or len(region) > 120
                               or not re.fullmatch(REGION_PATTERN, region, re.ASCII)):
        raise ValueError(f"{region!r:.70} is not a region name")
    return region


def check_scope(models: list[str] | None, monthly_spend_micro_usd: int | None) -> str | None:
    """A key's scope as stored: model ids comma-joined (each a model name: no comma, no space), and a
    spend that is a whole, non-negative number of micro-dollars."""
    if monthly_spend_micro_usd is not None and (not isinstance(monthly_spend_micro_usd, int)
                                                or isinstance(monthly_spend_micro_usd, bool)
                                                or not 0 <= monthly_spend_micro_usd <= 10**15):
        raise ValueError(f"{monthly_spend_micro_usd!r:.40} is not a monthly spend in micro-dollars")
    if models is None:
        return None
    if not models or any(not re.fullmatch(r"[a-z0-9]([a-z0-9._/-]*[a-z0-9])?", m) or len(m) > 120 for m in models):
        raise ValueError(f"{','.join(models)!r:.80} is not a list of model ids")
    return ",".join(sorted(set(models)))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (key, key id). The id is the key's public part: it finds the record."""
    ident = secrets.token_hex(6)
    return f"{KEY_PREFIX}{ident}.{secrets.token_urlsafe(32)}", "key_" + ident


def connect(path: Path) -> sqlite3.Connection:
    private_file(path)               # 0600 in a 0700 folder: it holds key hashes (issue 21)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(_SCHEMA)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(keys)")}
    if "models" not in columns:                # a keys.db from before key scopes (issue 22)
        conn.execute("ALTER TABLE keys ADD COLUMN models TEXT")
    if "monthly_spend_micro_usd" not in columns:
        conn.execute("ALTER TABLE keys ADD COLUMN monthly_spend_micro_usd INTEGER")
    if "region" not in columns:                # ... from before a key's region (issue 17)
        conn.execute("ALTER TABLE keys ADD COLUMN region TEXT")
    return conn


TENANT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"    # docs/cli-inputs.md


def check_tenant(name: str) -> str:
    """A tenant name is 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit: it reaches
    reports, CSV exports and terminals, so nothing else is stored."""
    if not isinstance(name, str) or not re.fullmatch(TENANT_PATTERN, name, re.ASCII):
        raise ValueError(f"{name!r:.70} is not a tenant name (1 to 64 of A-Z a-z 0-9 . _ -, starting with a "
                         "letter or digit)")
    return name


class KeyAdmin:
    """What `infermesh keys` does: create, list, revoke. Never stores or prints a key twice."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)

    def close(self) -> None:
        self.conn.close()

    def create(self, tenant: str, tier: str | None, models: list[str] | None = None,
               monthly_spend_micro_usd: int | None = None, region: str | None = None) -> tuple[str, KeyInfo]:
        check_tenant(tenant)
        scope = check_scope(models, monthly_spend_micro_usd)
        check_region(region)
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            row = self.conn.execute("SELECT tier FROM tenants WHERE name = ?", (tenant,)).fetchone()
            if row is None:
                if tier is None:
                    raise LookupError(f"tenant {tenant!r} is new: give its --tier")
                self.conn.execute("INSERT INTO tenants(name, tier, created_at) VALUES (?, ?, ?)",
                                  (tenant, tier, now))
            elif tier is not None and tier != row[0]:
                self.conn.execute("UPDATE tenants SET tier = ? WHERE name = ?", (tier, tenant))
            key, key_id = new_key()
            self.conn.execute(
                "INSERT INTO keys(id, tenant, hash, prefix, created_at, models, monthly_spend_micro_usd, region) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, tenant, hash_key(key), key[:10], now, scope, monthly_spend_micro_usd, region))
        return key, self.get(key_id)

    def get(self, key_id: str) -> KeyInfo:
        row = self.conn.execute(
            "SELECT k.id, k.tenant, t.tier, k.prefix, k.created_at, k.revoked_at, k.models, "
            "k.monthly_spend_micro_usd, k.region FROM keys k JOIN tenants t ON t.name = k.tenant WHERE k.id = ?",
            (key_id,)).fetchone()
        if row is None:
            raise LookupError(f"no key {key_id!r}")
        return KeyInfo(*row)

    def list(self, tenant: str | None = None) -> list[KeyInfo]:
        sql = ("SELECT k.id, k.tenant, t.tier, k.prefix, k.created_at, k.revoked_at, k.models, "
               "k.monthly_spend_micro_usd, k.region FROM keys k JOIN tenants t ON t.name = k.tenant")
        rows = self.conn.execute(sql + (" WHERE k.tenant = ?" if tenant else "") + " ORDER BY k.created_at",
                                 (tenant,) if tenant else ()).fetchall()
        return [KeyInfo(*r) for r in rows]

    def revoke(self, key_id: str) -> KeyInfo:
        with self.conn:
            cur = self.conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                    (time.time(), key_id))
        if cur.rowcount == 0:
            info = self.get(key_id)  # raises LookupError for an unknown id
            raise LookupError(f"key {info.id} is already revoked")
        return self.get(key_id)

    def set_debug_log(self, tenant: str, hours: float) -> float | None:
        """Opt a tenant in to prompt/completion debug logs for `hours` (0 opts out)."""
        until = time.time() + hours * 3600 if hours > 0 else None
        with self.conn:
            cur = self.conn.execute("UPDATE tenants SET debug_log_until = ? WHERE name = ?", (until, tenant))
        if cur.rowcount == 0:
            raise LookupError(f"no tenant {tenant!r}")
        return until


class KeyStore:
    """The gateway's read side: bearer token -> Principal, refreshed when the file changes."""

    ready = True                     # the file is local: a key set is always at hand (PgKeyStore may lack one)

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)
        self._version = -1
        self._by_id: dict[str, tuple[str, Principal]] = {}
        self.refresh()

    def refresh(self) -> None:
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return
        rows = self.conn.execute(
            "SELECT k.hash, k.id, k.tenant, t.tier, t.debug_log_until, k.models, k.monthly_spend_micro_usd, k.region "
            "FROM keys k JOIN tenants t ON t.name = k.tenant WHERE k.revoked_at IS NULL").fetchall()
        self._by_id = {r[1][4:]: (r[0], principal(*r[1:])) for r in rows}
        self._version = version

    def authenticate(self, token: str) -> Principal | None:
        self.refresh()
        ident, dot, _ = token.removeprefix(KEY_PREFIX).partition(".")
        entry = self._by_id.get(ident) if dot and token.startswith(KEY_PREFIX) else None
        if entry is None:
            return None
        stored, principal = entry
        return principal if hmac.compare_digest(stored, hash_key(token)) else None
