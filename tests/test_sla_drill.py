"""The SLA drill on a running local stack: a fault injected for one known minute gives exactly the
availability, error budget and credit the definitions (gateway/sla.py) say, for the tenant it hit
and for nobody else; the public status page shows it without naming anyone.

Takes up to about 75 s: it waits for a minute boundary and for the faulty minute to end.
"""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest
from openai import OpenAI

from gateway import sla


def _fault(stack, pool: str, **knobs) -> None:
    req = urllib.request.Request(stack.worker_url(pool) + "/sim/faults", data=json.dumps(knobs).encode(),
                                 method="POST", headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=5).close()


def test_one_faulty_minute_costs_exactly_its_tenant(stack_factory):
    stack = stack_factory()
    victim = OpenAI(base_url=stack.base_url, api_key=stack.key("victim", "pro"), max_retries=0)
    bystander = OpenAI(base_url=stack.base_url, api_key=stack.key("bystander", "business"), max_retries=0)
    ask = [{"role": "user", "content": "hello"}]
    if time.time() % 60 > 40:                          # the fault must fit inside one minute
        time.sleep(61 - time.time() % 60)
    minute = int(time.time() // 60)
    _fault(stack, "demo-mini-east", mode="error500")   # demo-mini's only worker
    failed = 0
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as e:
            victim.chat.completions.create(model="demo-mini", messages=ask, max_tokens=4)
        failed += e.value.status_code >= 500
        assert bystander.chat.completions.create(model="demo-chat", messages=ask, max_tokens=4).choices
    _fault(stack, "demo-mini-east", mode="none")
    assert int(time.time() // 60) == minute            # everything above happened in that one minute
    assert failed == 3
    time.sleep(max(0.0, (minute + 1) * 60 - time.time()) + 0.5)
    victim.chat.completions.create(model="demo-mini", messages=ask, max_tokens=4)     # a good minute after

    spec = stack.spec
    target = sla.SqliteTarget(stack.state / "ledger.db")
    sla.Rollup(spec, stack.state / "ledger.db", target, "local").run_once()
    period = sla.window_period((minute - 2) * 60, (minute + 1) * 60)     # 3 minutes, the faulty one last
    rep = sla.report(target.query, spec, period)
    v = next(c for c in rep["customers"] if c["tenant"] == "victim")
    b = next(c for c in rep["customers"] if c["tenant"] == "bystander")
    pro = spec.tier("pro")
    print(f"\n[sla drill] victim: {v['bad_minutes']} bad of {v['minutes']}, {v['availability_pct']:.3f}%, "
          f"budget {v['error_budget_minutes']}, credit {v['credit_percent']}% = {v['credit_cents']} cents; "
          f"bystander: {b['bad_minutes']} bad, {b['credit_percent']}%")
    assert period.minutes == 3 and not period.provisional
    assert v["bad_minutes"] == 1 and v["bad_intervals"] == [[sla._iso(minute), sla._iso(minute + 1)]]
    assert v["availability_pct"] == pytest.approx(100 * 2 / 3)
    budget = (1 - pro.slo.availability / 100) * 3
    assert v["error_budget_minutes"] == {"budget": round(budget, 2), "spent": 1, "left": round(budget - 1, 2)}
    steps = int((pro.slo.availability - 100 * 2 / 3) // 0.1)
    assert v["credit_percent"] == min(25.0, 5.0 * steps) == 25.0
    assert v["credit_cents"] == round(pro.monthly_fee * 100 * 0.25)
    assert (v["service_errors"], v["requests"]) == (3, 3)          # the good request came after the period
    assert (b["bad_minutes"], b["availability_pct"], b["credit_percent"]) == (0, 100.0, 0.0)

    # the public status page: no key, today's demo-mini shows the bad minute, nobody is named
    with urllib.request.urlopen(stack.root_url + "/status", timeout=10) as r:
        raw = r.read()
    page = json.loads(raw)
    assert b"victim" not in raw and b"bystander" not in raw
    mini = next(s for s in page["services"] if s["model"] == "demo-mini")
    assert len(mini["days"]) == sla.STATUS_DAYS and mini["state"] == "operational"
    assert mini["days"][-1]["bad_minutes"] == 1 and mini["days"][-1]["availability_pct"] < 100
    chat = next(s for s in page["services"] if s["model"] == "demo-chat")
    assert chat["days"][-1]["bad_minutes"] == 0
