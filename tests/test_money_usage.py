"""`infermesh usage report --group-by`: price, cost (lease-hours spread over the tokens served) and
margin per tenant, model and provider, from a ledger with figures computed by hand (issue 22)."""

from __future__ import annotations

import calendar
import json

import pytest

from fleet import spec as spec_mod
from infermesh_cli.main import main
from infermesh_cli.commands import usage
from gateway import ledger

H = calendar.timegm((2026, 11, 10, 10, 0, 0))       # an hour of November, UTC


def rec(tenant, tier, pool, model, prompt, completion, at, price, cached=0, cost=0, status=200):
    return ledger.UsageRecord(request_id=f"r{at}{tenant}{pool}", tenant=tenant, key_id="key_000000000001", tier=tier,
                              route="chat", requested_model=model, served_model=model, pool=pool,
                              provider=pool.split("-")[-1] if pool else None, region="eu-west", status=status,
                              prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                              price_micro_usd=price, cost_micro_usd=cost, created_at=at)


QWEN, LLAMA = "qwen2.5-7b-instruct", "llama-3.1-8b-instruct"


@pytest.fixture
def staging_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(tmp_path))
    led = ledger.Ledger(tmp_path / "ledger.db")
    for r in [
        # hour H on qwen-vast ($0.40 an hour = 400,000 micro-$): acme 3,000 tokens, zeta 1,000 -> 300,000 / 100,000
        rec("acme", "pro", "qwen-vast", QWEN, 2000, 1000, H + 60, 1800),        # 3,000 x $0.60
        rec("zeta", "hobby", "qwen-vast", QWEN, 600, 400, H + 120, 200),         # 1,000 x $0.20
        # hour H on llama-vast ($0.85 an hour): all of it to acme's 1,200 tokens
        rec("acme", "pro", "llama-vast", LLAMA, 900, 300, H + 300, 720),
        # hour H + 1 on qwen-vast: acme alone, 500 tokens carry the whole hour
        rec("acme", "pro", "qwen-vast", QWEN, 400, 100, H + 3600 + 5, 300),
        # a row from before prices were recorded (price 0): priced at today's hobby price, 2,000 x 0.20 = 400
        rec("zeta", "hobby", "qwen-vast", QWEN, 1500, 500, H + 7200 + 5, 0),
    ]:
        led.record(r)
    led.close()
    return tmp_path


def test_group_by_tenant_model_provider(staging_ledger, capsys):
    assert main(["usage", "report", "--stack", "staging", "--group-by", "tenant,model,provider",
                 "--format", "json"]) == 0
    rows = {(r["tenant"], r["model"], r["provider"]): r for r in json.loads(capsys.readouterr().out)}
    acme_q, acme_l, zeta_q = rows[("acme", QWEN, "vast")], rows[("acme", LLAMA, "vast")], rows[("zeta", QWEN, "vast")]
    assert (acme_q["total_tokens"], acme_q["price_micro_usd"], acme_q["cost_micro_usd"]) == (3500, 2100, 700_000)
    assert acme_q["margin_micro_usd"] == 2100 - 700_000 and acme_q["margin_pct"] == round(-697_900 * 100 / 2100, 1)
    assert (acme_l["total_tokens"], acme_l["price_micro_usd"], acme_l["cost_micro_usd"]) == (1200, 720, 850_000)
    # zeta: 100,000 of hour H, and hour H + 2 alone (400,000); its old row priced at 2,000 x 0.20 = 400
    assert (zeta_q["total_tokens"], zeta_q["price_micro_usd"], zeta_q["cost_micro_usd"]) == (3000, 600, 500_000)
    assert all(isinstance(r[k], int) for r in rows.values()
               for k in ("price_micro_usd", "cost_micro_usd", "margin_micro_usd"))


def test_default_grouping_and_table(staging_ledger, capsys):
    assert main(["usage", "report", "--stack", "staging"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["tenant", "model", "requests", "errors", "prompt_tokens", "cached_tokens",
                              "completion_tokens", "price_micro_usd", "cost_micro_usd", "total_tokens",
                              "margin_micro_usd", "margin_pct"]
    assert len(out) == 4


@pytest.mark.parametrize("bad", ["tenant,colour", "tenant,tenant", "", "model;provider"])
def test_bad_group_by_is_one_line(staging_ledger, capsys, bad):
    assert main(["usage", "report", "--stack", "staging", "--group-by", bad]) == 2
    err = capsys.readouterr().err
    assert "--group-by" in err and "Traceback" not in err


def test_an_hour_is_split_exactly_by_largest_remainder():
    spec = spec_mod.load("staging")
    rows = [{**vars_of(rec("a", "pro", "qwen-vast", QWEN, 1, 0, H, 0))},
            {**vars_of(rec("b", "pro", "qwen-vast", QWEN, 2, 0, H + 1, 0))},
            {**vars_of(rec("c", "pro", "qwen-vast", QWEN, 0, 0, H + 2, 0, status=500))},
            {**vars_of(rec("d", "pro", "gonka-upstream", QWEN, 10, 0, H, 0, cost=35))}]
    # 400,000 x 1/3 = 133,333.33 and x 2/3 = 266,666.67: the larger remainder gets the spare micro-dollar
    assert usage.costs(rows, spec) == [133_333, 266_667, 0, 35]


def vars_of(r: ledger.UsageRecord) -> dict:
    return {f: getattr(r, f) for f in r.__slots__}
