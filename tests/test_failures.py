"""Keeping the promise under failure (issue 17): drills on three gateway replicas on shared state
(Redis limits, PostgreSQL ledger and keys), as `infermesh up --stack local-ha` runs them, driven
by the official openai SDK (max_retries=0: every failure the gateway lets through is seen).

The harness is tests/test_shared_state.py's: a database ``im_test_<random>`` on 127.0.0.1:5432
(dropped at the end), a redis-server of our own, and a TCP proxy in front of PostgreSQL that the
drills cut to simulate an outage. Figures are printed; bounds are loose for a busy 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncio
import contextlib
import os
import signal
import stat
import threading
import time

import openai
import pytest
from openai import AsyncOpenAI

from fleet import spec as spec_mod
from fleet.local import LocalStack
from tests.test_shared_state import (
    ha_stack,
    PG_HOST,
    PG_PORT,
    Ha,
    _pg_available,
    assert_spools_are_prefixes,
    traffic,
    wait_for,
    wait_key_live,
    wait_ledger,
)

psycopg = pytest.importorskip("psycopg")
import shutil  # noqa: E402

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
    pytest.mark.skipif(not _pg_available(), reason=f"no PostgreSQL on {PG_HOST}:{PG_PORT}"),
]
STACK = "fail-test"


@pytest.fixture(scope="module")
def ha(tmp_path_factory) -> Iterator[Ha]:
    with ha_stack(tmp_path_factory.mktemp("fail"), STACK) as running:
        yield running


def _get(url: str) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


async def sdk_call(base_url: str, key: str) -> int | str:
    """One chat completion on a fresh client (a fresh connection: the kernel picks the replica on
    the shared port); 200, the error's HTTP status, or the kind of connection failure."""
    async with AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10) as client:
        try:
            r = await client.chat.completions.create(model="demo-chat", max_tokens=4,
                                                     messages=[{"role": "user", "content": "hello"}])
            assert r.choices[0].message.content
            return 200
        except openai.APIStatusError as e:
            return e.status_code
        except openai.APIConnectionError as e:
            return type(e).__name__


def kill_replica(ha: Ha, i: int, sig: int = signal.SIGKILL) -> None:
    proc = next(p for n, p in ha.stack.procs if n == f"gateway-{i}" and p.poll() is None)
    os.kill(proc.pid, sig)
    proc.wait(15)


# ---------------------------------------------------------------------------------- 1. keys
async def test_postgres_down_while_replicas_restart_no_401_not_ready_without_keys(ha):
    key = ha.key("pro")
    await wait_key_live(ha, key)
    cache = ha.stack.state / "instances" / "gw-1" / "keys.cache.json"
    await wait_for(lambda: _async(cache.exists() and key.split(".")[0][3:] in cache.read_text()), 5,
                   "the new key in gw-1's disk cache")
    text = cache.read_text()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert key not in text and key.split(".", 1)[1] not in text       # hashes only, never a key's secret

    ha.proxy.cut()                                 # PostgreSQL unreachable from every replica
    try:
        # replica 1 restarts: it serves the key set from its disk cache
        kill_replica(ha, 1)
        t0 = time.monotonic()
        ha.stack.start_replica(1)                  # waits for /ready
        ready_s = time.monotonic() - t0
        assert "from the disk cache" in ha.log(1)
        direct = [await sdk_call(ha.url(1), key) for _ in range(10)]
        assert direct == [200] * 10, direct

        # replica 2 restarts with no cache at all: alive, not ready, off the shared port, never a 401
        kill_replica(ha, 2)
        (ha.stack.state / "instances" / "gw-2" / "keys.cache.json").unlink()
        ha.stack.start_replica(2, ready=False)     # waits for /health only
        assert _get(ha.root(2) + "/ready") == 503
        assert _get(ha.root(2) + "/health") == 200
        own = await sdk_call(ha.url(2), key)       # the one way to reach it: its own port
        assert own == 503, own
        shared = await asyncio.gather(*(sdk_call(ha.stack.base_url, key) for _ in range(60)))
        await asyncio.sleep(0.5)
        assert _get(ha.root(2) + "/ready") == 503
    finally:
        ha.proxy.restore()
    took = await wait_for(lambda: _async(_get(ha.root(2) + "/ready") == 200), 10, "replica 2 ready once PG answers")
    after = await sdk_call(ha.url(2), key)
    statuses = {s: shared.count(s) for s in set(shared)}
    print(f"\n[keys] PG down: replica from cache ready in {ready_s:.1f}s, 10/10 direct ok; replica without "
          f"keys: /ready 503, own port {own}; 60 on the shared port: {statuses}; ready {took:.1f}s after PG back")
    assert shared.count(200) == 60, statuses       # no 401 and no request given to the keyless replica
    assert after == 200


async def _async(value):
    return value


# ---------------------------------------------------------------------------------- 2. rows
def spool_top(ha: Ha, i: int) -> tuple[str, int]:
    """(instance id, highest row id) of replica i's spool, read from the file."""
    import sqlite3
    conn = sqlite3.connect(ha.stack.state / "instances" / f"gw-{i}" / "ledger.db")
    try:
        inst = conn.execute("SELECT value FROM spool_meta WHERE key = 'instance_id'").fetchone()[0]
        return inst, conn.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()[0]
    finally:
        conn.close()


def _unlinked_spool_files(ha: Ha) -> list[str]:
    """Spool files a live replica still has open after they were deleted (its commits to them are
    lost): what the missing rows of issue 17 came from."""
    out = []
    for name, proc in ha.stack.procs:
        if not name.startswith("gateway") or proc.poll() is not None:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                    if "/instances/" in target and target.endswith("(deleted)"):
                        out.append(f"{name}: {target.rsplit('/', 1)[-1]}")
    return sorted(set(out))


def _where_missing(ha: Ha) -> str:
    """For a failed ledger wait: in which replica's spool the missing rows are, and each spool's
    top against PostgreSQL's mark."""
    import sqlite3
    have = {r[0] for r in ha.pg("SELECT request_id FROM usage WHERE request_id = ANY(%s)", list(ha.completed))}
    missing = set(ha.completed) - have
    out = []
    for i in range(3):
        conn = sqlite3.connect(ha.stack.state / "instances" / f"gw-{i}" / "ledger.db")
        try:
            ids = [r[0] for r in conn.execute("SELECT id, request_id FROM usage").fetchall() if r[1] in missing]
        finally:
            conn.close()
        inst, top = spool_top(ha, i)
        mark = ha.pg("SELECT coalesce(max(local_id), 0) FROM usage WHERE instance_id = %s", inst)[0][0]
        out.append(f"gw-{i}: missing local ids {ids[:10]}, spool top {top}, PostgreSQL mark {mark}")
    return "; ".join(out) + f"; open but deleted: {_unlinked_spool_files(ha) or 'none'}"


async def test_dead_replicas_spool_is_shipped_by_a_survivor(ha):
    """Rows left in a SIGKILLed replica's spool (PostgreSQL was away, so none had shipped) reach
    PostgreSQL through the live replicas, with the dead one never started again."""
    keys = [ha.key("pro") for _ in range(3)]
    for k in keys:
        await wait_key_live(ha, k)
    ha.completed.clear()
    ha.proxy.cut()
    try:
        await traffic(ha, keys, 90, replicas=(0, 1, 2), concurrency=6)
        kill_replica(ha, 1)
        inst, top = spool_top(ha, 1)
        stranded = top - (ha.pg("SELECT coalesce(max(local_id), 0) FROM usage WHERE instance_id = %s", inst)[0][0])
    finally:
        ha.proxy.restore()
    t0 = time.monotonic()
    try:
        await wait_ledger(ha, dict(ha.completed), timeout=20)
    except AssertionError as e:
        raise AssertionError(f"{e}; {_where_missing(ha)}") from None
    took = time.monotonic() - t0
    adopted = sum(ha.log(i).count("from the spool of gw-1") for i in (0, 2))
    print(f"\n[spool] {len(ha.completed)} answered; {stranded} rows in the killed replica's spool, not in "
          f"PostgreSQL; all in PostgreSQL {took:.1f}s after it answered again, shipped by a survivor")
    assert stranded >= 20, stranded
    assert adopted >= 1
    assert_spools_are_prefixes(ha)
    assert not _unlinked_spool_files(ha)       # no live replica committing to a deleted -wal
    ha.stack.start_replica(1)          # the harness's next drills want three replicas
    await wait_key_live(ha, keys[0])


async def test_sigkill_mid_load_supervised_restart_every_answered_row_in_postgres(ha):
    """`infermesh up`'s supervision (LocalStack.supervise, every 0.5 s as `up` calls it) starts a
    SIGKILLed replica again by itself; every answered request's row reaches PostgreSQL once."""
    keys = [ha.key("pro") for _ in range(3)]
    for k in keys:
        await wait_key_live(ha, k)
    ha.completed.clear()
    stop_sup = threading.Event()

    def supervisor():
        while not stop_sup.wait(0.5):
            ha.stack.supervise()
    sup = threading.Thread(target=supervisor, daemon=True)
    sup.start()
    try:
        before = ha.stack.restarts.get("gateway-1", 0)
        stop = asyncio.Event()
        run = asyncio.create_task(traffic(ha, keys, stop=stop, concurrency=12))
        await asyncio.sleep(1.0)
        t_kill = time.monotonic()
        kill_replica(ha, 1)
        back = await wait_for(lambda: _async(_get(ha.root(1) + "/ready") == 200), 15, "gateway-1 started again")
        await asyncio.sleep(1.0)
        stop.set()
        results = await run
    finally:
        stop_sup.set()
        sup.join(5)
    cut = sum(r.status == 0 for r in results)
    assert all(r.status in (0, 200) for r in results), {r.status for r in results}
    assert ha.stack.restarts.get("gateway-1", 0) == before + 1
    try:
        await wait_ledger(ha, dict(ha.completed), timeout=15)
    except AssertionError as e:
        raise AssertionError(f"{e}; {_where_missing(ha)}") from None
    print(f"\n[supervise] {len(ha.completed)} answered, {cut} refused on its own port while it was down; "
          f"gateway-1 ready again {back:.1f}s after SIGKILL (no hand restart); every answered row in PostgreSQL once")
    assert back < 10
    assert_spools_are_prefixes(ha)
    assert not _unlinked_spool_files(ha)       # the restarted replica's spool is the file on disk
    del t_kill


async def test_sigterm_ships_the_spool_before_exit_as_a_kubernetes_pod(ha, tmp_path):
    """A gateway as a Kubernetes pod runs it (the plan's gateway config, its own state dir: the
    pod's volume, no --instance, no survivor sharing it): rows spooled while PostgreSQL is away
    are shipped during the SIGTERM drain, PostgreSQL answering again only after the signal, and
    the process exits 0 with its spool fully in PostgreSQL (a scaled-in pod strands nothing)."""
    import subprocess
    import sys

    from tests.conftest import REPO, free_port, kill_tree
    key = ha.key("pro")
    port, pod_state = free_port(), tmp_path / "pod-0"
    log = tmp_path / "pod-0.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(ha.stack.state / "routing.json"),
                                 "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(pod_state)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_for(lambda: _async(_get(url + "/ready") == 200), 30, "the pod-shaped gateway ready")
        ha.proxy.cut()
        try:
            answered = [await sdk_call(url + "/v1", key) for _ in range(20)]
            assert answered == [200] * 20, answered
            import sqlite3
            conn = sqlite3.connect(pod_state / "ledger.db")
            try:
                inst = conn.execute("SELECT value FROM spool_meta WHERE key = 'instance_id'").fetchone()[0]
                top = conn.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()[0]
            finally:
                conn.close()
            assert top >= 20
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)               # the drain has begun, PostgreSQL still away
            waiting = proc.poll() is None          # it waits for PostgreSQL instead of leaving rows behind
        finally:
            ha.proxy.restore()
        rc = await asyncio.to_thread(proc.wait, 30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    mark = ha.pg("SELECT coalesce(max(local_id), 0), count(*) FROM usage WHERE instance_id = %s", inst)[0]
    text = log.read_text(errors="replace")
    print(f"\n[sigterm] {top} rows spooled with PostgreSQL away; SIGTERM, PostgreSQL back 1.5 s later; exit {rc} "
          f"after {took:.1f}s with {mark[1]} rows in PostgreSQL (mark {mark[0]})")
    assert rc == 0, text[-2000:]
    assert waiting
    assert tuple(mark) == (top, top), (mark, top)
    assert "not fully shipped" not in text


def test_supervise_backs_off_a_replica_that_keeps_dying(tmp_path):
    """Restart delays: 0.5 s after a death, doubling while it dies again soon after each start,
    capped; a long run resets it. No process is started: start_replica is recorded."""
    from fleet import local

    class Dead:
        def poll(self):
            return 1
    spec = spec_mod.load("local-ha")
    stack = LocalStack(spec, tmp_path)
    starts: list[float] = []
    clock = [1000.0]

    def fake_start(i, wait=True, timeout=30.0, ready=True):
        starts.append(clock[0])
        stack._started[f"gateway-{i}"] = clock[0]
        stack.procs = [(n, p) for n, p in stack.procs if n != f"gateway-{i}"] + [(f"gateway-{i}", Dead())]
    stack.start_replica = fake_start
    stack.procs = [("gateway-0", Dead())]
    stack._started["gateway-0"] = 0.0          # it ran long before its first death
    while clock[0] < 1100:
        stack.supervise(now=clock[0])
        clock[0] += 0.05
    gaps = [round(b - a, 2) for a, b in zip([1000.0, *starts], starts, strict=False)]
    print(f"\n[backoff] restart gaps {gaps}")
    assert gaps[:7] == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0], abs=0.11)
    assert max(gaps) == pytest.approx(local.RESTART_MAX_S, abs=0.11)
    assert stack.restarts["gateway-0"] == len(starts)
    stack._restart_at.clear()                  # the replica ran 100 s this time before it died
    stack._started["gateway-0"] = clock[0] - 100
    t0, n = clock[0], len(starts)
    while len(starts) == n:
        stack.supervise(now=clock[0])
        clock[0] += 0.05
    assert starts[-1] - t0 == pytest.approx(local.RESTART_BASE_S, abs=0.11)


async def test_sigterm_never_leaves_a_kept_alive_client_without_an_answer(ha):
    """Clients on the shared port, each on its own kept-alive connection in a tight loop; one
    replica gets SIGTERM: every request is answered (served, the draining replica's with
    Connection: close, then the client's next connection goes to a live replica)."""
    key = ha.key("pro")
    await wait_key_live(ha, key)
    stop = asyncio.Event()
    statuses: list[int | str] = []
    closes = 0

    async def client():
        nonlocal closes
        async with AsyncOpenAI(base_url=ha.stack.base_url, api_key=key, max_retries=0, timeout=10) as c:
            while not stop.is_set():
                try:
                    raw = await c.chat.completions.with_raw_response.create(
                        model="demo-chat", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
                    raw.parse()
                    statuses.append(200)
                    closes += raw.headers.get("connection", "").lower() == "close"
                except openai.APIStatusError as e:
                    statuses.append(e.status_code)
                except openai.APIConnectionError as e:
                    statuses.append(f"{type(e).__name__}: {e.__cause__!r:.80}")
    tasks = [asyncio.create_task(client()) for _ in range(24)]
    try:
        await asyncio.sleep(1.5)
        victim = next(p for n, p in ha.stack.procs if n == "gateway-1" and p.poll() is None)
        t0 = time.monotonic()
        victim.send_signal(signal.SIGTERM)
        await asyncio.to_thread(victim.wait, 30)
        exited = time.monotonic() - t0
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    failed = [s for s in statuses if s != 200]
    print(f"\n[sigterm] {len(statuses)} requests by 24 kept-alive clients on the shared port, one replica "
          f"drained (exit {victim.returncode} after {exited:.1f}s): {len(failed)} unanswered {failed[:3]}, "
          f"{closes} answered with Connection: close")
    assert victim.returncode == 0
    assert not failed
    assert closes >= 1
    ha.stack.start_replica(1)
    await wait_key_live(ha, key)


# ---------------------------------------------------------------------------------- 5. overflow
class FakeUpstream:
    """An OpenAI-compatible upstream (the overflow) in a thread: counts requests and the most it
    ran at once; ``mode`` "quota" answers 429 insufficient_quota, "auth" 401."""

    def __init__(self, delay_s: float = 0.4) -> None:
        from aiohttp import web

        self.delay_s, self.mode = delay_s, "ok"
        self.running = self.most = self.calls = 0
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        from tests.conftest import free_port
        self.port = free_port()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _models(self, request):
        from aiohttp import web
        return web.json_response({"object": "list", "data": [{"id": "qwen/qwen3-235b-a22b-instruct-2507-fp8"}]})

    async def _chat(self, request):
        from aiohttp import web
        self.calls += 1
        if self.mode == "quota":
            return web.json_response({"error": {"message": "You exceeded your current quota.",
                                                "type": "insufficient_quota", "code": "insufficient_quota"}},
                                     status=429)
        if self.mode == "auth":
            return web.json_response({"error": {"message": "Invalid API key", "code": "invalid_api_key"}},
                                     status=401)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.running -= 1
        return web.json_response({
            "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "upstream",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the overflow"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _with_overflow(ha: Ha, up: FakeUpstream, max_concurrency: int, rpm: int, key: str = "gonkagate-api-key") -> str:
    """demo-chat gets an overflow pool (weight 50 against the workers' 3) with declared limits;
    returns the routing file as it was."""
    import json
    path = ha.stack.state / "routing.json"
    before = path.read_text()
    routing = json.loads(before)
    demo = next(m for m in routing["models"] if m["id"] == "demo-chat")
    demo["pools"].append({"name": "overflow", "provider": "gonka", "region": "local", "role": "primary",
                          "weight": 50, "upstream_model": "qwen/qwen3-235b-a22b-instruct-2507-fp8",
                          "endpoints": [{"id": "overflow/0", "url": up.url, "credentials": key,
                                         "channel": "https", "max_concurrency": max_concurrency, "rpm": rpm}]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(routing))
    os.replace(tmp, path)
    return before


async def _overflow_live(ha: Ha) -> None:
    import json
    import urllib.request
    token = (ha.stack.state / "admin.token").read_text().strip()

    def live(i: int) -> bool:
        req = urllib.request.Request(ha.root(i) + "/admin/endpoints", headers={"authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            pools = json.loads(r.read())["pools"]
        return any(p["pool"] == "overflow" and p["endpoints"][0]["available"] for p in pools)
    await wait_for(lambda: _async(all(live(i) for i in range(3))), 10, "the overflow pool on every replica")


def _restore_routing(ha: Ha, before: str) -> None:
    path = ha.stack.state / "routing.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(before)
    os.replace(tmp, path)


async def test_overflow_upstream_limits_hold_across_replicas_and_quota_errors_take_it_out(ha):
    key = ha.key("pro")
    await wait_key_live(ha, key)
    up = FakeUpstream(delay_s=0.5)
    before = _with_overflow(ha, up, max_concurrency=50, rpm=100_000)
    try:
        await _overflow_live(ha)
        clients = [AsyncOpenAI(base_url=ha.url(i), api_key=key, max_retries=0, timeout=30) for i in range(3)]

        async def one(i: int):
            try:
                r = await clients[i % 3].chat.completions.create(
                    model="demo-chat", max_tokens=4, messages=[{"role": "user", "content": f"overflow {i}"}])
                return r.choices[0].message.content
            except openai.APIError as e:
                return repr(e)
        t0 = time.monotonic()
        answers = await asyncio.gather(*(one(i) for i in range(100)))
        took = time.monotonic() - t0
        at_upstream = sum(a == "from the overflow" for a in answers)
        failed = [a for a in answers if not a or a.startswith(("APIError", "Internal", "APIStatus", "RateLimit",
                                                                 "APIConnection"))]
        print(f"\n[overflow] 100 concurrent over 3 replicas against a declared 50: at most {up.most} at once at "
              f"the upstream ({at_upstream} answered there, the rest by the workers) in {took:.1f}s; "
              f"{len(failed)} failed")
        assert up.most <= 50
        assert up.most >= 30                       # it was used up to its limit, not avoided
        assert not failed, failed[:3]

        # RPM (another key: a minute of its own): 30 a minute declared; of 60 sequential requests that
        # nearly all pick it first, 30 reach it and the rest go to the workers
        _restore_routing(ha, before)
        await asyncio.sleep(1.5)
        _with_overflow(ha, up, max_concurrency=50, rpm=30, key="rpm-test-key")
        await _overflow_live(ha)
        calls0 = up.calls
        answers = [await one(i) for i in range(60)]
        rpm_calls = up.calls - calls0
        print(f"[overflow] rpm 30 declared: {rpm_calls} of 60 sequential requests reached it")
        assert 25 <= rpm_calls <= 30
        assert all(a and not a.startswith(("APIError", "Internal", "APIStatus")) for a in answers), answers[:3]

        # insufficient_quota: out at once, no retry there; the workers answer
        _restore_routing(ha, before)
        await asyncio.sleep(1.5)
        _with_overflow(ha, up, max_concurrency=50, rpm=100_000)
        await _overflow_live(ha)
        up.mode = "quota"
        calls0 = up.calls
        answers = [await one(i) for i in range(30)]
        quota_calls = up.calls - calls0
        print(f"[overflow] insufficient_quota: {quota_calls} requests reached it (one per replica at most), "
              f"30/30 answered by the workers: {all(a and 'from' not in a for a in answers)}")
        assert quota_calls <= 3
        assert all(a and not a.startswith(("APIError", "Internal", "APIStatus")) for a in answers), answers[:3]
        for c in clients:
            await c.close()
    finally:
        _restore_routing(ha, before)
        up.close()
