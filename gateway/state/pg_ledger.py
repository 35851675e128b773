"""The usage ledger in PostgreSQL, fed from each replica's local spool.

The request path is unchanged: every request still commits one row to the replica's SQLite
ledger (gateway/ledger.py) before the last bytes reach the client, so a completed request is on
disk even if the process is killed the next instant. That file is the spool: a background task
(:class:`PgShipper`) ships its rows to PostgreSQL in id order, in batches, each batch one
transaction of ``INSERT ... ON CONFLICT DO NOTHING`` keyed by (instance_id, local_id); after a
record wakes it, it lingers 0.1 s so that under load a batch holds many rows (one transaction
per ~0.1 s, not per request), and a row is in PostgreSQL ~0.1-0.2 s after its response:

- nothing is lost: a row leaves the spool only as a committed PostgreSQL row; while PostgreSQL
  is unreachable rows accumulate on disk and are replayed in order when it answers;
- nothing is counted twice: the key is the spool's own (instance id, row id), never the client's
  x-request-id (which may repeat); a batch whose commit was cut mid-flight is shipped again and
  its rows already there are skipped;
- the high-water mark is PostgreSQL's ``max(local_id)`` for this instance, read again on every
  (re)connect: batches are contiguous id ranges committed whole, so PostgreSQL holds a prefix of
  the spool and everything above the mark is still to ship.

The instance id lives inside the spool file, so a replica restarted on the same state dir
(after kill -9, say) ships what the killed process left. The spool is never pruned (SQLite would
reuse the ids of deleted tail rows); it is also the replica's local record.

No row stranded by a replica that does not come back: each replica holds an exclusive lock
(``flock``, released by the kernel when the process dies, however it dies) on its spool's
``spool.lock``, taken before it opens the spool and let go after its last shipping at shutdown
(gateway.state.State). Where replicas share a state dir (``infermesh up --stack local-ha``, or a
shared volume), every replica looks every ``ADOPT_S`` for another replica's spool whose lock it
can take: its owner is dead, so it ships that spool's rows above PostgreSQL's mark (with the
spool's own instance id: shipping twice is harmless) and lets the lock go again. An owner starting
meanwhile waits for that drain (at most ~10 s) and never opens its spool without the lock.

Several processes open one spool (its owner, an adopter, the SLA rollup, an operator's sqlite3):
SQLite's own POSIX locks keep that safe only while nothing else in a process opens and closes the
file (fleet.paths.private_file no longer does; issue 17): a process whose locks were dropped that
way let another's last close delete the -wal file it was still committing to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from gateway.ledger import _COLUMNS, Ledger
from gateway.ledger import connect as sqlite_connect
from gateway.state.health import Health

log = logging.getLogger("infermesh.state")

_INSERT = (f"INSERT INTO usage (instance_id, local_id, {', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join(['%s'] * (len(_COLUMNS) + 2))}) ON CONFLICT (instance_id, local_id) DO NOTHING")
_BOOLS = {i + 2 for i, c in enumerate(_COLUMNS) if c in ("stream", "fallback")}
_ERRORS = (psycopg.Error, OSError, asyncio.TimeoutError)
ADOPT_S = 2.0                    # how often a replica looks for a dead replica's spool to ship
DRAIN_RETRY_S = 0.25             # at shutdown, how often shipping is tried again while PostgreSQL does not answer


def spool_instance_id(path: Path, name: str | None = None) -> str:
    """The spool's instance id, created once and kept in the file itself."""
    conn = sqlite_connect(path)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS spool_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT OR IGNORE INTO spool_meta VALUES ('instance_id', ?)",
                     (f"{name or 'gw'}-{uuid.uuid4().hex[:16]}",))
        return conn.execute("SELECT value FROM spool_meta WHERE key = 'instance_id'").fetchone()[0]
    finally:
        conn.close()


class SpoolLedger(Ledger):
    """The SQLite ledger, waking the shipper after each commit."""

    def __init__(self, path: Path, wake) -> None:
        super().__init__(path)
        self._wake = wake

    def committed(self) -> None:
        self._wake()


class PgShipper:
    def __init__(self, spool: Path, dsn: str, health: Health, instance_name: str | None = None,
                 batch: int = 500, idle_s: float = 1.0, retry_s: float = 1.0, op_timeout_s: float = 10.0,
                 linger_s: float = 0.1) -> None:
        self.spool, self.dsn, self.health = spool, dsn, health
        self.instance_id = spool_instance_id(spool, instance_name)
        self.batch, self.idle_s, self.retry_s, self.op_timeout_s = batch, idle_s, retry_s, op_timeout_s
        self.linger_s = linger_s
        self._reader = sqlite3.connect(spool, isolation_level=None, check_same_thread=False)
        self._conn: psycopg.AsyncConnection | None = None
        self.hwm: int | None = None              # highest local id known to be in PostgreSQL
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.shipped = 0
        self.collisions = 0                       # spooled rows whose key PostgreSQL holds for another request
        self.backlog_gauge = None
        self.executor: concurrent.futures.Executor | None = None   # the loop's default; the Adopter gives its own
        # shipping lag (gateway/metrics.py reads lag()): before the first connection the high-water
        # mark is unknown, and rows written since this start are the ones surely not shipped
        try:
            self._started_max = self._spool_max()
        except sqlite3.Error:                     # a new spool: its table comes with the ledger
            self._started_max = 0
        self.unshipped, self.oldest_unshipped_at = 0, None
        health.register("postgres", "ledger")

    def wake(self) -> None:
        self._wake.set()

    # ---- one batch --------------------------------------------------------------------------
    def _read(self, after: int) -> list[tuple]:
        cols = ", ".join(_COLUMNS)
        return self._reader.execute(f"SELECT id, {cols} FROM usage WHERE id > ? ORDER BY id LIMIT ?",
                                    (after, self.batch)).fetchall()

    def _spool_max(self) -> int:
        return self._reader.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()[0]

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=3)
            cur = await self._conn.execute("SELECT coalesce(max(local_id), 0) FROM usage WHERE instance_id = %s",
                                           (self.instance_id,))
            self.hwm = (await cur.fetchone())[0]  # type: ignore[index]  # coalesce(max(...)): always one row
        return self._conn

    async def ship_once(self) -> int:
        """Ship the next batch above the high-water mark; returns how many rows it held."""
        conn = await self._connect()
        rows = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._read, self.hwm)  # type: ignore[arg-type]  # _connect() has set the mark
        if not rows:
            return 0
        params = [(self.instance_id, *(bool(v) if i in _BOOLS else v for i, v in enumerate(r, start=1)))
                  for r in rows]
        async with conn.transaction():
            async with conn.cursor() as cur:
                await cur.executemany(_INSERT, params)
                skipped = len(rows) - cur.rowcount
                if skipped:                       # re-shipped rows are expected; different ones are not
                    await self._check_collisions(cur, rows)
        self.hwm = rows[-1][0]
        self.shipped += len(rows)
        return len(rows)

    async def _check_collisions(self, cur: psycopg.AsyncCursor, rows: list[tuple]) -> None:
        """Rows PostgreSQL already held under this spool's (instance, id). A batch shipped again (its
        commit cut mid-flight, or an adopter shipping a dead replica's spool) finds its own rows
        there; a row with another request id under the same key is a different request that will
        never reach PostgreSQL, so it is said loudly (a spool whose ids were reused: issue 17)."""
        rid = _COLUMNS.index("request_id") + 1
        await cur.execute("SELECT local_id, request_id FROM usage "
                          "WHERE instance_id = %s AND local_id BETWEEN %s AND %s",
                          (self.instance_id, rows[0][0], rows[-1][0]))
        there: dict[int, str] = dict(await cur.fetchall())
        lost = [r[0] for r in rows if r[0] in there and there[r[0]] != r[rid]]
        if lost:
            self.collisions += len(lost)
            log.error("ledger: %d spooled rows of %s collide with other requests' rows in PostgreSQL "
                      "(local ids %s%s): not shipped", len(lost), self.instance_id,
                      ", ".join(map(str, lost[:10])), " ..." if len(lost) > 10 else "")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()              # no round trip: the server may be gone

    def _gauge(self) -> None:
        if self.backlog_gauge is not None:
            with contextlib.suppress(sqlite3.Error):
                self.backlog_gauge.set(max(0, self._spool_max() - (self.hwm or 0)))
        with contextlib.suppress(sqlite3.Error):
            after = self._started_max if self.hwm is None else self.hwm
            self.unshipped = max(0, self._spool_max() - after)
            row = self._reader.execute("SELECT created_at FROM usage WHERE id > ? ORDER BY id LIMIT 1",
                                       (after,)).fetchone()
            self.oldest_unshipped_at = row[0] if row else None

    def lag(self) -> tuple[int, float]:
        """Rows in the spool not yet in PostgreSQL, and the age in seconds of the oldest (0 when none),
        as of the shipper's last round (about every idle_s, or retry_s while PostgreSQL is down)."""
        at = self.oldest_unshipped_at
        return self.unshipped, (max(0.0, time.time() - at) if at is not None else 0.0)

    # ---- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._wake.clear()                    # a record after this point wakes the next round
            try:
                n = await asyncio.wait_for(self.ship_once(), self.op_timeout_s)
            except _ERRORS as e:
                self._close()
                self.health.report("postgres", "ledger", False, e)
                self._gauge()
                await asyncio.sleep(self.retry_s)
                continue
            self.health.report("postgres", "ledger", True)
            self._gauge()
            if n == self.batch:
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.idle_s)
            if self._wake.is_set():
                await asyncio.sleep(self.linger_s)   # let the records of the next ~linger_s join one batch

    async def drain(self, timeout_s: float = 5.0, quiet: bool = False) -> bool:
        """Ship everything now; False if PostgreSQL did not take it all in time.

        At shutdown (SIGTERM: a rollout, a scale-in, a node drain) it tries again every
        DRAIN_RETRY_S until ``timeout_s`` while PostgreSQL does not answer, so a blip at that moment
        strands nothing on the pod's volume. With ``quiet`` (an adopter shipping a dead replica's
        spool) one failure ends it: the adopter comes back every ADOPT_S."""
        deadline = time.monotonic() + timeout_s
        error: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                n = await asyncio.wait_for(self.ship_once(), max(0.1, deadline - time.monotonic()))
            except _ERRORS as e:
                error = e
                self._close()                     # the next try connects afresh
                if quiet:
                    break
                await asyncio.sleep(min(DRAIN_RETRY_S, max(0.0, deadline - time.monotonic())))
                continue
            if n < self.batch:
                return True
        if not quiet:
            log.warning("ledger spool not fully shipped at shutdown within %.0f s (%s); it ships when this "
                        "replica starts again on its state (or from a survivor sharing the state dir)",
                        timeout_s, type(error).__name__ if error else "slow")
        return False

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.drain()
        self._close()
        self._reader.close()


def _spool_top(spool: Path) -> int:
    conn = sqlite3.connect(spool)
    try:
        return conn.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()[0]
    finally:
        conn.close()


class SpoolLock:
    """An exclusive flock on ``<spool dir>/spool.lock``: held by the spool's live owner (or by a
    replica shipping a dead owner's spool); the kernel releases it when the process dies."""

    def __init__(self, spool: Path) -> None:
        self.path = spool.parent / "spool.lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def acquire(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait up to timeout_s for the lock (a survivor shipping this spool holds it for one drain)."""
        deadline = time.monotonic() + timeout_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)            # closing the descriptor drops the lock
            self.fd = None


class Adopter:
    """Ships the spools of dead replicas that share this replica's state dir (see the module's text)."""

    def __init__(self, instances: Path, own: Path, dsn: str, every_s: float = ADOPT_S) -> None:
        self.instances, self.own, self.dsn, self.every_s = instances, own.resolve(), dsn, every_s
        self.adopted = 0                  # rows shipped from dead replicas' spools
        # its own thread: a default pool busy with other blocking calls (PostgreSQL down) never holds it up
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool-adopter")
        self._done: dict[Path, int] = {}   # spool -> its highest row id known to be in PostgreSQL
        self._task: asyncio.Task | None = None

    def orphans(self) -> list[Path]:
        with contextlib.suppress(OSError):
            return sorted(p for p in self.instances.glob("*/ledger.db") if p.parent.resolve() != self.own)
        return []

    async def ship(self, spool: Path) -> int:
        """Ship a spool whose owner is dead (its lock is free); 0 when it is alive or has nothing new."""
        lock = SpoolLock(spool)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(self.executor, lock.try_acquire):
            return 0
        try:
            top = await loop.run_in_executor(self.executor, _spool_top, spool)
            if top == self._done.get(spool):       # shipped already, and its owner wrote nothing since
                return 0
            shipper = await loop.run_in_executor(self.executor, PgShipper, spool, self.dsn, Health())
            shipper.executor = self.executor
            try:
                before = shipper.shipped
                await shipper.drain(timeout_s=10.0, quiet=True)
                n = shipper.shipped - before
                if shipper.hwm == top:
                    self._done[spool] = top
            finally:
                shipper._close()
                shipper._reader.close()
        except (sqlite3.Error, OSError) as e:     # a spool being created or removed: the next round
            log.warning("spool %s not adopted (%s)", spool.parent.name, type(e).__name__)
            return 0
        finally:
            lock.release()
        if n:
            log.warning("shipped %d rows from the spool of %s, whose replica is not running", n, spool.parent.name)
            self.adopted += n
        return n

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            for spool in self.orphans():
                try:
                    await asyncio.wait_for(self.ship(spool), 30.0)
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # (in a task)
                        raise                      # stop()
                    log.warning("spool %s not adopted (cancelled)", spool.parent.name)
                except Exception as e:             # never let one spool stop the adoption of the others
                    log.warning("spool %s not adopted (%s)", spool.parent.name, type(e).__name__)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False)


def query(dsn: str, tenant: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """Rows for reports from the shared ledger, oldest first (the same fields as ledger.query)."""
    where: list[str] = []
    args: list[str | float] = []
    if tenant:
        where.append("tenant = %s")
        args.append(tenant)
    if since is not None:
        where.append("created_at >= %s")
        args.append(since)
    sql = (f"SELECT instance_id, local_id, {', '.join(_COLUMNS)} FROM usage"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created_at, instance_id, local_id")
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        cur = conn.cursor(row_factory=dict_row)
        return list(cur.execute(sql, args))
