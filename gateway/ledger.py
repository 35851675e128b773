"""The usage ledger: one record per request, durable once the response completed.

SQLite in WAL mode. A request's row is committed *before* the last bytes of its response (the
non-stream body, or the stream's final ``[DONE]``) leave the gateway. A commit in WAL mode
survives the process being killed (kill -9); only a power loss can lose the last commits with
``synchronous=NORMAL``.

Group commit: the request path awaits :meth:`Ledger.commit`, which queues the row and is woken
once the transaction holding it has committed. All rows queued during one pass of the event
loop share one transaction on the next pass, so under load a commit costs a fraction of a
request (it was a quarter of the gateway's CPU in bench/ S1 with one commit per request),
while at concurrency 1 it adds one loop pass.

Token counts are the upstream's ``usage``, the same numbers the client is shown, in classes that
never overlap: ``prompt_tokens`` (uncached input), ``cached_tokens`` (input the worker's prefix
cache served: the client's ``prompt_tokens_details.cached_tokens``) and ``completion_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fleet.paths import private_file

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
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    price_micro_usd   INTEGER NOT NULL DEFAULT 0,
    cost_micro_usd    INTEGER NOT NULL DEFAULT 0,
    status            INTEGER NOT NULL,
    error             TEXT,
    ttft_ms           REAL,
    ttlt_ms           REAL,
    retries           INTEGER NOT NULL,
    fallback          INTEGER NOT NULL,
    created_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_tenant_time ON usage(tenant, created_at);
DROP INDEX IF EXISTS usage_request;  -- a random key: it doubled each commit's pages, and nothing queried it
CREATE TABLE IF NOT EXISTS debug_log (
    request_id  TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    completion  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    redacted    TEXT NOT NULL DEFAULT ''   -- what gateway/redact.py replaced, e.g. card=1,email=2
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
    prompt_tokens: int = 0             # input tokens not served from the worker's prefix cache
    completion_tokens: int = 0
    cached_tokens: int = 0             # input tokens served from the prefix cache (never also in prompt_tokens)
    price_micro_usd: int = 0           # what the tenant is charged, at its tier's prices when it was served
    cost_micro_usd: int = 0            # what serving it cost (gateway/money.py): upstream per-token price or lease rate
    status: int = 0
    error: str | None = None
    ttft_ms: float | None = None
    ttlt_ms: float | None = None
    retries: int = 0
    fallback: bool = False
    created_at: float = 0.0
    spend_hold: tuple[str, int] | None = None   # not stored: (month, micro-dollars) held on a spend-limited key


log = logging.getLogger("infermesh.ledger")
_COLUMNS = [f.name for f in fields(UsageRecord) if f.name != "spend_hold"]
_ROW = operator.attrgetter(*_COLUMNS)     # the record as a tuple, without dataclasses.astuple's deep copy
_INSERT = f"INSERT INTO usage({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


def _row(rec: UsageRecord) -> tuple:
    if not rec.created_at:
        rec.created_at = time.time()
    return _ROW(rec)


def connect(path: Path) -> sqlite3.Connection:
    private_file(path)               # 0600 in a 0700 folder: it holds prompts, for tenants who opted in (issue 21)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(_SCHEMA)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(usage)")}
    if "cached_tokens" not in columns:       # a ledger written before cached tokens were metered
        conn.execute("ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0")
    for col in ("price_micro_usd", "cost_micro_usd"):   # ... before price and cost were (issue 22)
        if col not in columns:
            conn.execute(f"ALTER TABLE usage ADD COLUMN {col} INTEGER NOT NULL DEFAULT 0")
    if "redacted" not in {r[1] for r in conn.execute("PRAGMA table_info(debug_log)")}:
        conn.execute("ALTER TABLE debug_log ADD COLUMN redacted TEXT NOT NULL DEFAULT ''")
    return conn


class Ledger:
    """The request path's writer.

    WAL checkpoints (copying the log back into the database) run in a background thread on
    their own connection every CHECKPOINT_EVERY_S, never inside a request's commit: an
    automatic checkpoint there stalled single inserts for tens of milliseconds (bench/). Under
    sustained writes a passive checkpoint rarely finishes between two commits, so SQLite never
    gets to start the log over and it grows without bound (bench/ledger_wal.py: 70 MB in 8 s
    at 3,000 rows/s, still growing). So once the log passes RESTART_FRAMES, the writer itself
    restarts it right after its next commit, when the passive checkpoints have already copied
    nearly all of it: a stall of one or two milliseconds, and a log that stays under 6 MB.
    """

    CHECKPOINT_EVERY_S = 0.1
    RESTART_FRAMES = 1024          # 4 MB of 4 KB pages
    RETRY_S = 1.0                  # after a failed commit, rows nobody waits for are tried again this often
    MAX_KEPT = 100_000             # ... and at most this many are kept (the oldest go first, counted in `lost`)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self.conn.execute(f"PRAGMA journal_size_limit={8 << 20}")   # the file shrinks back after a restart
        self._restart_due = False      # set by the checkpoint thread, acted on by the writer
        self.restarts = 0
        self._rows: list[tuple] = []                      # queued for the next group commit
        self._waiters: list[asyncio.Future | None] = []   # one per row; None: nobody waits
        self._flush_handle: asyncio.Handle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self.lost = 0                  # rows dropped after failed commits (only past MAX_KEPT)
        self._stop = threading.Event()
        self._closed = False
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="ledger-checkpoint", daemon=True)
        self._checkpointer.start()

    def record(self, rec: UsageRecord) -> None:
        """Commit one row now, with anything queued (tools and tests; the gateway uses commit)."""
        self._rows.append(_row(rec))
        self._waiters.append(None)
        self._write()

    async def commit(self, rec: UsageRecord) -> None:
        """Queue the row and return once it is committed (raises the database's error if not)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue(rec, fut)
        await fut

    def commit_soon(self, rec: UsageRecord) -> None:
        """Queue the row for the next group commit without waiting for it (a stream's end
        after its client left: there is nobody to answer)."""
        self._queue(rec, None)

    def _queue(self, rec: UsageRecord, fut: asyncio.Future | None) -> None:
        self._rows.append(_row(rec))
        self._waiters.append(fut)
        if self._flush_handle is None:
            try:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:       # no loop (a relay closed while the process shuts down): write now
                self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        try:
            self._write()
        except sqlite3.Error as e:     # the waiters have the error; the other rows wait for a retry
            log.error("ledger commit failed: %s; %d row(s) kept for a retry", type(e).__name__, len(self._rows))
            self._retry_later()

    def _retry_later(self) -> None:
        if not self._rows or self._retry_handle is not None or self._flush_handle is not None:
            return
        try:
            self._retry_handle = asyncio.get_running_loop().call_later(self.RETRY_S, self._flush)
        except RuntimeError:           # no loop: the next commit, or close(), tries them again
            pass

    def _write(self) -> None:
        """Commit every queued row in one transaction, then wake their waiters.

        If the commit fails, each waiter gets the error (its request fails, a 500 or a stream
        cut before ``[DONE]``, and is not billed). The rows nobody waits for (a stream whose
        client left, or that broke) are queued again, ahead of newer rows: they are tried with
        the next commit, or after RETRY_S, so a full disk or a locked file for a while loses
        no usage."""
        rows, waiters = self._rows, self._waiters
        if not rows:
            return
        self._rows, self._waiters = [], []
        conn = self.conn
        try:
            conn.execute("BEGIN")
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            kept = []
            for row, w in zip(rows, waiters, strict=True):
                if w is None:
                    kept.append(row)
                elif not w.done():
                    w.set_exception(e)
            over = len(kept) + len(self._rows) - self.MAX_KEPT
            if over > 0:
                self.lost += min(over, len(kept))
                log.error("ledger: %d unwritten row(s) dropped (more than %d kept)", min(over, len(kept)),
                          self.MAX_KEPT)
                kept = kept[over:]
            self._rows[:0] = kept
            self._waiters[:0] = [None] * len(kept)
            raise
        for w in waiters:
            if w is not None and not w.done():
                w.set_result(None)
        self.committed()
        if self._restart_due:
            self._restart_log()

    def _restart_log(self) -> None:
        """Checkpoint what is left and start the log over; skipped (tried again later) while a
        reader still needs the old log: it never waits."""
        self._restart_due = False
        conn = self.conn
        conn.execute("PRAGMA busy_timeout=0")
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
            self.restarts += not busy
        except sqlite3.Error:
            pass
        finally:
            conn.execute("PRAGMA busy_timeout=5000")

    def committed(self) -> None:
        """Called after each commit (the PostgreSQL shipper wakes on it)."""

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=1000")
        try:
            while not self._stop.wait(self.CHECKPOINT_EVERY_S):
                try:
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # never blocks the writer
                except sqlite3.Error:
                    continue
                if frames > self.RESTART_FRAMES:
                    self._restart_due = True
        finally:
            conn.close()

    def debug_log(self, request_id: str, tenant: str, prompt: str, completion: str, until: float,
                  redacted: str = "") -> None:
        """Only for tenants that opted in; kept until `until` (their TTL), then purged. The texts come
        redacted (gateway/redact.py); `redacted` says what was replaced."""
        self.conn.execute("INSERT INTO debug_log (request_id, tenant, prompt, completion, created_at, expires_at, "
                          "redacted) VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (request_id, tenant, prompt, completion, time.time(), until, redacted))

    def purge_expired(self, now: float | None = None) -> int:
        return self.conn.execute("DELETE FROM debug_log WHERE expires_at <= ?", (now or time.time(),)).rowcount

    def close(self) -> None:
        """Commit what is queued and close; a second call does nothing (State.stop closes a spool
        before its final shipping, the app closes its ledger after)."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._flush_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()
        if self._rows:
            self._flush()
        self._stop.set()
        self._checkpointer.join(5)
        self.conn.close()


def query(path: Path, tenant: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """Rows for reports, oldest first."""
    conn = connect(path)
    conn.row_factory = sqlite3.Row
    where: list[str] = []
    args: list[str | float] = []
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
