"""Versioned PostgreSQL migrations: migrations/NNNN_name.sql, applied in order, once each.

``migrate(dsn)`` takes a session advisory lock (several replicas start at once), creates
``schema_migrations`` if missing, and applies each file whose version is not recorded there,
file and record in one transaction. Running it again applies nothing: it is idempotent, and
every gateway runs it at start. ``ensure_database`` creates the database itself when the DSN's
role may (the local stacks, on the machine's PostgreSQL); managed databases exist already.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger("infermesh.state")
DIR = Path(__file__).resolve().parent / "migrations"
_LOCK = 0x696E6D65   # "inme": the advisory lock id of infermesh migrations
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    out = []
    for path in sorted(DIR.iterdir()):
        m = _FILE.match(path.name)
        if m:
            out.append((int(m.group(1)), m.group(2), path.read_text()))
    versions = [v for v, _, _ in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {DIR}")
    return out


def migrate(dsn: str, connect_timeout: int = 5) -> list[int]:
    """Apply the pending migrations; returns the versions applied now."""
    applied = []
    with psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         "version integer PRIMARY KEY, name text NOT NULL, "
                         "applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, text in migrations():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(text.encode())          # no parameters: several statements are fine
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                applied.append(version)
                log.info("postgres migration %04d_%s applied", version, name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))
    return applied


def ensure_database(dsn: str, connect_timeout: int = 5) -> bool:
    """CREATE DATABASE for the DSN's dbname if it does not exist; True if created."""
    params = conninfo_to_dict(dsn)
    name = params.get("dbname")
    if not name:
        return False
    admin = make_conninfo(dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=connect_timeout) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))  # type: ignore[arg-type]  # a dbname is a str
        except psycopg.errors.DuplicateDatabase:
            return False
    return True
