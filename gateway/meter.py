"""The meter: a request's end, however it ends.

Every request that got past authentication leaves exactly one ledger row, priced at its tier's
prices beside its cost (gateway/money.py). An answered request's row is committed before the
client gets the answer's last byte (``finish``: the ledger's group commit); a stream whose client
left or whose upstream broke queues its row without waiting (``finish_soon``); a refusal is
committed before its error is sent (``refused``). Each one then corrects what admission charged:
the limiter's up-front token estimate against the real usage, and the key's spend hold against
the row's price (``settle``); and counts the outcome (metrics, the SLO-risk window and the latency
breaker: gateway/risk.py). ``end`` gives back the concurrency slots admission took (``Held``).
Opted-in tenants' prompts and answers go to the debug log, redacted (``keep_debug_log``).
"""

from __future__ import annotations

import time

import orjson

from fleet.spec import Spec
from gateway.admission import Admitted, Held
from gateway.backends import Limiter, UsageLedger
from gateway.door import InFlight
from gateway.errors import ApiError
from gateway.keys import Principal
from gateway.ledger import UsageRecord
from gateway.metrics import Metrics
from gateway.money import Money
from gateway.overload import InFlightCount
from gateway.redact import redact, summary
from gateway.risk import Breaker, RiskWindow
from gateway.router import Router
from gateway.wire import Reply


class Meter:
    """Ledger rows, settlements and counts; ``spec`` (its privacy settings) is replaced live."""

    def __init__(self, spec: Spec, ledger: UsageLedger, limiter: Limiter, money: Money, metrics: Metrics,
                 router: Router, risk: RiskWindow, breaker: Breaker, in_flight: InFlightCount,
                 door: InFlight) -> None:
        self.spec = spec
        self.ledger, self.limiter, self.money, self.metrics = ledger, limiter, money, metrics
        self.router, self.risk, self.breaker = router, risk, breaker
        self.in_flight, self.door = in_flight, door

    async def finish(self, adm: Admitted, rec: UsageRecord) -> None:
        """Meter an answered request: its ledger row is committed when this returns (group commit)."""
        self.priced(rec)
        await self.ledger.commit(rec)
        self.settle(adm, rec, rec.prompt_tokens + rec.cached_tokens + rec.completion_tokens)
        self.count(rec)

    def finish_soon(self, adm: Admitted, rec: UsageRecord) -> None:
        """Meter a request whose client is gone or whose stream broke: nobody waits for the row."""
        self.priced(rec)
        self.ledger.commit_soon(rec)
        self.settle(adm, rec, rec.prompt_tokens + rec.cached_tokens + rec.completion_tokens)
        self.count(rec)

    async def refused(self, e: ApiError, rec: UsageRecord, adm: Admitted | None, headers: dict[str, str],
                      started: float) -> Reply:
        """A request that ends in an error before any answer: metered, counted, answered. ``adm``:
        None when admission refused it (nothing was charged to the limiter)."""
        rec.status, rec.error = e.status, e.code
        rec.ttlt_ms = (time.perf_counter() - started) * 1000
        try:
            await self.ledger.commit(rec)
        finally:
            if adm is not None:
                self.settle(adm, rec, 0)
            elif rec.spend_hold is not None:
                self.release_spend(rec)
            self.count(rec)
        e.headers = headers | e.headers
        return e.reply(rec.request_id)

    def end(self, held: Held) -> None:
        """A request's concurrency slots back: when it is answered, or when its stream ends."""
        if held.counted:
            self.in_flight.leave()
        if held.door:
            self.door.leave(held.principal)

    def priced(self, rec: UsageRecord) -> None:
        """The request's price at its tier's prices and its cost, beside each other in its ledger row."""
        money = self.money
        rec.price_micro_usd = money.price(rec.tier, rec.prompt_tokens + rec.completion_tokens, rec.cached_tokens)
        rec.cost_micro_usd = money.cost(rec.pool, rec.prompt_tokens + rec.cached_tokens + rec.completion_tokens)

    def settle(self, adm: Admitted, rec: UsageRecord, actual: int) -> None:
        """Correct the limiter's up-front token charge (never waits: Redis settles are batched)."""
        self.limiter.settle(adm.principal.tenant + adm.scope, adm.principal.key_id + adm.scope,
                            adm.prompt_tokens_estimate + adm.max_output, actual)
        if rec.spend_hold is not None:
            self.release_spend(rec)

    def release_spend(self, rec: UsageRecord) -> None:
        """Replace the hold with what the request was charged (its ledger row's price)."""
        hold = rec.spend_hold
        if hold is None:
            return
        month, held = hold
        rec.spend_hold = None
        self.limiter.settle_spend(rec.key_id, month, rec.price_micro_usd - held)

    def count(self, rec: UsageRecord) -> None:
        m = self.metrics
        if rec.requested_model and (rec.status == 200 or rec.status >= 500):
            self.risk.observe(rec.requested_model, rec.ttft_ms if rec.status == 200 else None, rec.status >= 500)
            self.breaker.observe(rec.served_model or rec.requested_model, rec.ttft_ms if rec.status == 200 else None,
                                 rec.status >= 500)
        # labels take only names the stack declares: a client's made-up model is one series, not many
        model_label = rec.requested_model if self.router.has_model(rec.requested_model) else (
            "unknown" if rec.requested_model else "")
        m.requests.labels(rec.route, f"{rec.status // 100}xx", model_label, rec.pool or "",
                          rec.provider or "", rec.region or "", rec.tier).inc()
        if rec.status != 200:
            m.tenant_errors.labels(rec.tenant, rec.tier, f"{rec.status // 100}xx", rec.error or "").inc()
        else:
            model, pool = rec.served_model or rec.requested_model, rec.pool or ""
            if rec.ttft_ms is not None:
                m.ttft.labels(model, pool, rec.tier).observe(rec.ttft_ms / 1000)
            if rec.ttlt_ms is not None:
                m.ttlt.labels(model, pool, rec.tier).observe(rec.ttlt_ms / 1000)
            m.tokens.labels("in", model, rec.tier).inc(rec.prompt_tokens)
            if rec.cached_tokens:
                m.tokens.labels("cached_in", model, rec.tier).inc(rec.cached_tokens)
            m.tokens.labels("out", model, rec.tier).inc(rec.completion_tokens)

    # ---- the debug log (opted-in tenants only) -----------------------------------------------
    def debug_logging(self, p: Principal) -> bool:
        return bool(self.spec.gateway.privacy.log_prompts or (p.debug_log_until and p.debug_log_until > time.time()))

    def keep_debug_log(self, adm: Admitted, rec: UsageRecord, completion: str) -> None:
        ttl = self.spec.gateway.privacy.debug_log_ttl_hours * 3600
        until = min(time.time() + ttl, adm.principal.debug_log_until or float("inf"))
        payload = adm.payload
        prompt = next((payload[f] for f in ("messages", "prompt", "input") if f in payload), None)
        # secrets, card numbers, emails and phone numbers never reach the file (gateway/redact.py)
        prompt_text, a = redact(orjson.dumps(prompt).decode())
        completion, b = redact(completion)
        self.ledger.debug_log(rec.request_id, rec.tenant, prompt_text, completion, until, summary(a, b))
