"""The SLA's definitions (gateway/sla.py), checked against figures computed by hand.

Ledger rows are written as the gateway writes them, rolled up as the gateway rolls them up
(SQLite, and PostgreSQL for the shared backend), and read back through the reports.
"""

from __future__ import annotations

import calendar
import copy
import json
import math

import pytest

from fleet import spec as spec_mod
from gateway import ledger, sla
from tests.conftest import local_config

NOV = calendar.timegm((2026, 11, 1, 0, 0, 0))          # 2026-11: 30 days, 43,200 minutes
NOW = calendar.timegm((2026, 12, 1, 12, 0, 0))
MINUTES_NOV = 30 * 1440


def make_spec(**pro_slo) -> spec_mod.Spec:
    cfg = copy.deepcopy(local_config())
    for t in cfg["tiers"]:
        if t["name"] == "pro":
            t["slo"] = {"availability": 99.9, "ttft_p95_ms": 1500, "ttlt_p95_ms": 8000, "ttlt_tokens": 256,
                        **pro_slo}
            t["monthly_fee"] = 200
    return spec_mod.parse(cfg, "slotest")


def rec(tenant: str, minute: int, status: int = 200, *, tier: str = "pro", stream: bool = True,
        ttft: float | None = 100.0, ttlt: float = 2000.0, out: int = 100, error: str | None = None,
        model: str = "demo-chat", region: str = "local", second: float = 10.0) -> ledger.UsageRecord:
    return ledger.UsageRecord(f"r{tenant}{minute}{second}", tenant, "k_" + tenant, tier, "chat", model,
                              served_model=model, region=region, stream=stream, prompt_tokens=10,
                              completion_tokens=out if status == 200 else 0, status=status, error=error,
                              ttft_ms=(ttft if stream and status == 200 else None), ttlt_ms=ttlt,
                              created_at=NOV + minute * 60 + second)


class Ledger:
    """A ledger.db with rows written directly (as the gateway's group commit writes them)."""

    def __init__(self, tmp_path, spec):
        self.path = tmp_path / "ledger.db"
        self.spec = spec
        self.target = sla.SqliteTarget(self.path)

    def add(self, rows: list[ledger.UsageRecord]) -> None:
        conn = ledger.connect(self.path)
        conn.execute("BEGIN")
        conn.executemany(ledger._INSERT, [ledger._row(r) for r in rows])
        conn.execute("COMMIT")
        conn.close()

    def report(self, tenant: str | None = None, period: sla.Period | None = None) -> dict:
        sla.Rollup(self.spec, self.path, self.target, "local").run_once()
        return sla.report(self.target.query, self.spec, period or sla.month_period("2026-11", NOW), tenant)


def customer(rep: dict, tenant: str) -> dict:
    (c,) = [c for c in rep["customers"] if c["tenant"] == tenant]
    return c


@pytest.fixture
def spec():
    return make_spec()


# ---- the two examples --------------------------------------------------------------------


def test_whole_answers_are_never_judged_as_ttft(tmp_path, spec):
    """Six fast-for-their-length non-stream answers (2.1 s, 100 tokens) and three streams
    (TTFT 42-62 ms) in one minute: a good minute. And 1,000 minutes of all-200 non-stream
    answers at 4 s: 100% available, no breach hours, no credit (they meet the 8 s TTLT SLO at
    256 tokens: 4 s for 256 tokens)."""
    led = Ledger(tmp_path, spec)
    rows = [rec("a", 5, stream=False, ttlt=2100, second=s) for s in range(6)]
    rows += [rec("a", 5, ttft=t, second=30 + i) for i, t in enumerate((42, 50, 62))]
    rows += [rec("b", m, stream=False, ttlt=4000, out=256) for m in range(100, 1100)]
    led.add(rows)
    rep = led.report()
    a, b = customer(rep, "a"), customer(rep, "b")
    assert (a["bad_minutes"], a["availability_pct"], a["credit_percent"]) == (0, 100.0, 0.0)
    assert (b["bad_minutes"], b["ttft_p95_breach_hours"], b["credit_percent"]) == (0, 0, 0.0)
    assert b["ttlt_p95_met"] is True and b["ttlt_at_budget_ms"]["p95"] == {"gt": 2000, "le": 4000}
    assert b["ttft_ms"]["p95"] is None                 # no streams: no TTFT at all


def test_availability_is_over_every_minute_of_the_month(tmp_path, spec):
    """30 bad minutes in November (43,200 minutes), traffic in 10,000 of them: 99.9306%, no credit
    at 99.9 (not 99.70% and 10% as when dividing by minutes with traffic)."""
    led = Ledger(tmp_path, spec)
    rows = [rec("acme", m) for m in range(10_000)]
    rows += [rec("acme", m * 7, status=502, second=40) for m in range(30)]
    led.add(rows)
    c = customer(led.report(), "acme")
    assert c["minutes"] == MINUTES_NOV and c["bad_minutes"] == 30
    assert c["availability_pct"] == pytest.approx(100 * (43_200 - 30) / 43_200)     # 99.93056
    assert c["credit_percent"] == 0.0 and c["credit_cents"] == 0
    assert c["error_budget_minutes"] == {"budget": 43.2, "spent": 30, "left": 13.2}
    assert len(c["bad_intervals"]) == 30 and c["bad_intervals"][1] == ["2026-11-01T00:07Z", "2026-11-01T00:08Z"]


# ---- per customer, exclusions, latency --------------------------------------------------------


def test_credits_are_per_customer_from_its_own_requests(tmp_path, spec):
    """Tenant a: 100 bad minutes -> 99.7685% -> one full 0.1% step below 99.9 -> 5% of $200 = $10.
    Tenant b, same tier, same minutes, no failures: no credit."""
    led = Ledger(tmp_path, spec)
    rows = []
    for m in range(100):
        rows += [rec("a", m, status=500, second=5), rec("a", m, second=6), rec("b", m, second=7)]
    led.add(rows)
    rep = led.report()
    a, b = customer(rep, "a"), customer(rep, "b")
    assert a["availability_pct"] == pytest.approx(100 * (43_200 - 100) / 43_200)
    assert (a["credit_percent"], a["credit_cents"], a["monthly_fee_cents"]) == (5.0, 1000, 20_000)
    assert (b["bad_minutes"], b["credit_percent"]) == (0, 0.0)
    assert a["five_xx_rate_pct"] == 50.0 and b["five_xx_rate_pct"] == 0.0


def test_what_counts_against_availability(tmp_path, spec):
    led = Ledger(tmp_path, spec)
    led.add([
        rec("t", 1, status=429, error="rate_limit_exceeded"),    # its own limits: excluded
        rec("t", 2, status=400, error="invalid_value"),          # its own bad request: excluded
        rec("t", 3, status=499),                                 # it went away: excluded
        rec("t", 4, status=429, error="overloaded"),             # our shedding: bad
        rec("t", 5, status=504, error="idle_timeout"),           # a broken stream: bad
        rec("t", 6, ttft=5001),                                  # TTFT over the addendum's 5 s: bad
        rec("t", 7, ttft=4999),                                  # under it: good (however slow for the p95)
        rec("t", 8, stream=False, ttlt=60_000, out=10),          # a slow whole answer: never a bad minute
    ])
    c = customer(led.report(), "t")
    assert c["bad_minutes"] == 3 and c["bad_intervals"] == [["2026-11-01T00:04Z", "2026-11-01T00:07Z"]]
    assert (c["requests"], c["service_errors"], c["client_errors"], c["abandoned"]) == (8, 2, 2, 1)
    assert c["five_xx_rate_pct"] == pytest.approx(100 * 2 / 5)


def test_p95_ttft_breach_is_exact_and_three_hours_earn_the_latency_credit(tmp_path, spec):
    """Per hour, 20 streams: 2 over 1.5 s puts the nearest-rank p95 over (18 < ceil(19)); 1 does
    not. Hours 0-2 breached, hour 3 not, hours 5-6 breached: the longest run is 3 -> +5%."""
    led = Ledger(tmp_path, spec)
    rows = []
    for hour, over in ((0, 2), (1, 3), (2, 2), (3, 1), (5, 2), (6, 2)):
        for i in range(20):
            rows.append(rec("lat", hour * 60 + i, ttft=3000 if i < over else 100))
    led.add(rows)
    c = customer(led.report(), "lat")
    assert c["ttft_p95_breach_hours"] == 3 and c["bad_minutes"] == 0
    assert c["credit_percent"] == 5.0 and c["credit_cents"] == 1000
    # the same decision a sorted list gives
    values = sorted([3000] * 2 + [100] * 18)
    assert values[math.ceil(0.95 * 20) - 1] == 3000 and sla.p95_over(20, 2) and not sla.p95_over(20, 1)


def test_shown_percentiles_come_from_buckets_that_hold_them(tmp_path, spec):
    led = Ledger(tmp_path, spec)
    led.add([rec("p", i, ttft=t) for i, t in enumerate([120] * 50 + [700] * 45 + [1800] * 5)])
    c = customer(led.report(), "p")
    assert c["ttft_ms"]["p50"] == {"gt": 100, "le": 250}          # the 50th value, 120, is in (100, 250]
    assert c["ttft_ms"]["p95"] == {"gt": 500, "le": 1000}         # the 95th, 700
    assert c["ttft_ms"]["p99"] == {"gt": 1500, "le": 2000}        # the 99th, 1800


def test_ttlt_is_normalised_to_the_token_budget(tmp_path, spec):
    """8 s at 256 tokens: 100 tokens in 3.5 s is 8.96 s at 256 (over); 300 in 9 s is 7.68 s (met);
    a 20-token answer is under a quarter of the budget: no TTLT sample."""
    led = Ledger(tmp_path, spec)
    led.add([rec("slow", 1, stream=False, ttlt=3500, out=100), rec("fast", 1, stream=False, ttlt=9000, out=300),
             rec("tiny", 1, stream=False, ttlt=30_000, out=20)])
    rep = led.report()
    assert customer(rep, "slow")["ttlt_p95_met"] is False
    assert customer(rep, "fast")["ttlt_p95_met"] is True
    assert customer(rep, "tiny")["ttlt_p95_met"] is None


# ---- regions, probes, gaps -----------------------------------------------------------------


def test_regions_probes_and_gaps(tmp_path, spec):
    led = Ledger(tmp_path, spec)
    led.add([rec("r", 10, status=502, region="eu"), rec("r", 11, region="us"), rec("q", 12, model="demo-mini")])
    rollup = sla.Rollup(spec, led.path, led.target, "local")
    for second in (0, 30):     # minute 20: every probe of demo-chat failed; minute 21: one passed
        rollup.probe(NOV + 20 * 60 + second, "demo-chat", "us", False)
        rollup.probe(NOV + 21 * 60 + second, "demo-chat", "us", second == 30)
    rollup.run_once()
    rep = sla.report(led.target.query, spec, sla.window_period(NOV, NOV + 60 * 60, NOW))
    r = customer(rep, "r")
    regions = {x["region"]: x["bad_minutes"] for x in r["regions"]}
    assert regions == {"eu": 1, "us": 1}              # eu: its 502; us: the minute the probes saw it down
    assert r["bad_minutes"] == 2 and r["minutes"] == 60
    assert customer(rep, "q")["bad_minutes"] == 0     # q used demo-mini only
    # minutes with neither requests nor probes are named, not counted bad
    assert rep["no_data_minutes"] == 60 - 5
    assert rep["period"]["minutes"] == 60 and not rep["period"]["provisional"]


def test_rollups_count_every_row_once_late_rows_included(tmp_path, spec):
    led = Ledger(tmp_path, spec)
    led.add([rec("x", 1, second=s) for s in range(5)])
    led.report()
    led.report()                                      # nothing new: nothing added
    led.add([rec("x", 1, status=500, second=50)])     # a late row for a minute rolled up already
    c = customer(led.report(), "x")
    assert c["requests"] == 6 and c["bad_minutes"] == 1


def test_rollups_in_postgresql_match_sqlite(tmp_path, spec):
    psycopg = pytest.importorskip("psycopg")
    from gateway.state.migrate import migrate
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    db = f"slo_{tmp_path.name.replace('-', '_')[-40:].lower()}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
    except psycopg.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    try:
        dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={db}"
        migrate(dsn)
        led = Ledger(tmp_path, spec)
        rows = [rec("a", m, status=500 if m % 10 == 0 else 200) for m in range(200)]
        led.add(rows)
        pg = sla.PgTarget(dsn)
        two = [sla.Rollup(spec, led.path, pg, "replica-a"), sla.Rollup(spec, led.path, pg, "replica-a")]
        two[0].run_once()
        two[1].run_once()                             # a second process on the same spool adds nothing
        period = sla.month_period("2026-11", NOW)
        got = sla.report(pg.query, spec, period)
        want = led.report()
        assert got["customers"] == want["customers"] and customer(got, "a")["bad_minutes"] == 20
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# ---- periods and bad input ---------------------------------------------------------------------


def test_periods_and_bad_input(tmp_path, spec):
    dec = sla.month_period("2026-12", NOW)
    assert dec.provisional and dec.minutes == 12 * 60 + 1
    assert sla.month_period("2026-02", NOW).minutes == 28 * 1440
    for bad in ("2026-13", "26-11", "2026/11", "２０２６-11", "2026-1", ""):
        with pytest.raises(sla.SlaError, match="YYYY-MM"):
            sla.month_period(bad, NOW)
    with pytest.raises(sla.SlaError, match="not begun"):
        sla.month_period("2027-01", NOW)
    with pytest.raises(sla.SlaError, match="after --since"):
        sla.window_period(NOW - 10, NOW - 20, NOW)
    led = Ledger(tmp_path, spec)
    led.add([rec("known", 1)])
    with pytest.raises(sla.SlaError, match="'nobody' made no requests"):
        led.report("nobody")


def test_credits_statement_and_cli(tmp_path, spec, monkeypatch, capsys):
    """`infermesh slo credits --month` against a stack's ledger: JSON and CSV carry the same figures."""
    from infermesh_cli import main as cli
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    cfg = copy.deepcopy(local_config())
    stack_file = stacks / "Pulumi.slotest.yaml"
    import yaml
    stack_file.write_text(yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in cfg.items()}}))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(state))
    monkeypatch.setattr(spec_mod, "stack_path", lambda stack, d=None: stacks / f"Pulumi.{stack}.yaml")
    led = Ledger(state, spec_mod.load("slotest", stacks))
    led.add([rec("acme", m, status=502) for m in range(300)] + [rec("calm", 1)])
    assert cli.main(["slo", "credits", "--stack", "slotest", "--month", "2026-11", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    acme = next(c for c in doc["credits"] if c["tenant"] == "acme")
    # local pro: SLO 99.9, 300 bad of 43,200 = 99.3056% -> 5 full 0.1% steps -> 25% of $200 = $50
    assert (acme["bad_minutes"], acme["credit_percent"], acme["credit_cents"]) == (300, 25.0, 5000)
    assert cli.main(["slo", "credits", "--stack", "slotest", "--month", "2026-11", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("tenant,tier,period") and any(line.startswith("acme,pro,2026-11") for line in lines)
    assert cli.main(["slo", "report", "--stack", "slotest", "--month", "2099-01"]) == 2
    assert "not begun" in capsys.readouterr().err


def test_windows_off_the_hour_read_hours_inside_and_minutes_at_the_edges(tmp_path, spec):
    led = Ledger(tmp_path, spec)
    led.add([rec("w", m) for m in (10, 70, 130, 200)] + [rec("w", 135, status=500, second=20)])
    for start, end, want in ((30, 150, 3), (30, 59, 0), (0, 240, 5), (70, 71, 1), (131, 200, 1)):
        rep = led.report(period=sla.window_period(NOV + start * 60, NOV + end * 60, NOW))
        got = sum(c["requests"] for c in rep["customers"])
        assert got == want, (start, end, got)
    c = customer(led.report(period=sla.window_period(NOV + 30 * 60, NOV + 150 * 60, NOW)), "w")
    assert c["bad_minutes"] == 1 and c["minutes"] == 120


def test_maintenance_and_the_addendums_exclusions(tmp_path):
    """Failures every minute of five windows in November:
    - maintenance announced 72 h ahead, 30 min: excluded;
    - maintenance announced 24 h ahead, 20 min: counts (not 48 h notice);
    - maintenance announced 72 h ahead, 45 min: 30 excluded (60 a month), 15 count;
    - force majeure, 10 min: excluded for everyone;
    - misuse by tenant m, 5 min: excluded for m, counts for n."""
    def at(day: int, hour: int, minute: int = 0) -> str:
        return f"2026-11-{day:02d}T{hour:02d}:{minute:02d}:00Z"
    cfg = copy.deepcopy(local_config())
    cfg["sla"] = {
        "maintenance": [
            {"start": at(5, 2), "end": at(5, 2, 30), "announced": at(2, 2), "reason": "kernel upgrade"},
            {"start": at(10, 2), "end": at(10, 2, 20), "announced": at(9, 2), "reason": "late notice"},
            {"start": at(20, 2), "end": at(20, 2, 45), "announced": at(17, 2), "reason": "database move"}],
        "exclusions": [
            {"start": at(25, 2), "end": at(25, 2, 10), "reason": "force majeure: the data center's fire"},
            {"start": at(27, 2), "end": at(27, 2, 5), "reason": "misuse: prohibited content", "tenant": "m"}]}
    spec = spec_mod.parse(cfg, "slotest")
    led = Ledger(tmp_path, spec)
    rows = []
    for day, length in ((5, 30), (10, 20), (20, 45), (25, 10), (27, 5)):
        base = (day - 1) * 1440 + 120
        for i in range(length):
            rows += [rec("m", base + i, status=502, second=1), rec("n", base + i, status=502, second=2)]
    led.add(rows)
    rep = led.report()
    m, n = customer(rep, "m"), customer(rep, "n")
    # counted: 20 (late notice) + 15 (over 60 a month); n also the 5 minutes of m's misuse
    assert (m["bad_minutes"], n["bad_minutes"]) == (35, 40)
    kinds = {(e["kind"], e["reason"][:12]): (e["excluded_minutes"], e.get("why_not")) for e in rep["exclusions"]}
    assert kinds[("maintenance", "kernel upgra")] == (30, None)
    assert kinds[("maintenance", "late notice")] == (0, "not announced 48 h ahead")
    assert kinds[("maintenance", "database mov")] == (30, "15 minutes over 60 a month")
    assert kinds[("exclusion", "force majeur")] == (10, None) and kinds[("misuse", "misuse: proh")] == (5, None)
    with pytest.raises(spec_mod.SpecError, match="end must be after start"):
        spec_mod.parse({**cfg, "sla": {"maintenance": [{"start": at(5, 3), "end": at(5, 2), "reason": "x"}]}},
                       "slotest")
