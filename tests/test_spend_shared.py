"""A key's monthly spend limit across three gateway replicas on Redis and PostgreSQL (issue 22):
the key admits exactly up to its limit, whichever replicas its requests reach, concurrently or not.

The harness is tests/test_shared_state.py's (its own redis-server, a database of its own on the
machine's PostgreSQL, three gateway processes), with one more tier priced at $1 per 1M tokens."""

from __future__ import annotations

from collections.abc import Iterator

import asyncio
import itertools
import secrets
from collections import Counter

import aiohttp
import pytest

from gateway.state import key_admin
from tests.test_shared_state import (
    ha_stack,
    STACK,
    Ha,
    call,
    pytestmark,  # noqa: F401  (skipped where PostgreSQL or redis-server is absent)
    wait_for,
    wait_key_live,
)

LIMIT = 500                   # micro-dollars


def _spender(config: dict) -> None:
    config["tiers"].append({"name": "spender", "models": ["demo-chat", "demo-mini"], "rpm": 100_000,
                            "tpm": 100_000_000, "priority": 1, "price_per_1m_tokens": 1.0})


@pytest.fixture(scope="module")
def spend_ha(tmp_path_factory) -> Iterator[Ha]:
    with ha_stack(tmp_path_factory.mktemp("spend"), mutate=_spender) as running:
        yield running


async def test_a_key_at_its_spend_limit_across_three_replicas_admits_exactly_up_to_it(spend_ha):
    ha = spend_ha
    admin = key_admin(ha.spec, ha.stack.state)                 # what `infermesh keys create --monthly-spend` uses
    try:
        key, info = admin.create(f"s-{secrets.token_hex(4)}", "spender", None, LIMIT)
    finally:
        admin.close()
    await wait_key_live(ha, key)
    # By hand, at $1 per 1M tokens (1 micro-$ a token): "hello r-<16 hex>" is 2 words + 3 = 5 prompt tokens at the
    # sim and max_tokens=4 gives 4 completion tokens: each request costs 9. The hold before dispatch: the estimate
    # (4 a message + role 4 + user 4 + content 7 + 24 characters = 43 -> 43 // 4 + 1 = 11 tokens) + 4 = 15. A request
    # is admitted while spent + held + 15 <= 500: the 54th at spent 477 (492), never a 55th (486 + 15 = 501).
    expected = (LIMIT - 15) // 9 + 1
    assert expected == 54
    results: list[tuple[int, object]] = []
    counter = itertools.count()

    async def worker(session):              # 150 requests, 30 at a time, round robin over the replicas
        while (i := next(counter)) < 150:
            results.append((i % 3, await call(session, ha.url(i % 3), key, max_tokens=4)))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(30)))
        burst_ok = sum(1 for _, r in results if r.status == 200)
        # then one at a time (each hold settled before the next), until every replica refuses twice in a row
        refused_in_a_row, i = 0, 0
        while refused_in_a_row < 6:
            await asyncio.sleep(0.05)
            r = await call(session, ha.url(i % 3), key, max_tokens=4)
            results.append((i % 3, r))
            refused_in_a_row = refused_in_a_row + 1 if r.status == 429 else 0
            i += 1
    statuses = Counter(r.status for _, r in results)
    ok = [r for _, r in results if r.status == 200]
    assert set(statuses) <= {200, 429}, statuses
    assert all(r.tokens == (5, 4) for r in ok)
    assert burst_ok <= expected
    assert len(ok) == expected, (burst_ok, statuses)
    assert {rep for rep, r in results if r.status == 200} == {0, 1, 2}, "each replica admitted some"
    for _, r in results:
        if r.status == 429:
            assert r.body["error"]["code"] == "insufficient_quota" and r.headers["x-should-retry"] == "false"

    async def shipped():
        return ha.pg("SELECT count(*) FROM usage WHERE key_id = %s AND status = 200", info.id)[0][0] == expected
    await wait_for(shipped, 15, "every admitted request in PostgreSQL")
    [(spent, rows)] = ha.pg("SELECT sum(price_micro_usd), count(*) FROM usage WHERE key_id = %s AND status = 200",
                            info.id)
    assert spent == 9 * expected == 486 <= LIMIT
    # the counter on Redis holds exactly what the ledger charged: every hold was settled
    import redis as redis_mod
    month = next(iter(ha.pg("SELECT to_char(to_timestamp(min(created_at)) AT TIME ZONE 'UTC', 'YYYY-MM') FROM usage "
                            "WHERE key_id = %s", info.id)))[0]
    r = redis_mod.Redis(port=ha.redis.port)
    assert int(r.get(f"infermesh:{STACK}:spend:{info.id}:{month}")) == 486


async def test_a_lost_counter_starts_from_the_ledger_and_redis_down_follows_the_tier(spend_ha):
    """Redis restarted empty: the key's month starts from PostgreSQL's sum, so a key at its limit stays
    at it. Redis down: a tier that fails closed (hobby, the lowest) answers 503; one that fails open
    holds against the replica's own counter, also started from the ledger."""
    ha = spend_ha
    admin = key_admin(ha.spec, ha.stack.state)
    try:
        key, info = admin.create(f"s-{secrets.token_hex(4)}", "spender", None, 30)
        hobby_key, _ = admin.create(f"h-{secrets.token_hex(4)}", "hobby", None, 1_000_000)
    finally:
        admin.close()
    await wait_key_live(ha, key)
    await wait_key_live(ha, hobby_key)
    async with aiohttp.ClientSession() as s:
        # 9 each, hold 15: 0 + 15, 9 + 15 ok; 18 + 15 > 30 refused
        got = [(await call(s, ha.url(i % 3), key, max_tokens=4)).status for i in range(2)]
        assert got == [200, 200]

        async def shipped():
            return ha.pg("SELECT count(*) FROM usage WHERE key_id = %s AND status = 200", info.id)[0][0] == 2
        await wait_for(shipped, 15, "both rows in PostgreSQL")
        ha.redis.stop()
        ha.redis.start()                                   # empty: no counter for the key any more
        await asyncio.sleep(3.0)                           # the replicas find Redis back (probe <= ~2.5 s)
        r = await call(s, ha.url(2), key, max_tokens=4)
        assert r.status == 429 and r.body["error"]["code"] == "insufficient_quota"     # 18 (ledger) + 15 > 30
        ha.redis.stop()
        try:
            await asyncio.sleep(1.0)
            down = await call(s, ha.url(0), hobby_key, max_tokens=4)
            assert down.status == 503 and down.body["error"]["code"] == "limits_unavailable"
            local = await call(s, ha.url(1), key, max_tokens=4)         # fails open: own counter from the ledger
            assert local.status == 429 and local.body["error"]["code"] == "insufficient_quota"
        finally:
            ha.redis.start()
            await asyncio.sleep(3.0)


async def test_invoice_from_the_shared_ledger(spend_ha):
    """The month's invoice read from PostgreSQL (keys and ledger): provisional, usage at $1 per 1M."""
    import time

    from infermesh_cli.commands import billing
    from gateway.money import month_now

    ha = spend_ha
    admin = key_admin(ha.spec, ha.stack.state)
    try:
        tenant = f"i-{secrets.token_hex(4)}"
        key, _ = admin.create(tenant, "spender")
    finally:
        admin.close()
    await wait_key_live(ha, key)
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            assert (await call(s, ha.url(i), key, max_tokens=4)).status == 200

    async def shipped():
        return ha.pg("SELECT count(*) FROM usage WHERE tenant = %s", tenant)[0][0] == 3
    await wait_for(shipped, 15, "rows in PostgreSQL")
    doc = billing.compute(ha.spec, ha.stack.state, month_now()[0], time.time())
    assert doc["status"] == "provisional"
    inv = next(x for x in doc["invoices"] if x["tenant"] == tenant)
    # 3 requests x (5 input + 4 output) tokens at $1 per 1M: 15 and 12 micro-$, 0 cents each
    lines = {x["token_class"]: (x["tokens"], x["amount_micro_usd"]) for x in inv["lines"] if x["kind"] == "usage"}
    assert lines == {"input": (15, 15), "output": (12, 12)} and inv["total_cents"] == 0


async def test_streams_settle_their_holds(spend_ha):
    """Streamed answers, completed or cut by the client, leave the key's counter at what the ledger charged."""
    ha = spend_ha
    admin = key_admin(ha.spec, ha.stack.state)
    try:
        key, info = admin.create(f"st-{secrets.token_hex(4)}", "spender", None, 10_000)
    finally:
        admin.close()
    await wait_key_live(ha, key)
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            r = await call(s, ha.url(i % 3), key, max_tokens=4, stream=True)
            assert r.status == 200 and r.tokens == (5, 4)

    async def shipped():
        return ha.pg("SELECT count(*) FROM usage WHERE key_id = %s", info.id)[0][0] == 6
    await wait_for(shipped, 15, "rows in PostgreSQL")
    [(spent,)] = ha.pg("SELECT sum(price_micro_usd) FROM usage WHERE key_id = %s", info.id)
    assert spent == 6 * 9
    import redis as redis_mod
    from gateway.money import month_now
    counter = redis_mod.Redis(port=ha.redis.port).get(f"infermesh:{STACK}:spend:{info.id}:{month_now()[0]}")
    assert int(counter) == 54
