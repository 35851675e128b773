"""Metering: the ledger's token counts equal what clients were told, request for request, and a
completed request's record survives kill -9 of the gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest
from openai import AsyncOpenAI

from gateway import ledger


async def _one(client: AsyncOpenAI, i: int) -> tuple[str, int, int]:
    """One request of a mixed burst: returns (request id, prompt, completion tokens) as the client saw them."""
    rid = f"burst-{i}"
    h = {"x-request-id": rid}
    kind = i % 4
    if kind == 0:
        r = await client.chat.completions.create(model="demo-chat",
                                                 messages=[{"role": "user", "content": f"q{i} " * (i % 7 + 1)}],
                                                 max_tokens=i % 9 + 1, extra_headers=h)
        return rid, r.usage.prompt_tokens, r.usage.completion_tokens
    if kind == 1:
        usage = None
        async for c in await client.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": f"s{i}"}], stream=True,
                stream_options={"include_usage": True}, max_tokens=i % 5 + 2, extra_headers=h):
            usage = c.usage or usage
        return rid, usage.prompt_tokens, usage.completion_tokens
    if kind == 2:
        r = await client.completions.create(model="demo-mini", prompt=f"p{i} " * 3, max_tokens=3, extra_headers=h)
        return rid, r.usage.prompt_tokens, r.usage.completion_tokens
    usage = None
    async for c in await client.completions.create(model="demo-mini", prompt=f"ps{i}", stream=True,
                                                   stream_options={"include_usage": True}, extra_headers=h):
        usage = c.usage or usage
    return rid, usage.prompt_tokens, usage.completion_tokens


async def test_ledger_tokens_equal_what_clients_were_told(local_stack):
    client = AsyncOpenAI(base_url=local_stack.base_url, api_key=local_stack.key("meter", "business"), max_retries=0)
    told = await asyncio.gather(*(_one(client, i) for i in range(60)))
    rows = {r["request_id"]: r for r in ledger.query(local_stack.state / "ledger.db", tenant="meter")}
    assert len(rows) == 60
    for rid, prompt, completion in told:
        row = rows[rid]
        assert (row["prompt_tokens"] + row["cached_tokens"], row["completion_tokens"], row["status"]) == \
            (prompt, completion, 200), rid
        # a stream's first content event is its TTFT; a whole answer has none (gateway/sla.py)
        assert (row["ttft_ms"] is not None) == bool(row["stream"]) and row["ttlt_ms"] >= (row["ttft_ms"] or 0)
    assert sum(r["completion_tokens"] for r in rows.values()) == sum(t[2] for t in told)


def test_cli_usage_report_totals(local_stack):
    env = {**os.environ, "INFERMESH_STATE_DIR": str(local_stack.state)}
    import json as _json
    # The report reads the stack's ledger through the CLI (stack `local` validates; state dir points at the test's).
    out = subprocess.run([sys.executable, "-m", "infermesh_cli", "usage", "report", "--stack", "local", "--format",
                          "json"], env=env, capture_output=True, text=True, check=True).stdout
    totals = _json.loads(out)
    rows = ledger.query(local_stack.state / "ledger.db")
    assert sum(t["total_tokens"] for t in totals) == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    csv_out = subprocess.run([sys.executable, "-m", "infermesh_cli", "usage", "report", "--stack", "local", "--format",
                              "csv", "--tenant", "nobody-here"], env=env, capture_output=True, text=True, check=True)
    assert csv_out.stdout == ""


async def test_completed_requests_survive_kill_9(stack_factory):
    stack = stack_factory()
    client = AsyncOpenAI(base_url=stack.base_url, api_key=stack.key("crash", "business"), max_retries=0)
    completed: list[str] = []

    async def worker(n: int) -> None:
        for j in range(1000):
            rid = f"k{n}-{j}"
            try:
                await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=2, extra_headers={"x-request-id": rid})
            except Exception:
                return
            completed.append(rid)

    tasks = [asyncio.create_task(worker(n)) for n in range(8)]
    while len(completed) < 40:
        await asyncio.sleep(0.05)
    os.kill(stack.gateway_proc().pid, signal.SIGKILL)
    await asyncio.gather(*tasks)
    stack.gateway_proc().wait(10)
    recorded = {r["request_id"] for r in ledger.query(stack.state / "ledger.db", tenant="crash")}
    missing = [rid for rid in completed if rid not in recorded]
    assert len(completed) >= 40 and not missing


def test_debug_log_only_on_opt_in_and_expires(stack_factory):
    import sqlite3
    import time

    from gateway.keys import KeyAdmin
    from openai import OpenAI

    stack = stack_factory()
    admin = KeyAdmin(stack.state / "keys.db")
    key_off = stack.key("private", "pro")
    key_on = stack.key("debuggy", "pro")
    OpenAI(base_url=stack.base_url, api_key=key_off, max_retries=0).chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "NOT-KEPT-PROMPT"}])
    admin.set_debug_log("debuggy", hours=1)
    OpenAI(base_url=stack.base_url, api_key=key_on, max_retries=0).chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "KEPT-PROMPT"}])
    db = sqlite3.connect(stack.state / "ledger.db")
    rows = db.execute("SELECT tenant, prompt, completion, expires_at FROM debug_log").fetchall()
    assert [r[0] for r in rows] == ["debuggy"] and "KEPT-PROMPT" in rows[0][1] and rows[0][2]
    assert rows[0][3] <= time.time() + 3600 + 5
    led = ledger.Ledger(stack.state / "ledger.db")
    assert led.purge_expired(now=time.time() + 3700) == 1
    assert db.execute("SELECT count(*) FROM debug_log").fetchone()[0] == 0


# ---- the writer itself: group commit, a failed commit, a log that starts over under load ----------
def _rec(i: int) -> ledger.UsageRecord:
    return ledger.UsageRecord(f"g-{i}", "group", "k1", "business", "chat", "demo-chat", status=200,
                              prompt_tokens=i, completion_tokens=2 * i)


async def test_group_commit_shares_transactions_and_loses_nothing(tmp_path):
    led = ledger.Ledger(tmp_path / "ledger.db")
    commits = []
    led.committed = lambda: commits.append(1)
    try:
        await asyncio.gather(*(led.commit(_rec(i)) for i in range(200)))
        # every awaited row is readable from another connection once commit() returned
        rows = ledger.query(tmp_path / "ledger.db", tenant="group")
        assert sorted(r["prompt_tokens"] for r in rows) == list(range(200))
        assert all(r["completion_tokens"] == 2 * r["prompt_tokens"] for r in rows)
        assert 1 <= len(commits) < 200, "rows queued in one pass of the loop share a transaction"
    finally:
        led.close()


async def test_failed_commit_raises_to_every_waiter_and_the_next_one_works(tmp_path):
    led = ledger.Ledger(tmp_path / "ledger.db")
    try:
        led.conn.execute("PRAGMA query_only=1")            # every write now fails
        results = await asyncio.gather(*(led.commit(_rec(i)) for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, ledger.sqlite3.Error) for r in results)
        assert not led.conn.in_transaction
        led.conn.execute("PRAGMA query_only=0")
        await led.commit(_rec(99))
        assert [r["request_id"] for r in ledger.query(tmp_path / "ledger.db")] == ["g-99"]
    finally:
        led.close()


async def test_rows_nobody_waits_for_survive_a_failed_commit(tmp_path):
    """A stream whose client left (499) or that broke is metered with commit_soon: if that
    commit fails, the row is kept and written by a later commit, not lost."""
    led = ledger.Ledger(tmp_path / "ledger.db")
    led.RETRY_S = 0.05
    try:
        led.conn.execute("PRAGMA query_only=1")            # every write now fails
        for i in range(3):
            led.commit_soon(_rec(i))
        with pytest.raises(ledger.sqlite3.Error):
            await led.commit(_rec(50))                     # shares the failed transaction
        assert ledger.query(tmp_path / "ledger.db") == []
        await asyncio.sleep(0.2)                           # retried (and failing) meanwhile
        assert led._rows and led.lost == 0
        led.conn.execute("PRAGMA query_only=0")
        await asyncio.sleep(0.2)                           # the retry timer writes them
        assert [r["request_id"] for r in ledger.query(tmp_path / "ledger.db")] == ["g-0", "g-1", "g-2"]

        led.conn.execute("PRAGMA query_only=1")
        led.MAX_KEPT = 2                                   # bounded: the oldest go first, counted
        for i in range(3, 7):
            led.commit_soon(_rec(i))
        await asyncio.sleep(0)
        led.conn.execute("PRAGMA query_only=0")
        await led.commit(_rec(7))                          # kept rows go first, with the next commit
        ids = [r["request_id"] for r in ledger.query(tmp_path / "ledger.db")]
        assert ids == ["g-0", "g-1", "g-2", "g-5", "g-6", "g-7"] and led.lost == 2
    finally:
        led.close()


async def test_write_ahead_log_starts_over_under_sustained_writes(tmp_path):
    """Passive checkpoints alone never let SQLite start the log over while writes keep coming
    (it grew to hundreds of MB in bench/); the writer restarts it once it passes RESTART_FRAMES."""
    led = ledger.Ledger(tmp_path / "ledger.db")
    led.RESTART_FRAMES = 64
    wal = tmp_path / "ledger.db-wal"
    try:
        for i in range(20_000):
            await led.commit(_rec(i))
            if led.restarts >= 3:
                break
            if i % 50 == 0:
                await asyncio.sleep(0.001)
        assert led.restarts >= 3, "the log was never started over"
        await led.commit(_rec(-1))          # the first commit after a restart cuts the file back
        assert wal.stat().st_size <= 8 << 20
        assert len(ledger.query(tmp_path / "ledger.db", tenant="group")) == i + 2
    finally:
        led.close()


def test_commit_soon_without_an_event_loop_writes_at_once(tmp_path):
    """A relay closed after the loop stopped (shutdown) still leaves its row."""
    led = ledger.Ledger(tmp_path / "ledger.db")
    try:
        led.commit_soon(_rec(7))
        assert [r["request_id"] for r in ledger.query(tmp_path / "ledger.db")] == ["g-7"]
    finally:
        led.close()


def test_a_ledger_written_before_cached_tokens_gains_the_column(tmp_path):
    """An existing ledger.db without `cached_tokens`: opened by this version, its rows stay and
    read 0 cached tokens; new rows carry theirs."""
    import sqlite3
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE usage (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, tenant TEXT NOT NULL, "
                "key_id TEXT NOT NULL, tier TEXT NOT NULL, route TEXT NOT NULL, requested_model TEXT NOT NULL, "
                "served_model TEXT, pool TEXT, provider TEXT, region TEXT, stream INTEGER NOT NULL, "
                "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, status INTEGER NOT NULL, "
                "error TEXT, ttft_ms REAL, ttlt_ms REAL, retries INTEGER NOT NULL, fallback INTEGER NOT NULL, "
                "created_at REAL NOT NULL)")
    old.execute("INSERT INTO usage VALUES (1, 'old', 't', 'k', 'pro', 'chat', 'm', 'm', 'p', 'x', 'r', 0, 7, 3, 200, "
                "NULL, 1.0, 2.0, 0, 0, 1.0)")
    old.commit()
    old.close()
    led = ledger.Ledger(path)
    try:
        led.record(ledger.UsageRecord("new", "t", "k", "pro", "responses", "m", prompt_tokens=5, cached_tokens=20,
                                      completion_tokens=2, status=200))
    finally:
        led.close()
    rows = {r["request_id"]: r for r in ledger.query(path)}
    assert (rows["old"]["prompt_tokens"], rows["old"]["cached_tokens"]) == (7, 0)
    assert (rows["new"]["prompt_tokens"], rows["new"]["cached_tokens"], rows["new"]["route"]) == (5, 20, "responses")
