"""Failover: the effective spec, with drained providers applied.

A provider marked ``drained: true`` in the stack file is out of service: its pools plan as role
``drained`` (no leases, weight 0, so the gateway's weighted choice moves their traffic to the pools
left), and the plan adds *replacement capacity* deterministically:

- where a forecast exists for the model and region, surviving pools of that model and region
  get extra replicas (one at a time, always to the provider with the least capacity) until
  the forecast is carried with N+1 again; if fewer than two providers survive there, a pool
  on the reserved provider is added first (named ``<drained pool>-via-<reserved provider>``);
- where no forecast exists, the drained GPUs are replaced one for one on the survivors (the
  declared capacity is the only statement of need), or on the reserved provider if none survive.

Keeping the replacement in the plan (not written into the file) makes ``failover restore``
exact: removing the flag gives back the very same plan. The replacement replicas get the
next replica indices of their pool, so no existing lease, name or mesh address changes.

``effective_spec`` is computed once by whoever starts from a declared spec (the plan, the local
stack) and handed on: the routing config and the local endpoints take it as an argument.
"""

from __future__ import annotations

from fleet.capacity import counts_for_capacity, forecast_capacity, throughput
from fleet.kinds import KINDS, is_upstream
from fleet.spec import Pool, Spec


def drained_providers(spec: Spec) -> set[str]:
    """The providers the stack file marks ``drained: true``."""
    return {p.name for p in spec.providers if p.drained}


def effective_spec(spec: Spec) -> Spec:
    """The spec with drained providers applied: their pools drained, replacement capacity added."""
    drained = drained_providers(spec)
    if not drained:
        return spec
    pools = [p.model_copy(update={"role": "drained"}) if p.provider in drained else p for p in spec.pools]
    lost = [p for p in spec.pools if p.provider in drained and p.role != "drained" and p.replicas > 0
            and not KINDS[spec.provider(p.provider).kind].upstream]
    groups: dict[tuple[str, str], list[Pool]] = {}
    for p in lost:
        groups.setdefault((p.model, p.region), []).append(p)
    forecasts = {(f.model, f.region): f for f in spec.forecast}
    for (model, region), gone in groups.items():
        fc = forecasts.get((model, region))

        def survivors(model: str = model, region: str = region) -> list[int]:
            return [i for i, p in enumerate(pools)
                    if p.model == model and p.region == region and counts_for_capacity(spec, p)]

        providers_left = {pools[i].provider for i in survivors()}
        need_two = fc is not None and fc.qps > 0
        if not providers_left or (need_two and len(providers_left) < 2):
            reserved = next((pr for pr in spec.providers if pr.role == "reserved" and pr.name not in drained
                             and region in pr.regions and pr.name not in providers_left
                             and not is_upstream(pr.kind)), None)
            if reserved is not None:
                src = gone[0]
                name = f"{src.name}-via-{reserved.name}"
                if all(p.name != name for p in pools):
                    pools.append(src.model_copy(update={
                        "name": name, "provider": reserved.name, "replicas": 0,
                        "price_per_gpu_hour": None, "role": src.role,
                    }))
        idx = survivors()
        if not idx:
            continue
        if fc is None:
            # No forecast: replace the drained GPUs one for one.
            missing = sum(p.replicas * p.gpu.count for p in gone)
            while missing > 0:
                i = _smallest(spec, pools, idx)
                pools[i] = pools[i].model_copy(update={"replicas": pools[i].replicas + 1})
                missing -= pools[i].gpu.count
            continue
        # Converges: each step raises the provider with the least capacity, so the capacity left
        # after losing the largest grows; bounded anyway (a plan never loops on odd figures).
        for _ in range(256):
            cap = forecast_capacity(spec, fc, [pools[i] for i in idx])
            if cap.required_gpus is None or (cap.ok and (cap.n_plus_1 or len({pools[i].provider for i in idx}) < 2)):
                break
            i = _smallest(spec, pools, idx)
            pools[i] = pools[i].model_copy(update={"replicas": pools[i].replicas + 1})
    return spec.model_copy(update={"pools": pools})


def _smallest(spec: Spec, pools: list[Pool], idx: list[int]) -> int:
    """Index of the surviving pool whose provider holds the least capacity (declaration order breaks ties)."""
    by_provider: dict[str, float] = {}
    for i in idx:
        p = pools[i]
        t = throughput(spec, p.gpu.type, p.model)
        rate = t.tokens_per_s * t.efficiency if t else 1.0
        by_provider[p.provider] = by_provider.get(p.provider, 0.0) + p.replicas * p.gpu.count * rate
    smallest = min(by_provider[pools[i].provider] for i in idx)
    cands = [i for i in idx if by_provider[pools[i].provider] == smallest]
    prefer = [i for i in cands if pools[i].role == "primary"] or cands
    return prefer[0]
