"""`infermesh billing invoice` (issue 22): a tenant with traffic in three token classes and an SLA
credit, by hand; fees, minimums and zero invoices; a closed month never changes; bad input."""

from __future__ import annotations

import calendar
import copy
import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from fleet import spec as spec_mod
from infermesh_cli.main import main
from infermesh_cli.commands import billing
from gateway import ledger
from gateway.keys import KeyAdmin

OCT = calendar.timegm((2026, 10, 1, 0, 0, 0))
DAY = 86400


def write_stack(stacks: Path, mutate=None) -> None:
    cfg = copy.deepcopy(spec_mod.read_config(spec_mod.stack_path("local")))
    for t in cfg["tiers"]:
        if t["name"] == "business":
            t["monthly_minimum"] = 500           # $500 of usage a month at least
    if mutate:
        mutate(cfg)
    stacks.mkdir(exist_ok=True)
    (stacks / "Pulumi.bill.yaml").write_text(yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in cfg.items()}}))


def row(tenant: str, tier: str, at: float, status: int = 200, prompt=0, cached=0, completion=0, i=0):
    return ledger.UsageRecord(request_id=f"r-{tenant}-{at}-{i}", tenant=tenant, key_id="key_00000000000a", tier=tier,
                              route="chat", requested_model="demo-chat", served_model="demo-chat",
                              pool="demo-chat-east", provider="sim-east", region="local", status=status,
                              error=None if status == 200 else "upstream_error", prompt_tokens=prompt,
                              cached_tokens=cached, completion_tokens=completion, ttlt_ms=50.0, created_at=at)


@pytest.fixture
def books(tmp_path, monkeypatch):
    state, stacks = tmp_path / "state", tmp_path / "stacks"
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(state))
    write_stack(stacks)
    admin = KeyAdmin(state / "keys.db")
    for tenant, tier in (("acme", "pro"), ("quiet", "business"), ("hobbyist", "hobby"), ("newcomer", "pro")):
        admin.create(tenant, tier)
    with admin.conn:        # tenants since September; newcomer only from November
        admin.conn.execute("UPDATE keys SET created_at = ?", (OCT - 20 * DAY,))
        admin.conn.execute("UPDATE keys SET created_at = ? WHERE tenant = 'newcomer'", (OCT + 40 * DAY,))
    led = ledger.Ledger(state / "ledger.db")
    # acme's October: 1,234,567 input, 2,000,001 cached input and 333,333 output tokens in two requests
    led.record(row("acme", "pro", OCT + 2 * DAY, prompt=1_000_000, cached=2_000_001, completion=333_000))
    led.record(row("acme", "pro", OCT + 3 * DAY, prompt=234_567, completion=333))
    # ... and 200 minutes with a 5xx on October 5th: 44,440 good minutes of 44,640 = 99.552% < 99.9
    for m in range(200):
        led.record(row("acme", "pro", OCT + 4 * DAY + m * 60 + 1, status=500, i=m))
    led.close()
    return state, stacks


def invoice_of(doc: dict, tenant: str) -> dict:
    return next(x for x in doc["invoices"] if x["tenant"] == tenant)


def test_invoice_with_three_token_classes_and_a_credit_by_hand(books, capsys):
    state, stacks = books
    assert main(["billing", "invoice", "--stack", "bill", "--month", "2026-10", "--stacks-dir", str(stacks)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "closed" and doc["minor_unit"] == "cent"
    acme = invoice_of(doc, "acme")
    usage = {x["token_class"]: x for x in acme["lines"] if x["kind"] == "usage"}
    # input: 1,234,567 x $0.60 / 1M = 740,740.2 micro-$ -> 740,740 -> 74.074 cents -> 74
    assert (usage["input"]["tokens"], usage["input"]["amount_micro_usd"], usage["input"]["amount_cents"]) == \
        (1_234_567, 740_740, 74)
    # cached input at the tier's cached price: 2,000,001 x $0.15 / 1M = 300,000.15 -> 300,000 -> 30 cents
    assert (usage["cached_input"]["tokens"], usage["cached_input"]["amount_micro_usd"],
            usage["cached_input"]["amount_cents"]) == (2_000_001, 300_000, 30)
    # output: 333,333 x $0.60 / 1M = 199,999.8 -> 200,000 -> 20 cents
    assert (usage["output"]["tokens"], usage["output"]["amount_micro_usd"], usage["output"]["amount_cents"]) == \
        (333_333, 200_000, 20)
    assert usage["cached_input"]["price_per_1m_usd"] == "0.15" and usage["input"]["price_per_1m_usd"] == "0.6"
    # SLA: 99.552% is 0.348 below 99.9: 3 whole steps of 0.1 -> 15% of the $200 fee = 3,000 cents
    kinds = {x["kind"]: x for x in acme["lines"]}
    assert kinds["fee"]["amount_cents"] == 20_000
    assert kinds["sla_credit"]["amount_cents"] == -3_000 and kinds["sla_credit"]["credit_percent"] == 15.0
    assert acme["usage_cents"] == 124
    assert acme["total_cents"] == 20_000 + 74 + 30 + 20 - 3_000 == 17_124
    for inv in doc["invoices"]:
        for x in inv["lines"]:
            assert all(isinstance(x[k], int) for k in x if k.startswith("amount") or k == "tokens")


def test_fees_minimums_and_zero_invoices(books, capsys):
    state, stacks = books
    assert main(["billing", "invoice", "--stack", "bill", "--month", "2026-10", "--stacks-dir", str(stacks)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [x["tenant"] for x in doc["invoices"]] == ["acme", "hobbyist", "quiet"]     # newcomer came in November
    quiet = invoice_of(doc, "quiet")         # business, no usage: the $2,000 fee and the $500 minimum
    assert [(x["kind"], x["amount_cents"]) for x in quiet["lines"]] == [("fee", 200_000), ("minimum", 50_000)]
    assert quiet["total_cents"] == 250_000
    hobbyist = invoice_of(doc, "hobbyist")   # hobby, no fee, no usage: a zero invoice
    assert hobbyist["lines"] == [] and hobbyist["total_cents"] == 0


def test_a_closed_month_never_changes(books, capsys):
    state, stacks = books
    argv = ["billing", "invoice", "--stack", "bill", "--month", "2026-10", "--stacks-dir", str(stacks)]
    outs = []
    for fmt in ("json", "csv"):
        assert main([*argv, "--format", fmt]) == 0
        first = capsys.readouterr().out
        # prices change, a late row arrives, acme moves tier: the closed month's invoice stays as it was
        write_stack(stacks, lambda c: [t.update(price_per_1m_tokens=9.99, monthly_fee=1) for t in c["tiers"]])
        led = ledger.Ledger(state / "ledger.db")
        led.record(row("acme", "pro", OCT + 9 * DAY, prompt=5_000_000, i=len(outs)))
        led.close()
        assert main([*argv, "--format", fmt]) == 0
        assert capsys.readouterr().out == first
        outs.append(first)
    assert (state / "invoices" / "2026-10.json").stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(io.StringIO(outs[1])))
    total = next(r for r in rows if r["tenant"] == "acme" and r["kind"] == "total")
    assert total["amount_cents"] == "17124"


def test_the_current_month_is_provisional_and_not_archived(books, capsys):
    state, stacks = books
    now = calendar.timegm((2026, 10, 20, 12, 0, 0))
    doc = json.loads(billing.invoices(spec_mod.load("bill", stacks), state, "2026-10", now=now))
    assert doc["status"] == "provisional" and not (state / "invoices").exists()
    # an hour after the month ends it is closed
    end = calendar.timegm((2026, 11, 1, 0, 0, 0))
    assert json.loads(billing.invoices(spec_mod.load("bill", stacks), state, "2026-10", now=end + 3599))["status"] \
        == "provisional"
    assert json.loads(billing.invoices(spec_mod.load("bill", stacks), state, "2026-10", now=end + 3600))["status"] \
        == "closed"


def test_one_tenant_and_bad_input(books, capsys):
    state, stacks = books
    base = ["billing", "invoice", "--stack", "bill", "--stacks-dir", str(stacks)]
    assert main([*base, "--month", "2026-10", "--tenant", "quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [x["tenant"] for x in doc["invoices"]] == ["quiet"]
    for bad, needle in ((["--month", "2026-13"], "YYYY-MM"), (["--month", "oct"], "YYYY-MM"),
                        (["--month", "2099-01"], "has not begun"), (["--month", "2026-10", "--tenant", "nobody"],
                                                                     "no invoice for tenant 'nobody'"),
                        (["--month", "2026-10", "--tenant", "a b"], "not a tenant name"),
                        (["--month", "2026-10", "--format", "xml"], "invalid choice")):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_no_state_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(tmp_path / "none"))
    write_stack(tmp_path / "stacks")
    assert main(["billing", "invoice", "--stack", "bill", "--month", "2026-10",
                 "--stacks-dir", str(tmp_path / "stacks")]) == 2
    assert "no tenants or ledger yet" in capsys.readouterr().err


def test_rounding_is_half_up_on_exact_decimals():
    assert billing.micro(1, 0.15) == 0 and billing.micro(3, 0.5) == 2 and billing.micro(5, 0.5) == 3
    assert billing.cents(5_000) == 1 and billing.cents(4_999) == 0 and billing.cents(15_000) == 2
    assert billing.usd_cents(0.1 + 0.2) == 30 and billing.usd_cents(2000) == 200_000


def test_ledger_rows_in_sqlite_are_read_with_the_month_bounds(books):
    state, _ = books
    db = sqlite3.connect(state / "ledger.db")
    assert db.execute("SELECT count(*) FROM usage").fetchone()[0] == 202
