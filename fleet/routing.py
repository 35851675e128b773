"""The gateway's routing config: which endpoints serve which model, grouped in pools.

A pure function of the spec plus a rule for where a pool's replica listens (loopback ports on
the local stack, mesh addresses elsewhere). The gateway reads the result as JSON
(a file on one machine, a ConfigMap on Kubernetes) and reloads it live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleet.capacity import capacity
from fleet.channel import tls_ref
from fleet.failover import effective_spec
from fleet.kinds import channel_for, kind
from fleet.spec import Pool, Spec, SpecError

EndpointRule = Callable[[Pool, int], str]   # (pool, replica index) -> base URL of the worker


def canary_pool(spec: Spec) -> Pool | None:
    """The canary block as a pool: one replica like its base pool, with the new image (and, on
    sim pools, the new build's knobs), named ``<base>-canary``."""
    if spec.canary is None:
        return None
    base = spec.pool(spec.canary.pool)
    return base.model_copy(update={"name": f"{base.name}-canary", "replicas": 1, "role": "canary",
                                   "image": spec.canary.image, "sim": spec.canary.sim or base.sim})


def canary_share(spec: Spec) -> tuple[float, float]:
    """(share of the model's traffic for the canary, base pool's new weight).

    The canary block's weight is a percent of *its base pool's* traffic. The gateway's router
    draws the canary's share from the whole model first, so the share is weight% x the base
    pool's share of the model's primary weight, and the base pool's weight shrinks by the same
    factor: the canary then takes weight% of the base pool's traffic and the other pools keep
    exactly what they had. (A base pool that is not an active primary gives the canary nothing.)
    """
    assert spec.canary is not None
    base = spec.pool(spec.canary.pool)
    a = spec.canary.weight / 100.0

    def active(p: Pool) -> bool:
        prov = spec.provider(p.provider)
        return (p.role == "primary" and not prov.drained and prov.role != "overflow"
                and p.weight > 0 and (kind(prov.kind).upstream or p.replicas > 0))

    total = sum(p.weight for p in spec.pools if p.model == base.model and active(p))
    if not active(base) or total <= 0:
        return 0.0, base.weight
    return a * base.weight / total, base.weight * (1 - a)


def local_endpoints(spec: Spec, effective: Spec) -> dict[tuple[str, int], int]:
    """Loopback ports of local (sim / llamacpp) workers, in declaration order from local_port_base.
    A canary's worker comes after all pools, so starting or ending one moves no other port.
    Capacity that a drained provider's failover adds (``effective``, the spec's
    fleet.failover.effective_spec: more replicas on the survivors, a pool on the reserved provider)
    comes after that, for the same reason; a drained pool keeps its ports for when it is restored."""
    ports: dict[tuple[str, int], int] = {}
    port = spec.local_port_base
    canary = canary_pool(spec)
    for pool in [*spec.pools, *([canary] if canary is not None else []), *effective.pools]:
        if not kind(spec.provider(pool.provider).kind).local:
            continue
        for i in range(pool.replicas):
            if (pool.name, i) not in ports:
                ports[(pool.name, i)] = port
                port += 1
    return ports


def local_rule(spec: Spec, host: str = "127.0.0.1") -> EndpointRule:
    """Where a declared local stack's workers listen: https on loopback, on the ports ``local_endpoints``
    declares for it (its effective spec computed here, once)."""
    ports = local_endpoints(spec, effective_spec(spec))
    return lambda pool, i: f"https://{host}:{ports[(pool.name, i)]}"


def gateway_config(spec: Spec, routing: dict[str, Any]) -> dict[str, Any]:
    """The one file a gateway reads (a ConfigMap on Kubernetes): the routing config (models, pools,
    endpoints and their channels, ``tls_dir``) and, under ``spec``, the rest of the declared service
    the gateway serves by (tiers, limits, SLOs, the ``gateway:`` block). Secrets are never in it: only
    their names (the values reach the pods as INFERMESH_SECRET_* environment). The gateway image
    carries code only, so a stack change (a failover, a canary) changes this file, not the image."""
    return {**routing, "spec": spec.model_dump(mode="json", exclude={"secrets", "stack"})}


def spec_from_gateway_config(config: dict[str, Any]) -> Spec:
    """The Spec a gateway serves by, from ``gateway_config``'s output. The secrets it names are
    marked as set (their values come from the environment); a config that does not validate raises
    fleet.spec.SpecError."""
    data = config.get("spec")
    if not isinstance(data, dict):
        raise SpecError("gateway config: no `spec` object (write it with fleet.routing.gateway_config)")
    names = [p.get(k) for p in data.get("providers") or [] for k in ("credentials", "registry_credentials")]
    names.append((data.get("delivery") or {}).get("admin_token"))
    secrets = {n: "(from the environment)" for n in names if n}
    try:
        return Spec.model_validate({**data, "stack": config.get("stack", ""), "secrets": secrets})
    except ValueError as e:
        raise SpecError(f"gateway config: {str(e).splitlines()[0]} ({e})") from None


def secret_env_name(secret: str) -> str:
    """The environment variable a gateway reads a stack secret from (set from the Kubernetes Secret)."""
    return "INFERMESH_SECRET_" + "".join(c if c.isalnum() else "_" for c in secret).upper()


def worker_endpoint(spec: Spec, pool: Pool, i: int, url: str) -> dict[str, Any]:
    """One worker's routing entry: its address and its channel (fleet/kinds.py). An ``mtls`` endpoint
    is dialled over https and names its TLS material by reference (fleet/channel.py: the stack CA,
    the gateway's client certificate, the name on the worker's certificate); a ``wireguard`` one is
    plain HTTP inside the mesh."""
    channel = channel_for(spec.provider(pool.provider).kind, pool.connection)
    entry: dict[str, Any] = {"id": f"{pool.name}/{i}", "url": url, "channel": channel}
    if channel == "mtls":
        entry["url"] = "https://" + url.split("://", 1)[-1]
        entry["tls"] = tls_ref(spec.stack, f"{pool.name}-{i}")
    return entry


def routing_config(spec: Spec, endpoint: EndpointRule, tls_dir: str | None = None) -> dict[str, Any]:
    """Models -> pools -> endpoints. A canary block adds a canary pool beside its base pool.
    ``tls_dir``: where the gateway finds the TLS material the mTLS endpoints name."""
    models: dict[str, dict[str, Any]] = {
        m.id: {"id": m.id, "kind": m.kind, "context_length": m.context_length, "fallback": m.fallback, "pools": []}
        for m in spec.models
    }
    for pool in spec.pools:
        prov = spec.provider(pool.provider)
        if kind(prov.kind).upstream:
            endpoints: list[dict[str, Any]] = [{"id": f"{pool.name}/0", "url": prov.base_url,
                                                "credentials": prov.credentials, "channel": "https"}]
            # the upstream's own limits (gateway/state/upstream_limits.py)
            for limit, value in (("max_concurrency", prov.max_concurrency), ("rpm", prov.rpm)):
                if value:
                    endpoints[0][limit] = value
        else:
            endpoints = [worker_endpoint(spec, pool, i, endpoint(pool, i)) for i in range(pool.replicas)]
        role = pool.role
        if prov.role == "overflow" and role == "primary":
            role = "standby"
        entry = {
            "name": pool.name, "provider": prov.name, "region": pool.region,
            "role": role, "weight": 0.0 if role == "drained" else pool.weight,
            "endpoints": endpoints,
        }
        if pool.upstream_model:
            entry["upstream_model"] = pool.upstream_model
        if not kind(prov.kind).upstream:       # the router's N+1 (gateway/router.py, Router.standby_share)
            entry["max_concurrency"], entry["gpus"] = pool.max_concurrency, pool.gpu.count
        models[pool.model]["pools"].append(entry)
    canary = canary_pool(spec)
    if spec.canary is not None and canary is not None:
        base = spec.pool(spec.canary.pool)
        share, base_weight = canary_share(spec)
        for entry in models[base.model]["pools"]:
            if entry["name"] == base.name and entry["role"] == "primary":
                entry["weight"] = base_weight
        models[base.model]["pools"].append({
            "name": canary.name, "provider": base.provider, "region": base.region, "role": "canary",
            "weight": share, "base_pool": base.name, "image": spec.canary.image,
            "endpoints": [worker_endpoint(spec, canary, 0, endpoint(canary, 0))],
        })
    for cap in capacity(spec):           # the plan sized this much primary capacity per model (with headroom)
        if cap.required_gpus:
            m = models[cap.model]
            m["required_gpus"] = m.get("required_gpus", 0) + cap.required_gpus
            m.setdefault("required_gpus_by_region", {})[cap.region] = cap.required_gpus
    out: dict[str, Any] = {"stack": spec.stack, "models": list(models.values())}
    backups = {r.name: r.backup for r in spec.regions if r.backup}
    if backups:
        out["region_backups"] = backups          # gateway/router.py: a region's failover
    if tls_dir is not None:
        out["tls_dir"] = tls_dir
    return out


def routing_without(config: dict[str, Any], endpoint_ids: list[str] | None) -> dict[str, Any]:
    """The routing config with the given endpoints removed (drained nodes get no new requests)."""
    drop = set(endpoint_ids or ())
    models = []
    for model in config.get("models", []):
        pools = []
        for pool in model.get("pools", []):
            endpoints = [ep for ep in pool.get("endpoints", []) if ep.get("id") not in drop]
            pools.append({**pool, "endpoints": endpoints})
        models.append({**model, "pools": pools})
    return {**config, "models": models}
