"""The ledger spool's file safety across processes (issue 17): no PostgreSQL needed.

A gateway replica's spool (gateway/state/pg_ledger.py) is one SQLite file opened by several
processes: its owner writes it, a survivor's adopter ships it when the owner is dead, the SLA
rollup and an operator read it. Two ways that lost answered rows, each shown here:

- a second connection opened by the owner (fleet.paths.private_file opening and closing the file
  first) dropped the owner's POSIX locks; another process's close then deleted the -wal file the
  owner was still committing to;
- a restarted owner opened its spool before it held the spool's lock, while an adopter shipped it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet import spec as spec_mod
from fleet.paths import private_file
from gateway.ledger import Ledger, UsageRecord
from gateway.state.pg_ledger import SpoolLock, spool_instance_id


def _rec(i: int) -> UsageRecord:
    return UsageRecord(request_id=f"r-{i}", tenant="t", key_id="k", tier="pro", route="chat",
                       requested_model="m", status=200)


def _count_elsewhere(path: Path) -> int:
    """Rows another process sees: it opens the spool, reads, and closes (as an adopter or sqlite3 does)."""
    out = subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                          "print(c.execute('SELECT count(*) FROM usage').fetchone()[0]); c.close()", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def _wal_deleted(path: Path) -> bool:
    fds = Path(f"/proc/{os.getpid()}/fd")
    links = []
    for fd in fds.iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return any(link.startswith(str(path)) and link.endswith("(deleted)") for link in links)


def test_another_processes_close_never_deletes_the_wal_a_writer_still_uses(tmp_path):
    """The owner's order at start: the shipper's connections (spool_instance_id, its reader), then
    the ledger's own. Another process opening and closing the spool must find it in use."""
    spool = tmp_path / "instances" / "gw-0" / "ledger.db"
    spool.parent.mkdir(parents=True)
    spool_instance_id(spool, "gw-0")
    import sqlite3
    reader = sqlite3.connect(spool, isolation_level=None, check_same_thread=False)
    reader.execute("SELECT count(*) FROM spool_meta").fetchone()      # the shipper reads at once
    writer = Ledger(spool)                    # connect(): private_file on a file this process has open
    try:
        assert reader.execute("SELECT count(*) FROM usage").fetchone()[0] == 0
        for i in range(5):
            writer.record(_rec(i))
        assert _count_elsewhere(spool) == 5   # ... and closes: it must not take itself for the last user
        assert spool.with_name("ledger.db-wal").exists()
        for i in range(5, 12):
            writer.record(_rec(i))
        assert not _wal_deleted(spool)
        assert _count_elsewhere(spool) == 12, "rows committed after another process's close went to an unlinked -wal"
    finally:
        writer.close()
        reader.close()


def test_private_file_creates_0600_and_tightens_without_opening(tmp_path):
    p = private_file(tmp_path / "d" / "x.db")
    assert p.exists() and (p.stat().st_mode & 0o777) == 0o600
    p.chmod(0o644)
    private_file(p)
    assert (p.stat().st_mode & 0o777) == 0o600


def _pg_spec() -> spec_mod.Spec:
    spec = spec_mod.load("local-ha")
    assert spec.gateway.state.ledger == "postgres"
    return spec


def test_a_starting_replica_opens_its_spool_only_once_it_holds_the_lock(tmp_path, monkeypatch):
    """An adopter (here: a lock held in a thread) is shipping the spool: State waits for the lock,
    and has not created or opened the spool until it has it."""
    from gateway import state as state_mod
    home = tmp_path / "instances" / "gw-1"
    home.mkdir(parents=True)
    held = SpoolLock(home / "ledger.db")
    assert held.try_acquire()
    seen: dict[str, bool] = {}

    def adopter_done():
        time.sleep(0.6)
        seen["spool opened while locked"] = (home / "ledger.db").exists()
        held.release()
    t = threading.Thread(target=adopter_done)
    t.start()
    t0 = time.monotonic()
    st = state_mod.State(_pg_spec(), tmp_path, "gw-1")
    waited = time.monotonic() - t0
    t.join()
    try:
        assert seen == {"spool opened while locked": False}
        assert waited >= 0.5, waited
        assert st.spool_lock.fd is not None
        assert not SpoolLock(home / "ledger.db").try_acquire()     # held by the replica now
    finally:
        st.ledger.close()
        st.shipper._reader.close()
        st.spool_lock.release()


def test_a_replica_never_runs_on_a_spool_another_live_process_holds(tmp_path, monkeypatch):
    from gateway import state as state_mod
    monkeypatch.setattr(state_mod, "SPOOL_LOCK_WAIT_S", 0.3)
    home = tmp_path / "instances" / "gw-1"
    home.mkdir(parents=True)
    held = SpoolLock(home / "ledger.db")
    assert held.try_acquire()
    try:
        with pytest.raises(RuntimeError, match="stayed locked"):
            state_mod.State(_pg_spec(), tmp_path, "gw-1")
        assert not (home / "ledger.db").exists()
    finally:
        held.release()


async def test_a_spooled_row_colliding_with_another_requests_row_is_said_loudly(tmp_path, caplog):
    """Shipping is INSERT ... ON CONFLICT DO NOTHING keyed by (instance, local id): a batch shipped
    again skips its own rows quietly, but a row of another request under the same key (a spool whose
    ids were reused) would vanish; the shipper counts it and logs it (real PostgreSQL)."""
    import uuid

    import psycopg

    from gateway.state.health import Health
    from gateway.state.migrate import ensure_database, migrate
    from gateway.state.pg_ledger import PgShipper

    db = f"imt_collide_{uuid.uuid4().hex[:8]}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{db}"
    ensure_database(dsn)
    try:
        migrate(dsn)
        spool = tmp_path / "ledger.db"
        shipper = PgShipper(spool, dsn, Health(), "gw-c")
        ledger = Ledger(spool)
        for i in range(3):
            ledger.record(_rec(i))
        assert await shipper.ship_once() == 3 and shipper.collisions == 0
        shipper.hwm = 0                         # ship the same batch again: its own rows, skipped quietly
        assert await shipper.ship_once() == 3 and shipper.collisions == 0
        with psycopg.connect(dsn, autocommit=True) as conn:    # id 2 now holds another request's row
            conn.execute("UPDATE usage SET request_id = 'someone-else' WHERE instance_id = %s AND local_id = 2",
                         (shipper.instance_id,))
        shipper.hwm = 0
        with caplog.at_level("ERROR", logger="infermesh.state"):
            await shipper.ship_once()
        assert shipper.collisions == 1
        assert "1 spooled rows" in caplog.text and "local ids 2" in caplog.text
        shipper._close()
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
