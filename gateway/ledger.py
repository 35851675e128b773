"""The usage ledger: one record per request, durable once the response completed.

SQLite in WAL mode, one committed INSERT per request, written *before* the last bytes of the
response (the non-stream body, or the stream's final ``[DONE]``) leave the gateway. A commit in
WAL mode survives the process being killed (kill -9); only a power loss can lose the last
commits with ``synchronous=NORMAL``. The write takes tens of microseconds on a local disk
(bench/ measures the request path with it on).

Token counts are the upstream's ``usage``, the same numbers the client is shown.
"""

from __future__ import annotations

import operator
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT NOT NULL,
    tenant            TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    tier              TEXT NOT NULL,
    route             TEXT NOT NULL,
    requested_model   TEXT NOT NULL,
    served_model      TEXT,
    pool              TEXT,
    provider          TEXT,
    region            TEXT,
    stream            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status            INTEGER NOT NULL,
    error             TEXT,
    ttft_ms           REAL,
    ttlt_ms           REAL,
    retries           INTEGER NOT NULL,
    fallback          INTEGER NOT NULL,
    created_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_tenant_time ON usage(tenant, created_at);
CREATE INDEX IF NOT EXISTS usage_request ON usage(request_id);
CREATE TABLE IF NOT EXISTS debug_log (
    request_id  TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    completion  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS debug_log_expiry ON debug_log(expires_at);
"""


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    tenant: str
    key_id: str
    tier: str
    route: str
    requested_model: str
    served_model: str | None = None
    pool: str | None = None
    provider: str | None = None
    region: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0
    error: str | None = None
    ttft_ms: float | None = None
    ttlt_ms: float | None = None
    retries: int = 0
    fallback: bool = False
    created_at: float = 0.0


_COLUMNS = [f.name for f in fields(UsageRecord)]
_ROW = operator.attrgetter(*_COLUMNS)     # the record as a tuple, without dataclasses.astuple's deep copy
_INSERT = f"INSERT INTO usage({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(_SCHEMA)
    return conn


class Ledger:
    """The request path's writer. WAL checkpoints (copying the log back into the database)
    run in a background thread on their own connection, never inside a request's INSERT:
    an automatic checkpoint there stalled single inserts for tens of milliseconds (bench/)."""

    CHECKPOINT_EVERY_S = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="ledger-checkpoint", daemon=True)
        self._checkpointer.start()

    def record(self, rec: UsageRecord) -> None:
        if not rec.created_at:
            rec.created_at = time.time()
        self.conn.execute(_INSERT, _ROW(rec))   # autocommit: durable on return

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=1000")
        try:
            while not self._stop.wait(self.CHECKPOINT_EVERY_S):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")   # never blocks the writer
                except sqlite3.Error:
                    continue
        finally:
            conn.close()

    def debug_log(self, request_id: str, tenant: str, prompt: str, completion: str, until: float) -> None:
        """Only for tenants that opted in; kept until `until` (their TTL), then purged."""
        self.conn.execute("INSERT INTO debug_log VALUES (?, ?, ?, ?, ?, ?)",
                          (request_id, tenant, prompt, completion, time.time(), until))

    def purge_expired(self, now: float | None = None) -> int:
        return self.conn.execute("DELETE FROM debug_log WHERE expires_at <= ?", (now or time.time(),)).rowcount

    def close(self) -> None:
        self._stop.set()
        self._checkpointer.join(5)
        self.conn.close()


def query(path: Path, tenant: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """Rows for reports, oldest first."""
    conn = connect(path)
    conn.row_factory = sqlite3.Row
    where, args = [], []
    if tenant:
        where.append("tenant = ?")
        args.append(tenant)
    if since is not None:
        where.append("created_at >= ?")
        args.append(since)
    sql = "SELECT * FROM usage" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()
