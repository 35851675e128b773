"""The gateway's routing config: which endpoints serve which model, grouped in pools.

A pure function of the spec plus a rule for where a pool's replica listens (loopback ports on
the local stack, mesh addresses elsewhere). The gateway reads the result as JSON
(a file on one machine, a ConfigMap on Kubernetes) and reloads it live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleet.spec import Pool, Spec

EndpointRule = Callable[[Pool, int], str]   # (pool, replica index) -> base URL of the worker


def local_endpoints(spec: Spec) -> dict[tuple[str, int], int]:
    """Loopback ports of local (sim / llamacpp) workers, in declaration order from local_port_base."""
    ports: dict[tuple[str, int], int] = {}
    port = spec.local_port_base
    for pool in spec.pools:
        if spec.provider(pool.provider).kind not in ("sim", "llamacpp"):
            continue
        for i in range(pool.replicas):
            ports[(pool.name, i)] = port
            port += 1
    return ports


def local_rule(spec: Spec, host: str = "127.0.0.1") -> EndpointRule:
    ports = local_endpoints(spec)
    return lambda pool, i: f"http://{host}:{ports[(pool.name, i)]}"


def routing_config(spec: Spec, endpoint: EndpointRule) -> dict[str, Any]:
    """Models -> pools -> endpoints. A canary block adds a canary pool beside its base pool."""
    models: dict[str, dict[str, Any]] = {
        m.id: {"id": m.id, "fallback": m.fallback, "pools": []} for m in spec.models
    }
    for pool in spec.pools:
        prov = spec.provider(pool.provider)
        if prov.kind == "openai":
            endpoints = [{"id": f"{pool.name}/0", "url": prov.base_url, "credentials": prov.credentials}]
        else:
            endpoints = [{"id": f"{pool.name}/{i}", "url": endpoint(pool, i)} for i in range(pool.replicas)]
        role = pool.role
        if prov.role == "overflow" and role == "primary":
            role = "standby"
        models[pool.model]["pools"].append({
            "name": pool.name, "provider": prov.name, "region": pool.region,
            "role": role, "weight": 0.0 if role == "drained" else pool.weight,
            "endpoints": endpoints,
        })
    if spec.canary is not None:
        base = spec.pool(spec.canary.pool)
        name = f"{base.name}-canary"
        models[base.model]["pools"].append({
            "name": name, "provider": base.provider, "region": base.region, "role": "canary",
            "weight": spec.canary.weight / 100.0, "base_pool": base.name, "image": spec.canary.image,
            "endpoints": [{"id": f"{name}/0", "url": endpoint(base.model_copy(update={"name": name}), 0)}],
        })
    return {"stack": spec.stack, "models": list(models.values())}
