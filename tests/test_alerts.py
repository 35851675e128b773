"""Alerting rules (fleet/alerts.py): rendered from the stack, shipped up to date, valid for
Prometheus (`promtool check rules`), and each alert fired and not fired by input series
(`promtool test rules` on test files generated here, per shipped stack)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet import alerts
from fleet import spec as spec_mod
from infermesh_cli.main import main as cli_main
from infermesh_cli.commands.alerts import rules_path
from gateway.metrics import _LATENCY_BUCKETS

REPO = Path(__file__).resolve().parent.parent
STACKS = sorted(p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in (REPO / "stacks").glob("Pulumi.*.yaml"))
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's prometheus "
                                                             "package; scripts/install-system-deps.sh)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


# ---- rendering ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stack", STACKS)
def test_shipped_rules_are_what_the_stack_renders(stack):
    spec = spec_mod.load(stack)
    path = rules_path(stack)
    assert path.exists(), f"run `infermesh alerts render --stack {stack} --write`"
    assert path.read_text() == alerts.to_yaml(spec), \
        f"{path.name} is out of date: run `infermesh alerts render --stack {stack} --write`"


def test_thresholds_come_from_each_tier_slo():
    spec = spec_mod.load("prod")
    data = spec.model_dump()
    for t in data["tiers"]:
        if t["name"] == "pro":
            t["slo"].update(availability=99.0, ttft_p95_ms=1200, max_5xx_pct=0.5)
    looser = spec_mod.Spec.model_validate(data)

    def exprs(s, name, tier):
        return [r["expr"] for g in alerts.rule_groups(s) for r in g["rules"]
                if r.get("alert") == name and r["labels"].get("tier") == tier]

    pro = next(t for t in spec.tiers if t.name == "pro")
    b = alerts.budget(pro)
    assert b == round(1 - pro.slo.availability / 100, 12)
    assert exprs(spec, "InfermeshErrorBudgetFastBurn", "pro") == [
        f'tier:infermesh_error_ratio:rate1h{{tier="pro"}} > {14.4 * b:.6g}\nand\n'
        f'tier:infermesh_error_ratio:rate5m{{tier="pro"}} > {14.4 * b:.6g}\n']
    assert "> 0.144\n" in exprs(looser, "InfermeshErrorBudgetFastBurn", "pro")[0]    # 14.4 x 1%
    assert "rate6h" in exprs(looser, "InfermeshErrorBudgetSlowBurn", "pro")[0]
    assert "> 0.06\n" in exprs(looser, "InfermeshErrorBudgetSlowBurn", "pro")[0]     # 6 x 1%
    assert exprs(spec, "InfermeshTTFTOverSLO", "pro")[0].endswith(f"> {pro.slo.ttft_p95_ms / 1000:g}\n")
    assert exprs(looser, "InfermeshTTFTOverSLO", "pro")[0].endswith("> 1.2\n")
    assert exprs(looser, "InfermeshHigh5xxRate", "pro")[0].startswith(
        'tier:infermesh_5xx_ratio:rate5m{tier="pro"} > 0.05\n')                      # 10 x 0.5%
    assert exprs(looser, "InfermeshTTFTOverSLO", "business") == exprs(spec, "InfermeshTTFTOverSLO", "business")


@pytest.mark.parametrize("stack", STACKS)
def test_each_ttft_slo_is_a_histogram_bucket_bound(stack):
    """histogram_quantile interpolates inside a bucket: with the SLO a bound, p95 > SLO is exact."""
    for t in spec_mod.load(stack).tiers:
        assert t.slo.ttft_p95_ms / 1000 in _LATENCY_BUCKETS, \
            f"tier {t.name}: add {t.slo.ttft_p95_ms / 1000:g} to gateway/metrics.py's _LATENCY_BUCKETS"


def test_every_alert_has_severity_summary_and_a_runbook_section():
    runbook = (REPO / "docs" / "runbook.md").read_text()
    headings = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#{1,6} (.+)$", runbook, re.M)}
    for stack in STACKS:
        for g in alerts.rule_groups(spec_mod.load(stack)):
            for r in g["rules"]:
                if "alert" not in r:
                    continue
                assert r["labels"]["severity"] in ("page", "ticket")
                assert r["annotations"]["summary"] and r["annotations"]["description"]
                url = r["annotations"]["runbook_url"]
                assert url == f"docs/runbook.md#{r['alert'].lower()}"
                assert url.split("#")[1] in headings, f"docs/runbook.md has no section {r['alert']}"


def test_cli_renders_writes_and_checks(tmp_path, capsys, monkeypatch):
    assert cli_main(["alerts", "render", "--stack", "prod"]) == 0
    assert capsys.readouterr().out == alerts.to_yaml(spec_mod.load("prod"))
    assert cli_main(["alerts", "render", "--stack", "prod", "--check"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("infermesh_cli.commands.alerts.ALERTS_DIR", tmp_path)
    assert cli_main(["alerts", "render", "--stack", "prod", "--check"]) == 1
    assert "missing: run `infermesh alerts render --stack prod --write`" in capsys.readouterr().err
    assert cli_main(["alerts", "render", "--stack", "prod", "--write", "--runbook-url",
                     "https://git.example/infermesh/docs/runbook.md"]) == 0
    assert "runbook_url: https://git.example/infermesh/docs/runbook.md#infermeshpooldown" in \
        (tmp_path / "prod.rules.yml").read_text()
    assert cli_main(["alerts", "render", "--stack", "prod", "--check"]) == 1   # another runbook URL: differs
    assert cli_main(["alerts", "render", "--stack", "no-such-stack"]) == 2


@needs_promtool
def test_promtool_checks_every_shipped_rules_file():
    files = sorted((REPO / "monitoring" / "alerts").glob("*.rules.yml"))
    assert {f.name for f in files} == {f"{s}.rules.yml" for s in STACKS}
    r = promtool("check", "rules", *map(str, files))
    assert r.returncode == 0, r.stdout + r.stderr


# ---- promtool test rules: series that fire each alert, and series that must not ----------------------

def counter(*segments: tuple[float, int]) -> str:
    """A counter in promtool's series notation growing `rate` per minute for `minutes`, segment by segment."""
    parts, value = [], None
    for rate, minutes in segments:
        if value is None:
            parts.append(f"0+{rate:.10g}x{minutes}")
            value = rate * minutes
        else:
            value += rate
            parts.append(f"{value:.10g}+{rate:.10g}x{minutes - 1}")
            value += rate * (minutes - 1)
    return " ".join(parts)


def gauge(*segments: tuple[float, int]) -> str:
    return " ".join(f"{v:.10g}+0x{n}" for v, n in segments)


def labels(d: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in d.items()) + "}"


class Cases:
    """promtool unit-test groups for one stack, each alert with series that fire it and series that do not."""

    def __init__(self, spec: spec_mod.Spec) -> None:
        self.spec = spec
        self.rules = [r for g in alerts.rule_groups(spec) for r in g["rules"] if "alert" in r]
        self.groups: list[dict[str, Any]] = []
        self.fired: set[str] = set()
        self.quiet: set[str] = set()

    def rule(self, name: str, tier: str | None = None) -> dict[str, Any]:
        return next(r for r in self.rules if r["alert"] == name and r["labels"].get("tier") == tier)

    def expect(self, name: str, series_labels: dict[str, str], tier: str | None = None) -> dict[str, Any]:
        rule = self.rule(name, tier)
        lab = {**rule["labels"], **series_labels}
        ann = {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: lab[m.group(1)], v)
               for k, v in rule["annotations"].items()}
        return {"exp_labels": lab, "exp_annotations": ann}

    def group(self, series: dict[str, str], checks: list[tuple[str, str, list[dict]]]) -> None:
        self.groups.append({
            "interval": "1m",
            "input_series": [{"series": k, "values": v} for k, v in series.items()],
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": exp} for at, name, exp in checks],
        })
        for _, name, exp in checks:
            (self.fired if exp else self.quiet).add(name)


def requests(tier: str, model: str, pool: str, status: str) -> str:
    return "infermesh_requests_total" + labels({"route": "chat", "status_class": status, "model": model,
                                                "pool": pool, "provider": "p", "region": "r", "tier": tier})


def build_cases(spec: spec_mod.Spec) -> Cases:
    c = Cases(spec)
    for t in spec.tiers:
        b, model = alerts.budget(t), t.models[0]
        pool = next(p.name for p in spec.pools if p.model == model)
        ok, err5, err4 = (requests(t.name, model, pool, s) for s in ("2xx", "5xx", "4xx"))
        shed = f'infermesh_shed_total{{tier="{t.name}"}}'
        tier = {"tier": t.name}
        if 30 * b < 0.9:
            # fast burn (14.4x over 1 h and 5 min): requests shed as overloaded count as errors
            s = 1000 * 20 * b / (1 - 20 * b)
            c.group({ok: counter((1000, 70)), err4: counter((s, 70)), shed: counter((s, 70))},
                    [("65m", "InfermeshErrorBudgetFastBurn", [c.expect("InfermeshErrorBudgetFastBurn", tier,
                                                                        t.name)])])
            # 25x over the last hour, but none in the last 10 minutes: the short window stops the page
            c.group({ok: counter((1000, 70)), err5: counter((30 * b * 1000, 55), (0, 15))},
                    [("65m", "InfermeshErrorBudgetFastBurn", [])])
            # 10x for an hour: under the fast threshold
            c.group({ok: counter((1000, 70)), err5: counter((10 * b * 1000, 70))},
                    [("65m", "InfermeshErrorBudgetFastBurn", [])])
            # 429s of the tenants' own quotas are not errors
            c.group({ok: counter((1000, 70)), err4: counter((500, 70))},
                    [("65m", "InfermeshErrorBudgetFastBurn", [])])
            # slow burn (6x over 6 h and 30 min): 5xx
            c.group({ok: counter((1000, 370)), err5: counter((8 * b * 1000, 370))},
                    [("365m", "InfermeshErrorBudgetSlowBurn", [c.expect("InfermeshErrorBudgetSlowBurn", tier,
                                                                         t.name)])])
            c.group({ok: counter((1000, 370)), err5: counter((8 * b * 1000, 320), (0, 50))},
                    [("365m", "InfermeshErrorBudgetSlowBurn", [])])
        # p95 TTFT over the tier's SLO: pending for 5 minutes, then firing
        slo = t.slo.ttft_p95_ms / 1000

        def ttft(fast_min: int, slow_min: int, model=model, pool=pool, t=t, slo=slo) -> dict[str, str]:
            out = {}
            for le in (*_LATENCY_BUCKETS, float("inf")):
                name = "infermesh_ttft_seconds_bucket" + labels(
                    {"model": model, "pool": pool, "tier": t.name, "le": "+Inf" if le == float("inf") else f"{le:g}"})
                out[name] = counter((100 if le >= 0.5 * slo else 0, fast_min),
                                    *([(100 if le >= 1.9 * slo else 0, slow_min)] if slow_min else []))
            return out

        fire = c.expect("InfermeshTTFTOverSLO", {**tier, "model": model}, t.name)
        c.group(ttft(20, 20), [("23m", "InfermeshTTFTOverSLO", []), ("35m", "InfermeshTTFTOverSLO", [fire])])
        c.group(ttft(40, 0), [("35m", "InfermeshTTFTOverSLO", [])])
        # 5xx rate above 2% for 5 minutes, with at least 5 of them
        limit = min(1.0, t.slo.max_5xx_pct / 100 * alerts.FIVE_XX_ALERT_FACTOR)
        if limit < 0.4:
            hi = 100 * 2 * limit / (1 - 2 * limit)          # 2x the limit, from 100 good answers a minute
            c.group({ok: counter((100, 20)), err5: counter((hi, 20))},
                    [("15m", "InfermeshHigh5xxRate", [c.expect("InfermeshHigh5xxRate", tier, t.name)])])
            c.group({ok: counter((100, 20)), err5: counter((100 * limit / 2, 20))},
                    [("15m", "InfermeshHigh5xxRate", [])])
            # a trickle: the ratio is high but fewer than 5 such answers in 5 minutes
            c.group({ok: counter((0.25 / (2 * limit), 20)), err5: counter((0.25, 20))},
                    [("15m", "InfermeshHigh5xxRate", [])])

    pool = spec.pools[0]
    where = {"model": pool.model, "pool": pool.name, "provider": pool.provider, "region": pool.region}

    def healthy(role: str, *segments, instance: str = "a") -> tuple[str, str]:
        return ("infermesh_pool_healthy_endpoints" + labels({**where, "role": role, "instance": instance}),
                gauge(*segments))

    pass_rate = "infermesh_probe_pass_rate" + labels({"model": pool.model, "pool": pool.name, "instance": "a"})
    mp = {"model": pool.model, "pool": pool.name}
    for role, alert, other in (("primary", "InfermeshProbesFailing", "InfermeshStandbyProbesFailing"),
                               ("standby", "InfermeshStandbyProbesFailing", "InfermeshProbesFailing")):
        c.group(dict([healthy(role, (1, 15))], **{pass_rate: gauge((0.5, 15))}),
                [("12m", alert, [c.expect(alert, mp)]), ("12m", other, [])])
        c.group(dict([healthy(role, (1, 15))], **{pass_rate: gauge((0.9, 15))}), [("12m", alert, [])])
    # a drained pool keeps its last pass rate: no alert
    c.group(dict([healthy("drained", (0, 15))], **{pass_rate: gauge((0, 15))}),
            [("12m", "InfermeshProbesFailing", []), ("12m", "InfermeshStandbyProbesFailing", [])])

    for role, alert in (("primary", "InfermeshPoolDown"), ("standby", "InfermeshStandbyPoolDown")):
        c.group(dict([healthy(role, (0, 10)), healthy(role, (0, 10), instance="b")]),
                [("8m", alert, [c.expect(alert, {**where, "role": role})])])
        # one gateway still sees a healthy endpoint; a pool back after 3 minutes
        c.group(dict([healthy(role, (0, 10)), healthy(role, (1, 10), instance="b")]), [("8m", alert, [])])
        c.group(dict([healthy(role, (0, 3), (2, 7))]), [("8m", alert, [])])
    c.group(dict([healthy("drained", (0, 10))]),
            [("8m", "InfermeshPoolDown", []), ("8m", "InfermeshStandbyPoolDown", [])])

    ejections = "infermesh_ejections_total" + labels({**where, "instance": "a"})
    c.group({ejections: "0 0 1 2 3 4 4 4 4 4 4"},
            [("10m", "InfermeshEndpointsEjected", [c.expect("InfermeshEndpointsEjected", where)])])
    c.group({ejections: "0 0 1 1 1 1 1 1 1 1 1"}, [("10m", "InfermeshEndpointsEjected", [])])

    if spec.gateway.state.ledger == "postgres":
        lag = 'infermesh_ledger_oldest_unshipped_age_seconds{instance="a"}'
        c.group({lag: gauge((600, 10))},
                [("8m", "InfermeshLedgerShippingLag", [c.expect("InfermeshLedgerShippingLag", {})])])
        c.group({lag: gauge((30, 10))}, [("8m", "InfermeshLedgerShippingLag", [])])
    return c


@needs_promtool
@pytest.mark.parametrize("stack", STACKS)
def test_promtool_each_alert_fires_on_its_series_and_not_on_others(stack, tmp_path):
    spec = spec_mod.load(stack)
    cases = build_cases(spec)
    names = set(alerts.alert_names(spec))
    assert cases.fired == names, f"alerts without a firing test: {sorted(names - cases.fired)}"
    assert cases.quiet == names, f"alerts without a test that must not fire: {sorted(names - cases.quiet)}"
    test_file = tmp_path / f"{stack}.test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(rules_path(stack))], "evaluation_interval": "1m",
                                         "tests": cases.groups}, sort_keys=False, width=1000))
    r = promtool("test", "rules", str(test_file))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_promtool_test_catches_a_wrong_threshold(tmp_path):
    """The generated tests are not vacuous: against rules with pro's fast-burn threshold 10x too loose,
    the firing case fails."""
    spec = spec_mod.load("prod")
    broken = tmp_path / "broken.rules.yml"
    text = alerts.to_yaml(spec)
    pro = next(t for t in spec.tiers if t.name == "pro")
    right = f'{{tier="pro"}} > {14.4 * alerts.budget(pro):.6g}\n'
    assert text.count(right) == 2
    broken.write_text(text.replace(right, f'{{tier="pro"}} > {144 * alerts.budget(pro):.6g}\n'))
    cases = build_cases(spec)
    test_file = tmp_path / "broken.test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(broken)], "evaluation_interval": "1m",
                                         "tests": cases.groups}, sort_keys=False, width=1000))
    r = promtool("test", "rules", str(test_file))
    assert r.returncode != 0
    assert "InfermeshErrorBudgetFastBurn" in r.stdout + r.stderr


# ---- the runbook names real commands ---------------------------------------------------------------

PLACEHOLDERS = {"S": "prod", "NODE": "gateway-0", "PROVIDER": "vast", "T": "acme", "YYYY-MM": "2026-11",
                "START": "2026-11-01T00:00", "KEY_ID": "key_0123456789ab", "URL": "https://x.example/runbook.md"}


def runbook_commands() -> list[str]:
    text = (REPO / "docs" / "runbook.md").read_text()
    found = [" ".join(m.split()) for m in re.findall(r"`(infermesh [^`]+)`", text)]
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        found += [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("infermesh ")]
    return found


def test_every_command_the_runbook_names_parses():
    from infermesh_cli.main import build_parser

    commands = runbook_commands()
    assert len(commands) > 20
    parser = build_parser()
    verbs = set()
    for command in commands:
        argv = [PLACEHOLDERS.get(w, w) for w in command.replace("[", "").replace("]", "").split()[1:]]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/runbook.md: `{command}` is not a valid infermesh command line")
        assert callable(args.func), command
        verbs.add(" ".join(argv[:2]) if argv[0] in ("slo", "failover", "ops", "canary", "usage") else argv[0])
    # the incident steps name each kind of mitigation and the post-mortem's reports
    assert {"failover drain", "ops drain", "canary rollback", "slo report", "slo credits", "usage report",
            "ops diag", "ops logs", "keys", "bootstrap", "plan", "check", "leases"} <= verbs
