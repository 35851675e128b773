"""Key scopes (issue 22): a key limited to a set of models and to a monthly spend; the spend held
before dispatch and settled from the real usage; `infermesh keys create --models --monthly-spend`."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from openai import OpenAI, PermissionDeniedError, RateLimitError

from infermesh_cli.main import main
from gateway.keys import KeyAdmin, KeyStore
from gateway.limits import LocalLimiter


def test_local_spend_holds_refuses_and_settles():
    lim = LocalLimiter()
    calls = []

    async def seed():
        calls.append(1)
        return 40                                 # what the ledger says was spent this month

    async def go():
        r = [await lim.reserve_spend("key_a", "2026-12", 100, 30, None, seed) for _ in range(3)]
        lim.settle_spend("key_a", "2026-12", 20 - 30)       # the first request cost 20, not the 30 held
        r.append(await lim.reserve_spend("key_a", "2026-12", 100, 30, None, seed))
        r.append(await lim.reserve_spend("key_a", "2027-01", 100, 30, None, seed))   # a new month: the ledger again
        return r
    # 40 + 30 = 70 held; 70 + 30 = 100 held (at the limit, allowed); 130 > 100 refused;
    # after settling -10: 90 + 30 = 120 > 100 still refused; January starts from the seed (40) again
    assert asyncio.run(go()) == [True, True, False, False, True]
    assert len(calls) == 2
    assert lim._spend[("key_a", "2026-12")] == 90


def test_keys_db_from_before_scopes_gets_the_columns(tmp_path):
    db = sqlite3.connect(tmp_path / "keys.db")
    db.executescript("CREATE TABLE tenants (name TEXT PRIMARY KEY, tier TEXT NOT NULL, created_at REAL NOT NULL, "
                     "debug_log_until REAL); CREATE TABLE keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                     "hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL);")
    db.close()
    admin = KeyAdmin(tmp_path / "keys.db")
    key, info = admin.create("acme", "pro", ["demo-mini", "demo-chat"], 5_000_000)
    assert (info.models, info.monthly_spend_micro_usd) == ("demo-chat,demo-mini", 5_000_000)
    p = KeyStore(tmp_path / "keys.db").authenticate(key)
    assert p.models == frozenset({"demo-chat", "demo-mini"}) and p.spend_limit == 5_000_000
    plain, _ = admin.create("acme", None)
    p = KeyStore(tmp_path / "keys.db").authenticate(plain)
    assert p.models is None and p.spend_limit is None
    for bad in ([], ["Bad Name"], ["a,b"]):
        with pytest.raises(ValueError):
            admin.create("acme", None, bad)
    with pytest.raises(ValueError):
        admin.create("acme", None, None, -1)


def test_keys_db_from_before_key_regions_gets_the_column(tmp_path):
    """A key's region (issue 17, `keys create --region`) on a keys.db written before it existed."""
    db = sqlite3.connect(tmp_path / "keys.db")
    db.executescript("CREATE TABLE tenants (name TEXT PRIMARY KEY, tier TEXT NOT NULL, created_at REAL NOT NULL, "
                     "debug_log_until REAL); CREATE TABLE keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
                     "hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL, "
                     "models TEXT, monthly_spend_micro_usd INTEGER);")
    db.close()
    admin = KeyAdmin(tmp_path / "keys.db")
    key, info = admin.create("acme", "pro", region="eu-west")
    plain, _ = admin.create("acme", None)
    assert info.region == "eu-west" and [k.region for k in admin.list("acme")] == ["eu-west", None]
    store = KeyStore(tmp_path / "keys.db")
    assert store.authenticate(key).region == "eu-west" and store.authenticate(plain).region is None
    for bad in ("", "EU West", "a" * 121):
        with pytest.raises(ValueError, match="not a region name"):
            admin.create("acme", None, region=bad)


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(tmp_path))
    return tmp_path


def test_cli_create_with_scopes_and_list(state, capsys):
    assert main(["keys", "create", "--stack", "local", "--tenant", "acme", "--tier", "pro", "--models",
                 "demo-mini,demo-chat", "--monthly-spend", "12.345678", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["models"] == ["demo-chat", "demo-mini"] and info["monthly_spend_micro_usd"] == 12_345_678
    assert main(["keys", "list", "--stack", "local"]) == 0
    assert "models demo-chat,demo-mini; spend $12.35/month" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--monthly-spend", "-5"], "not an amount in US dollars"),
    (["--monthly-spend", "abc"], "not an amount in US dollars"),
    (["--monthly-spend", "1.1234567"], "at most 6 decimals"),
    (["--monthly-spend", "nan"], "not an amount in US dollars"),
    (["--models", "demo-chat,Bad"], "not a comma-separated list of model ids"),
    (["--models", ""], "not a comma-separated list of model ids"),
    (["--models", "demo-mini,nope"], "--models: nope not served to tier hobby (demo-embed, demo-mini)"),
])
def test_cli_refuses_bad_scopes_in_one_line(state, capsys, argv, needle):
    assert main(["keys", "create", "--stack", "local", "--tenant", "acme", "--tier", "hobby", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_key_scoped_to_models_and_spend_on_a_running_gateway(stack_factory):
    stack = stack_factory()
    admin = KeyAdmin(stack.state / "keys.db")
    mini_only, _ = admin.create("scoped", "pro", ["demo-mini"])
    client = OpenAI(base_url=stack.base_url, api_key=mini_only, max_retries=0)
    client.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(PermissionDeniedError) as e:
        client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 403 and e.value.code == "model_not_allowed"
    assert [m.id for m in client.models.list()] == ["demo-mini"]          # the model list follows the key
    with pytest.raises(PermissionDeniedError):
        client.models.retrieve("demo-chat")

    # pro: $0.60 per 1M tokens = 0.6 micro-$ a token. "q10" is 1 word + 3 = 4 prompt tokens at the sim, 4 completion
    # tokens with max_tokens=4: 8 tokens = 4.8 -> 5 micro-$ a request (recorded, rounded). The hold: the estimate
    # (4 a message + role 4 + user 4 + content 7 + q10 3 = 22 chars -> 22 // 4 + 1 = 6 tokens) + 4 = 10 tokens x 0.6
    # = 6 micro-$. Limit 60: admitted while spent + 6 <= 60, i.e. up to spent 54 -> 11 requests (55 micro-$).
    spender, info = admin.create("spender", "pro", None, 60)
    client = OpenAI(base_url=stack.base_url, api_key=spender, max_retries=2)
    ok = refused = 0
    for i in range(10, 30):
        try:
            client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": f"q{i}"}],
                                           max_tokens=4)
            ok += 1
        except RateLimitError as e:
            assert e.code == "insufficient_quota" and e.body["type"] == "insufficient_quota"
            assert e.response.headers.get("x-should-retry") == "false"
            refused += 1
    db = sqlite3.connect(stack.state / "ledger.db")
    rows = db.execute("SELECT status, price_micro_usd, error FROM usage WHERE key_id = ?", (info.id,)).fetchall()
    assert ok == 11 and refused == 9
    assert sum(p for s, p, _ in rows if s == 200) == 55 <= 60
    assert all(p == 5 for s, p, _ in rows if s == 200)
    assert sum(1 for s, _, err in rows if s == 429 and err == "insufficient_quota") == 9     # refusals metered
