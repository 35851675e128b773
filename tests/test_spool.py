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
