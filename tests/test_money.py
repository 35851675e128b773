"""Money that adds up (issue 22): the fully loaded cost in the plan, the tier-margin rule, prices
and fees refused when they are not numbers. Figures computed by hand in the comments."""

from __future__ import annotations

import copy

import pytest

from fleet import plan as plan_mod
from fleet import policy
from fleet import spec as spec_mod
from infermesh_cli.main import main

HOURS = 730 * 3600                        # seconds in the plan's month


def prod_config() -> dict:
    return spec_mod.read_config(spec_mod.stack_path("prod"))


def costs_of(cfg: dict) -> plan_mod.Costs:
    return plan_mod.build_plan(spec_mod.parse(cfg, "prod")).costs


# ---- the prod plan, by hand ---------------------------------------------------------------------------

# qwen leases per month (price x GPUs x 730 h), every role:
#   eu: vast 0.40 x 2 = 584.00, akash 0.35 x 2 = 511.00, runpod (standby) 0.69 x 1 = 503.70
#   us: vast 0.40 x 2 = 584.00, akash 0.35 x 1 = 255.50, runpod (standby) 0.69 x 1 = 503.70   -> 2,941.90
# llama: eu vast 0.85 x 2 = 1,241.00, akash 0.75 = 547.50, runpod 0.99 = 722.70
#        us vast 0.85 = 620.50, akash 0.75 = 547.50, runpod 0.99 = 722.70                    -> 4,401.90
QWEN_LEASES = 584.00 + 511.00 + 503.70 + 584.00 + 255.50 + 503.70
LLAMA_LEASES = 1241.00 + 547.50 + 722.70 + 620.50 + 547.50 + 722.70
# forecast tokens: qwen (2.0 + 1.2) QPS x 850 = 2,720 tok/s; llama 1.5 x 1,200 + 0.8 x 1,200 = 2,760 tok/s
QWEN_TOKENS = 2720 * HOURS                # 7,148,160,000 a month
LLAMA_TOKENS = 2760 * HOURS               # 7,253,280,000
ALL = QWEN_TOKENS + LLAMA_TOKENS          # 14,401,440,000 (5,480 tok/s)
GATEWAY = 150.0                           # gateway.monthly_cost_usd, shared by tokens
OVERHEAD = 0.02                           # planning.overhead_per_1m_tokens


def test_prod_fully_loaded_cost_per_1m_by_model():
    c = costs_of(prod_config())
    m = {x.model: x for x in c.models}
    q, ll = m["qwen2.5-7b-instruct"], m["llama-3.1-8b-instruct"]
    assert q.leases == pytest.approx(2941.90) and ll.leases == pytest.approx(4401.90)
    assert q.tokens_per_month == 7_148_160_000 and ll.tokens_per_month == 7_253_280_000
    # qwen: 2,941.90 + 150 x 7,148.16 / 14,401.44 (= 74.4525) + 0.02 x 7,148.16 (= 142.9632) = 3,159.3157
    assert q.gateway == pytest.approx(74.45) and q.overhead == pytest.approx(142.96)
    assert q.monthly == pytest.approx(3159.32)
    assert q.cost_per_1m == pytest.approx(0.4420, abs=1e-4)
    qwen = (QWEN_LEASES + GATEWAY * QWEN_TOKENS / ALL) / (QWEN_TOKENS / 1e6) + OVERHEAD
    assert q.cost_per_1m == pytest.approx(qwen, abs=1e-4)
    # llama: (4,401.90 + 75.55 + 145.07) / 7,253.28 = 0.6373
    assert ll.cost_per_1m == pytest.approx(0.6373, abs=1e-4)
    # the fleet: (7,343.80 + 150 + 288.03) / 14,401.44 = 0.5404 (the review's $0.51 + $0.02 + the gateway)
    assert c.fleet.leases == pytest.approx(7343.80) and c.fleet.monthly == pytest.approx(7781.83, abs=0.01)
    assert c.fleet.cost_per_1m == pytest.approx(0.5404, abs=1e-4)
    assert c.fleet.cost_per_1m == pytest.approx((7343.80 + 150) / (ALL / 1e6) + 0.02, abs=1e-4)


def test_prod_margin_per_tier():
    tiers = {t.tier: t for t in costs_of(prod_config()).tiers}
    # hobby serves qwen only: $0.50 - $0.4420 = $0.0580, 11.6% of the price; minimum $0.4420 x 1.1 = $0.4862
    assert tiers["hobby"].loaded_cost_per_1m == pytest.approx(0.4420, abs=1e-4)
    assert tiers["hobby"].loaded_margin_per_1m == pytest.approx(0.0580, abs=1e-4)
    assert tiers["hobby"].loaded_margin_pct == pytest.approx(11.6, abs=0.05)
    assert tiers["hobby"].min_price_per_1m == pytest.approx(0.4862, abs=1e-4)
    # pro and business serve both models: the fleet's $0.5404; pro $0.60 -> 9.9%, business $0.90 -> 40.0%
    for name, pct in (("pro", 9.9), ("business", 40.0)):
        assert tiers[name].loaded_cost_per_1m == pytest.approx(0.5404, abs=1e-4)
        assert tiers[name].loaded_margin_pct == pytest.approx(pct, abs=0.05)


def test_standby_canary_and_overflow_are_in_the_cost():
    base = costs_of(prod_config())
    q0 = next(x for x in base.models if x.model == "qwen2.5-7b-instruct")
    cfg = prod_config()
    cfg["canary"] = {"pool": "qwen-eu-vast", "image": cfg["pools"][0]["image"], "weight": 5}
    cfg["planning"]["overflow_share_pct"] = 10
    c = costs_of(cfg)
    q = next(x for x in c.models if x.model == "qwen2.5-7b-instruct")
    assert q.leases == pytest.approx(2941.90 + 0.40 * 730)           # the canary lease: +292.00
    # 10% of qwen's 7,148.16M tokens at gonka's $0.35 per 1M = $250.19
    assert q.overflow_share == pytest.approx(0.10) and q.overflow == pytest.approx(250.19, abs=0.01)
    assert q.monthly == pytest.approx(q0.monthly + 292.00 + 250.19, abs=0.02)
    # llama has no overflow pool: its share stays 0
    assert next(x for x in c.models if x.model == "llama-3.1-8b-instruct").overflow == 0


def test_overflow_takes_what_the_pools_cannot_carry():
    cfg = prod_config()
    # qwen@us-east at 2.4 QPS: 2,040 tok/s against 4 reference GPUs x 1,500 x 0.75 = 4,500... raise it past that
    next(f for f in cfg["forecast"] if f["model"] == "qwen2.5-7b-instruct" and f["region"] == "us-east")["qps"] = 6.0
    c = costs_of(cfg)
    q = next(x for x in c.models if x.model == "qwen2.5-7b-instruct")
    # us-east: 6.0 x 850 = 5,100 tok/s; declared 2 vast + 1 akash + 1 runpod = 4 GPUs x 1,125 = 4,500;
    # short 600 tok/s; eu-west carries its 1,700. Share = 600 / (5,100 + 1,700) = 0.088235
    assert q.overflow_share == pytest.approx(600 / 6800, abs=1e-6)


def test_stack_without_forecast_has_no_cost_per_1m():
    cfg = prod_config()
    cfg["forecast"] = []
    c = costs_of(cfg)
    assert all(x.cost_per_1m is None for x in c.models) and c.fleet.cost_per_1m is None
    assert c.fleet.leases == pytest.approx(7343.80)
    assert all(t.loaded_cost_per_1m is None for t in c.tiers)


# ---- the policy rule ------------------------------------------------------------------------------------

def test_tier_margin_rule_names_tier_price_and_cost(capsys):
    cfg = prod_config()
    next(t for t in cfg["tiers"] if t["name"] == "hobby")["price_per_1m_tokens"] = 0.20
    spec = spec_mod.parse(cfg, "prod")
    [v] = policy.check(spec, rules=["tier-margin"])
    assert v.resource == "tier/hobby"
    assert "price $0.2 per 1M tokens is below its fully loaded cost $0.4420 x 1.1" in v.message
    assert "= $0.4862" in v.message and "0.4862" in v.fix


def test_tier_margin_at_the_minimum_passes_and_a_cent_below_fails():
    cfg = prod_config()
    cfg["planning"]["min_margin_pct"] = 20
    # pro: $0.5404 x 1.2 = $0.6485 > $0.60; business $0.90 passes; hobby $0.4420 x 1.2 = $0.5304 > $0.50
    found = {v.resource for v in policy.check(spec_mod.parse(cfg, "prod"), rules=["tier-margin"])}
    assert found == {"tier/pro", "tier/hobby"}
    cfg["planning"]["min_margin_pct"] = 0
    assert policy.check(spec_mod.parse(cfg, "prod"), rules=["tier-margin"]) == []
    cfg["planning"]["min_margin_pct"] = None            # a stack that sells nothing (staging)
    next(t for t in cfg["tiers"] if t["name"] == "hobby")["price_per_1m_tokens"] = 0.01
    assert policy.check(spec_mod.parse(cfg, "prod"), rules=["tier-margin"]) == []


def test_free_tier_is_not_judged():
    cfg = prod_config()
    hobby = next(t for t in cfg["tiers"] if t["name"] == "hobby")
    hobby["price_per_1m_tokens"] = 0
    assert policy.check(spec_mod.parse(cfg, "prod"), rules=["tier-margin"]) == []


def test_check_command_prints_the_tier_margin_violation(tmp_path, capsys):
    text = spec_mod.stack_path("prod").read_text()
    text = text.replace("price_per_1m_tokens: 0.50", "price_per_1m_tokens: 0.30")
    (tmp_path / "Pulumi.prod.yaml").write_text(text)
    assert main(["check", "--stack", "prod", "--stacks-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("tier-margin tier/hobby: price $0.3 per 1M tokens is below its fully loaded cost $0.4420")


# ---- bad input --------------------------------------------------------------------------------------------

OPTIONAL = {"price_per_1m_cached_tokens", "price_per_gpu_hour", "price_cap_per_gpu_hour"}


@pytest.mark.parametrize("where,field", [
    (("tiers", 0), "price_per_1m_tokens"), (("tiers", 1), "monthly_fee"), (("tiers", 1), "monthly_minimum"),
    (("tiers", 1), "price_per_1m_cached_tokens"), (("pools", 0), "price_per_gpu_hour"),
    (("providers", 0), "price_cap_per_gpu_hour"), (("providers", 3), "price_per_1m_tokens"),
])
@pytest.mark.parametrize("value,reason", [
    (-1, "greater than or equal to 0"), (-0.01, "greater than or equal to 0"), ("abc", "valid number"),
    ("0.2", "valid number"), (True, "valid number"), ("inf", "valid number"), ("nan", "valid number"),
    (None, "valid number"), ([1], "valid number"),
])
def test_negative_or_non_numeric_money_is_refused_naming_the_field(where, field, value, reason):
    cfg = prod_config()
    cfg[where[0]][where[1]][field] = value
    if value is None and (field in OPTIONAL or where[0] == "providers"):   # null: not set (no cap, ...)
        spec_mod.parse(cfg, "prod")
        return
    with pytest.raises(spec_mod.SpecError) as e:
        spec_mod.parse(cfg, "prod")
    msg = str(e.value)
    assert f"{where[0]}[{where[1]}]" in msg and f".{field}: " in msg and reason in msg and "\n" not in msg


@pytest.mark.parametrize("section,field", [("gateway", "monthly_cost_usd"), ("planning", "overhead_per_1m_tokens"),
                                           ("planning", "min_margin_pct"), ("planning", "overflow_share_pct")])
def test_negative_or_non_numeric_fleet_costs_are_refused(section, field):
    for value in (-5, "12", False):
        cfg = copy.deepcopy(prod_config())
        cfg[section][field] = value
        with pytest.raises(spec_mod.SpecError, match=rf"{section}\.{field}: "):
            spec_mod.parse(cfg, "prod")


def test_a_failover_is_judged_on_the_declared_fleet():
    cfg = prod_config()
    next(p for p in cfg["providers"] if p["name"] == "vast")["drained"] = True
    spec = spec_mod.parse(cfg, "prod")
    plan = plan_mod.build_plan(spec)
    hobby = next(t for t in plan.costs.tiers if t.tier == "hobby")
    assert hobby.min_price_per_1m > 0.50          # runpod replacements cost more while vast is out ...
    assert policy.check(spec, plan, rules=["tier-margin"]) == []   # ... but a failover is never blocked by prices


def test_docs_money_figures_are_the_plans():
    """docs/money.md's prod tables are the plan's figures (a price or lease change must update the page)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "money.md").read_text()
    c = costs_of(prod_config())
    for m in c.models:
        assert f"| {m.model} | {m.tokens_per_month / 1e6:,.1f}M | ${m.leases:,.2f} |" in text
        assert f"${m.monthly:,.2f} | **${m.cost_per_1m:.4f}** |" in text
    assert f"| fleet | {c.fleet.tokens_per_month / 1e6:,.1f}M | ${c.fleet.leases:,.2f} |" in text
    assert f"${c.fleet.monthly:,.2f} | **${c.fleet.cost_per_1m:.4f}** |" in text
    for t in c.tiers:
        assert (f"| ${t.price_per_1m:.2f} | ${t.loaded_cost_per_1m:.4f} | ${t.loaded_margin_per_1m:.4f} | "
                f"{t.loaded_margin_pct:.1f}% | ${t.min_price_per_1m:.4f} |") in text, t.tier


def test_plan_command_prints_the_loaded_costs(capsys):
    assert main(["plan", "--stack", "prod"]) == 0
    out = capsys.readouterr().out
    assert "Fully loaded cost at the forecast" in out
    assert "fleet                  14,401.4M     $7,343.80  $0.00     $150.00  $288.03   $7,781.83  $0.5404" in out
    assert "hobby     $0.50  $0.4420      $0.0580  11.6%    $0.4862" in out
