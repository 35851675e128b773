"""Keeping the promise under failure (issue 17): drills on three gateway replicas on shared state
(Redis limits, PostgreSQL ledger and keys), as `infermesh up --stack local-ha` runs them, driven
by the official openai SDK (max_retries=0: every failure the gateway lets through is seen).

The harness is tests/test_shared_state.py's: a database ``im_test_<random>`` on 127.0.0.1:5432
(dropped at the end), a redis-server of our own, and a TCP proxy in front of PostgreSQL that the
drills cut to simulate an outage. Figures are printed; bounds are loose for a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import stat
import time

import openai
import pytest
import yaml
from openai import AsyncOpenAI

from fleet import spec as spec_mod
from fleet.local import LocalStack
from tests.test_shared_state import (
    PG_ADMIN,
    PG_HOST,
    PG_PORT,
    Ha,
    RedisServer,
    TcpProxy,
    _config,
    _pg_available,
    wait_for,
    wait_key_live,
)

psycopg = pytest.importorskip("psycopg")
import shutil  # noqa: E402

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
    pytest.mark.skipif(not _pg_available(), reason=f"no PostgreSQL on {PG_HOST}:{PG_PORT}"),
]
STACK = "fail-test"


@pytest.fixture(scope="module")
def ha(tmp_path_factory) -> Ha:
    tmp = tmp_path_factory.mktemp("fail")
    db = f"im_test_{secrets.token_hex(4)}"
    redis = RedisServer(tmp)
    redis.start()
    proxy = TcpProxy((PG_HOST, PG_PORT))
    stacks_dir = tmp / "stacks"
    stacks_dir.mkdir()
    config = _config(redis.port, proxy.port, db)
    (stacks_dir / f"Pulumi.{STACK}.yaml").write_text(
        yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in config.items()}}))
    spec = spec_mod.load(STACK, stacks_dir)
    first = spec.gateway.port + 1
    stack = LocalStack(spec, tmp / "state", stacks_dir=stacks_dir, replica_ports=[first, first + 1, first + 2])
    try:
        stack.start()
        yield Ha(stack, spec, stacks_dir, redis, proxy, f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{db}")
    finally:
        stack.stop()
        redis.stop()
        proxy.close()
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


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
