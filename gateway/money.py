"""What a request is charged and what it costs, in integer micro-dollars (docs/money.md).

Prices per 1M tokens in USD are micro-dollars per token, so a request's price is its tokens times
its tier's prices: uncached input and output at ``price_per_1m_tokens``, cached input at
``price_per_1m_cached_tokens`` (the tier's price when unset). Its cost, recorded beside the price:

- a pool on an ``openai``-kind upstream: the upstream's own ``price_per_1m_tokens`` for every token;
- a leased pool: the lease's price per GPU-hour spread over the tokens it serves in an hour at the
  declared throughput and utilisation (price / (R x U x 3,600) per token). That is the plan's rate;
  `infermesh usage report` replaces it with the lease-hours really spread over the tokens the pool
  served in each hour (infermesh_cli/commands/usage.py);
- a local process (sim, llama.cpp): nothing, unless its pool declares price_per_gpu_hour (then like a lease).

Everything here is computed once per stack load; the request path does one dict lookup and a few
multiplications (Meter.priced).
"""

from __future__ import annotations

import calendar
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.spec import Spec, Tier


@dataclass(frozen=True, slots=True)
class TierPrices:
    per_token: float              # micro-dollars per uncached input or output token
    per_cached_token: float       # micro-dollars per cached input token

    @property
    def most(self) -> float:
        return max(self.per_token, self.per_cached_token)


def tier_prices(tier: Tier) -> TierPrices:
    cached = tier.price_per_1m_cached_tokens
    return TierPrices(tier.price_per_1m_tokens, tier.price_per_1m_tokens if cached is None else cached)


def pool_rates(spec: Spec) -> dict[str, float]:
    """Micro-dollars per token of every pool (failover pools included), as described above."""
    from fleet.capacity import throughput
    from fleet.failover import effective_spec
    from fleet.kinds import LEASED_KINDS, is_upstream

    eff = effective_spec(spec)
    out: dict[str, float] = {}
    for pool in eff.pools:
        prov = eff.provider(pool.provider)
        if is_upstream(prov.kind):
            out[pool.name] = prov.price_per_1m_tokens or 0.0
            continue
        if prov.kind not in LEASED_KINDS and pool.price_per_gpu_hour is None:
            out[pool.name] = 0.0          # a local process: free, unless the stack prices it (demos, tests)
            continue
        price = pool.price_per_gpu_hour if pool.price_per_gpu_hour is not None else prov.price_cap_per_gpu_hour
        t = throughput(eff, pool.gpu.type, pool.model)
        out[pool.name] = price * 1e6 / (t.tokens_per_s * t.utilisation * 3600) if price and t else 0.0
    return out


class Money:
    """The gateway's price and cost tables for one stack."""

    def __init__(self, spec: Spec) -> None:
        self.tiers = {t.name: tier_prices(t) for t in spec.tiers}
        self.rates = pool_rates(spec)

    def price(self, tier: str, uncached: int, cached: int) -> int:
        p = self.tiers.get(tier)
        return round(uncached * p.per_token + cached * p.per_cached_token) if p else 0

    def cost(self, pool: str | None, tokens: int) -> int:
        return round(tokens * self.rates.get(pool, 0.0)) if pool else 0

    def reserve(self, tier: str, tokens: int) -> int:
        """The most a request of up to `tokens` tokens can be charged: what a spend limit holds back."""
        p = self.tiers.get(tier)
        return math.ceil(tokens * p.most) if p else 0


def month_now(now: float | None = None) -> tuple[str, int]:
    """The calendar month (UTC) as YYYY-MM and its first second: what a key's monthly spend counts."""
    t = time.gmtime(time.time() if now is None else now)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}", calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))


_SPENT = "SELECT coalesce(sum(price_micro_usd), 0) FROM usage WHERE key_id = {p} AND created_at >= {p}"


def spent_since(key_id: str, since: float, ledger: Path | None = None, dsn: str | None = None) -> int:
    """What the ledger says a key was charged since `since` (micro-dollars): the shared PostgreSQL
    ledger where there is one, else this gateway's SQLite ledger. Read when a spend store does not know
    the key's month yet (once per key and month per process, or after Redis lost its counters)."""
    if dsn is not None:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as pg:
            return _sum(pg.execute(_SPENT.format(p="%s"), (key_id, since)).fetchone())
    if ledger is None:
        raise ValueError("spent_since: give the SQLite ledger's path or a PostgreSQL DSN")
    conn = sqlite3.connect(ledger)
    try:
        return _sum(conn.execute(_SPENT.format(p="?"), (key_id, since)).fetchone())
    finally:
        conn.close()


def _sum(row: tuple[Any, ...] | None) -> int:
    return int(row[0]) if row is not None else 0     # (coalesce: the sum's one row is never empty)
