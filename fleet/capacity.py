"""Capacity: forecast demand against the supply the pools declare, per model and region.

GPUs per model x region = ceil(QPS x (Tp + Tc) / (Rt x E) x headroom); N+1 holds when the declared
pools still carry that after losing the provider with the most capacity there. Pure functions of
the spec: the failover (fleet/failover.py) sizes replacement capacity with them, the routing config
(fleet/routing.py) carries the required GPUs to the gateway's router and the plan reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleet.kinds import is_upstream
from fleet.spec import Forecast, Pool, Spec, Throughput


@dataclass(frozen=True)
class Capacity:
    """Forecast demand against declared supply for one model in one region."""

    model: str
    region: str
    qps: float
    tokens_per_request: int                 # Tp + Tc
    demand_tokens_per_s: float              # QPS x (Tp + Tc)
    headroom: float
    gpu_type: str | None                    # reference GPU (throughput figures in its units)
    tokens_per_s: float | None              # Rt of the reference GPU for this model
    efficiency: float | None                # E
    gpus_exact: float | None                # QPS x (Tp + Tc) / (Rt x E), before headroom
    required_gpus: int | None               # ceil(gpus_exact x headroom)
    declared_gpus: int                      # GPUs in the non-drained pools here (overflow upstreams excluded)
    declared_equivalent: float              # declared capacity in reference GPUs (= declared_gpus if one type)
    by_provider: tuple[tuple[str, float], ...]   # reference-GPU capacity per provider
    largest_provider: str | None
    after_loss: float                       # capacity left after losing the largest provider
    ok: bool                                # declared carries the forecast with headroom
    n_plus_1: bool                          # ... and still does after losing the largest provider
    missing_throughput: tuple[str, ...] = ()   # pools without a throughput figure (not counted)


# ---- formulas (small, named, tested with the seeds' worked examples) --------------------------

def gpus_needed(qps: float, prompt_tokens: int, completion_tokens: int,
                tokens_per_s: float, efficiency: float) -> float:
    """QPS x (Tp + Tc) / (Rt x E): e.g. 2 x 850 / (1,500 x 0.75) = 1.51."""
    return qps * (prompt_tokens + completion_tokens) / (tokens_per_s * efficiency)


def round_up(x: float) -> int:
    """Ceil that ignores float dust (2.0000000000004 is 2)."""
    return math.ceil(round(x, 9))


def counts_for_capacity(spec: Spec, pool: Pool) -> bool:
    """Whether a pool is supply the forecast can count on (not drained, not an upstream or overflow)."""
    prov = spec.provider(pool.provider)
    return pool.role != "drained" and not is_upstream(prov.kind) and prov.role != "overflow"


def throughput(spec: Spec, gpu: str, model: str) -> Throughput | None:
    """The declared throughput figure of a model on a GPU type, if any."""
    return next((t for t in spec.throughput if t.gpu == gpu and t.model == model), None)


def pool_equiv(spec: Spec, pool: Pool, ref_rate: float | None) -> float:
    """A pool's capacity in reference GPUs (0 without a figure for it or for the reference)."""
    t = throughput(spec, pool.gpu.type, pool.model)
    if t is None or not ref_rate:
        return 0.0
    return pool.replicas * pool.gpu.count * t.tokens_per_s * t.efficiency / ref_rate


def forecast_capacity(spec: Spec, fc: Forecast, pools: list[Pool]) -> Capacity:
    """One forecast (model x region) against `pools`."""
    here = [p for p in pools if p.model == fc.model and p.region == fc.region and counts_for_capacity(spec, p)]
    # Reference GPU: the type holding the most GPUs here among those with a throughput figure.
    gpus_by_type: dict[str, int] = {}
    for p in here:
        if throughput(spec, p.gpu.type, p.model):
            gpus_by_type[p.gpu.type] = gpus_by_type.get(p.gpu.type, 0) + p.replicas * p.gpu.count
    ref = max(gpus_by_type, key=lambda g: (gpus_by_type[g], g)) if gpus_by_type else None
    if ref is None:  # no pool here with a figure: any figure for the model
        t_any = next((t for t in spec.throughput if t.model == fc.model), None)
        ref = t_any.gpu if t_any else None
    t_ref = throughput(spec, ref, fc.model) if ref else None
    demand = fc.qps * (fc.prompt_tokens + fc.completion_tokens)
    headroom = spec.planning.headroom
    if t_ref is None:
        exact = required = None
        ref_rate = None
    else:
        ref_rate = t_ref.tokens_per_s * t_ref.efficiency
        exact = gpus_needed(fc.qps, fc.prompt_tokens, fc.completion_tokens, t_ref.tokens_per_s, t_ref.efficiency)
        required = round_up(exact * headroom)
    by_provider: dict[str, float] = {}
    for p in here:
        by_provider[p.provider] = by_provider.get(p.provider, 0.0) + pool_equiv(spec, p, ref_rate)
    declared_equiv = sum(by_provider.values())
    largest = max(by_provider, key=lambda k: (by_provider[k], k)) if by_provider else None
    after = declared_equiv - (by_provider[largest] if largest else 0.0)
    eps = 1e-9
    ok = required is not None and declared_equiv + eps >= required
    n1 = required is not None and after + eps >= required
    return Capacity(
        model=fc.model, region=fc.region, qps=fc.qps,
        tokens_per_request=fc.prompt_tokens + fc.completion_tokens,
        demand_tokens_per_s=demand, headroom=headroom, gpu_type=ref,
        tokens_per_s=t_ref.tokens_per_s if t_ref else None,
        efficiency=t_ref.efficiency if t_ref else None,
        gpus_exact=exact, required_gpus=required,
        declared_gpus=sum(p.replicas * p.gpu.count for p in here),
        declared_equivalent=round(declared_equiv, 6),
        by_provider=tuple(sorted((k, round(v, 6)) for k, v in by_provider.items())),
        largest_provider=largest, after_loss=round(after, 6), ok=ok, n_plus_1=n1,
        missing_throughput=tuple(p.name for p in here if throughput(spec, p.gpu.type, p.model) is None),
    )


def capacity(spec: Spec) -> tuple[Capacity, ...]:
    """Every forecast against the spec's pools."""
    return tuple(forecast_capacity(spec, fc, list(spec.pools)) for fc in spec.forecast)
