"""Money through a running gateway (issue 22): each ledger row carries its price and its cost, the
debug log is redacted and says so."""

from __future__ import annotations

import sqlite3

import pytest
from openai import OpenAI

from fleet import spec as spec_mod
from gateway.keys import KeyAdmin
from gateway.money import Money, pool_rates


def test_pool_rates_of_prod_by_hand():
    rates = pool_rates(spec_mod.load("prod"))
    # a lease: price / (R x U x 3,600) per token: qwen-eu-vast $0.40 / (1,500 x 0.6 x 3,600) = 0.123457 micro-$
    assert rates["qwen-eu-vast"] == pytest.approx(0.40e6 / (1500 * 0.6 * 3600))
    assert rates["llama-us-runpod"] == pytest.approx(0.99e6 / (1800 * 0.6 * 3600))      # 0.254630
    assert rates["qwen-eu-gonka"] == 0.35                                                 # the upstream's own price
    m = Money(spec_mod.load("prod"))
    # pro: 1,000 uncached + 500 cached at $0.60 (no cached price: the tier's) = 900 micro-$
    assert m.price("pro", 1000, 500) == 900
    assert m.cost("qwen-eu-gonka", 2000) == 700 and m.cost("qwen-eu-vast", 810) == 100
    assert m.cost(None, 1000) == 0 and m.price("gone-tier", 10, 0) == 0
    assert m.reserve("hobby", 1001) == 501            # ceil(1,001 x 0.50)


def _priced(cfg: dict) -> None:
    """Every demo-chat pool at $3.60 per CPU-hour and 1,000 tokens/s at U = 1: 1 micro-$ per token."""
    for p in cfg["pools"]:
        if p["model"] == "demo-chat":
            p["price_per_gpu_hour"] = 3.6
    cfg.setdefault("throughput", []).append({"gpu": "cpu", "model": "demo-chat", "tokens_per_s": 1000,
                                             "utilisation": 1.0})


def test_ledger_rows_carry_price_and_cost_and_the_debug_log_is_redacted(stack_factory):
    stack = stack_factory(_priced)
    key = stack.key("money", "pro")
    KeyAdmin(stack.state / "keys.db").set_debug_log("money", hours=1)
    client = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    secret = "sk-live0123456789abcdefXYZ"
    r = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": (
        f"I am jane@example.com, card 4111 1111 1111 1111, phone +1 (555) 010-9999, key {secret}")}],
        extra_headers={"x-request-id": "money-1"})
    u = r.usage
    cached = (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0
    db = sqlite3.connect(stack.state / "ledger.db")
    row = db.execute("SELECT prompt_tokens, cached_tokens, completion_tokens, price_micro_usd, cost_micro_usd "
                     "FROM usage WHERE request_id = 'money-1'").fetchone()
    uncached = u.prompt_tokens - cached
    assert row[:3] == (uncached, cached, u.completion_tokens)
    # pro: $0.60 per 1M uncached and output, $0.15 cached; cost 1 micro-$ per token served
    assert row[3] == round((uncached + u.completion_tokens) * 0.6 + cached * 0.15)
    assert row[4] == uncached + cached + u.completion_tokens and row[4] > 0
    prompt, completion, redacted = db.execute("SELECT prompt, completion, redacted FROM debug_log").fetchone()
    for leaked in ("jane@example.com", "4111", "010-9999", secret):
        assert leaked not in prompt
    assert "[redacted:email]" in prompt and "[redacted:card]" in prompt and "[redacted:phone]" in prompt
    assert redacted == "card=1,email=1,phone=1,secret=1" and completion
