"""The plan: everything that decides something, as pure functions of the spec.

``build_plan(spec)`` returns a :class:`Plan`: the GPU leases to rent, the WireGuard mesh
(addresses and peers), the gateway's routing config, the capacity and VRAM verdicts and the
costs. Pulumi (``__main__.py``), Ansible and the gateway only carry the plan out; `infermesh
plan` prints it and `infermesh check` judges it (fleet/policy.py).

Failover (a drained provider's pools and their replacement capacity) is fleet/failover.py; the
plan applies it once (``effective_spec``) and plans everything else from that effective spec.
Capacity against the forecast is fleet/capacity.py.

Formulas (the seeds'):

- GPUs per model x region (fleet/capacity.py) = ceil(QPS x (Tp + Tc) / (Rt x E) x headroom); N+1
  holds when the declared pools still carry that after losing the provider with the most capacity there.
- VRAM per pool: weights_gb + layers x kv_heads x 2 x head_dim x dtype_bytes x tokens x
  sequences / 2**30 GiB, against the GPU's VRAM x count.
- Monthly cost = price per GPU-hour x GPUs x replicas x 730; COGS per 1M tokens =
  price per GPU-hour / (R x U x 3600) x 1e6 + overhead.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.capacity import Capacity, capacity, throughput
from fleet.failover import drained_providers, effective_spec
from fleet.kinds import KINDS, LEASED_KINDS, LOCAL_KINDS
from fleet.routing import local_endpoints, routing_config
from fleet.spec import Pool, Spec

HOURS_PER_MONTH = 730
WORKER_PORT = 8000                      # vLLM's OpenAI-compatible server on each worker
GiB = 2 ** 30


# ---- the shapes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lease:
    """One GPU lease (one pool replica) to rent."""

    name: str                   # "<pool>-<i>": also the marketplace label that makes create idempotent
    pool: str
    model: str
    provider: str
    provider_kind: str
    region: str
    gpu_type: str
    gpu_count: int
    price_cap: float | None     # the provider's cap per GPU-hour; offers above it are refused
    image: str | None
    connection: str             # "container" | "ssh"
    mesh_address: str           # this worker's WireGuard address
    replica: int = 0
    role: str = "primary"
    price_per_gpu_hour: float | None = None   # the pool's expected price, if declared
    failover: bool = False      # replacement capacity added because a provider is drained


@dataclass(frozen=True)
class MeshNode:
    name: str
    role: str                   # "gateway" | "worker"
    address: str                # inside spec.mesh.cidr, deterministic
    pool: str | None
    peers: tuple[str, ...]      # gateways peer with all workers; workers with all gateways


@dataclass(frozen=True)
class PoolPlan:
    """A pool as planned: its declared replicas and what failover added."""

    name: str
    model: str
    provider: str
    provider_kind: str
    region: str
    role: str                   # effective role (drained when its provider is)
    declared_role: str
    weight: float               # effective routing weight (0 when drained)
    gpu_type: str
    gpu_count: int
    replicas: int               # effective replicas
    declared_replicas: int
    failover_replicas: int      # replicas added by failover (replicas - declared, or all of a new pool)
    leased: bool                # replicas are GPU leases (not local processes, not an upstream)
    added_by_failover: bool = False


@dataclass(frozen=True)
class Vram:
    pool: str
    model: str
    gpu_type: str
    gpu_count: int
    weights_gb: float
    kv_bytes_per_token: int | None          # None: the model declares no arch (weights only, flagged)
    tokens: int                             # per sequence: pool.max_model_len or the model's context
    sequences: int                          # pool.max_concurrency
    kv_cache_gb: float
    total_gb: float
    gpu_vram_gb: float                      # VRAM per GPU x count
    fits: bool
    weights_only: bool                      # no arch: the KV cache could not be counted


@dataclass(frozen=True)
class PoolCost:
    pool: str
    provider: str
    model: str
    region: str
    gpus: int                               # GPUs leased: count x replicas (0 when drained)
    price_per_gpu_hour: float | None
    price_source: str | None                # "pool" | "cap" | "per-token" | None
    monthly: float | None                   # None: no price known (or billed per token)
    tokens_per_s: float | None              # R (per GPU)
    utilisation: float | None               # U
    cogs_per_1m: float | None


@dataclass(frozen=True)
class TierMargin:
    tier: str
    price_per_1m: float
    cogs_per_1m: float | None               # traffic-weighted over the tier's models, primaries at declared U
    margin_per_1m: float | None
    margin_pct: float | None
    by_model: tuple[tuple[str, float | None], ...]
    # fully loaded (ModelCost): the whole fleet's monthly cost over the forecast tokens of the tier's models
    loaded_cost_per_1m: float | None = None
    loaded_margin_per_1m: float | None = None
    loaded_margin_pct: float | None = None  # of the price
    min_price_per_1m: float | None = None   # loaded cost x (1 + planning.min_margin_pct / 100)


@dataclass(frozen=True)
class ModelCost:
    """What one model costs a month, fully loaded, at the forecast volume (USD)."""

    model: str
    tokens_per_month: float                 # forecast: sum of QPS x (Tp + Tc) x 3600 x 730
    leases: float                           # every lease of its pools: primary, standby, canary (not drained)
    overflow_share: float                   # share of its tokens the plan sends to the overflow upstream
    overflow: float                         # those tokens at the upstream's price per 1M
    gateway: float                          # its share (by tokens) of the gateway fleet's monthly cost
    overhead: float                         # planning.overhead_per_1m_tokens x its tokens
    monthly: float                          # the sum
    cost_per_1m: float | None               # monthly / (tokens / 1e6); None without a forecast


@dataclass(frozen=True)
class FleetCost:
    """The whole fleet a month, fully loaded (USD)."""

    leases: float
    overflow: float
    gateway: float
    overhead: float
    monthly: float
    tokens_per_month: float
    cost_per_1m: float | None


@dataclass(frozen=True)
class Costs:
    pools: tuple[PoolCost, ...]
    providers: tuple[tuple[str, float], ...]   # monthly per provider
    monthly_total: float
    tiers: tuple[TierMargin, ...]
    overhead_per_1m: float = 0.0
    models: tuple[ModelCost, ...] = ()
    fleet: FleetCost | None = None


@dataclass(frozen=True)
class Plan:
    stack: str
    leases: tuple[Lease, ...]
    mesh: tuple[MeshNode, ...]
    routing: dict
    capacity: tuple[Capacity, ...]
    vram: tuple[Vram, ...]
    costs: Costs
    pools: tuple[PoolPlan, ...] = ()
    providers: tuple[dict, ...] = ()        # name, kind, role, regions, price cap, drained
    drained: tuple[str, ...] = ()           # providers marked drained
    effective: Spec | None = field(default=None, compare=False, repr=False)  # spec with failover applied

    def lease(self, name: str) -> Lease:
        return next(x for x in self.leases if x.name == name)

    def node(self, name: str) -> MeshNode:
        return next(x for x in self.mesh if x.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "providers": [dict(p) for p in self.providers],
            "drained": list(self.drained),
            "pools": [asdict(p) for p in self.pools],
            "leases": [asdict(x) for x in self.leases],
            "capacity": [_jsonable(asdict(c)) for c in self.capacity],
            "vram": [asdict(v) for v in self.vram],
            "mesh": [asdict(n) | {"peers": list(n.peers)} for n in self.mesh],
            "routing": self.routing,
            "costs": _jsonable(asdict(self.costs)),
        }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---- formulas (small, named, tested with the seeds' worked examples) --------------------------

def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return layers * kv_heads * 2 * head_dim * dtype_bytes


def cogs_per_1m(price_per_gpu_hour: float, tokens_per_s: float, utilisation: float,
                overhead: float = 0.0) -> float:
    """$2.80/h at 1,600 tok/s and 60% utilisation = $0.81 per 1M tokens."""
    return price_per_gpu_hour / (tokens_per_s * utilisation * 3600) * 1e6 + overhead


def monthly_cost(price_per_gpu_hour: float, gpu_count: int, replicas: int) -> float:
    return price_per_gpu_hour * gpu_count * replicas * HOURS_PER_MONTH


# ---- the mesh ---------------------------------------------------------------------------------

def gateway_block(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """Addresses reserved at the start of the mesh for gateways (so more gateways never move workers)."""
    hosts = network.num_addresses - 2
    return 64 if hosts >= 4096 else 16 if hosts >= 256 else 4


def assign_addresses(cidr: str, gateways: list[str], workers: list[str]) -> dict[str, str]:
    """Deterministic, stable mesh addresses.

    Gateways take the first addresses of the CIDR (``gateway-0`` is network + 1, ...), inside a
    reserved block. Each worker's address is derived from a hash of its own name (sha256 ->
    an offset in the rest of the CIDR), with linear probing on a collision, workers resolved in
    the order given (declaration order of pools, then replica index). So an address depends on
    the node's name, not on its position: adding a pool or a replica never renumbers existing
    nodes (a per-pool block scheme would cap replicas per pool and still have to place the
    blocks; counting in order would shift every node after an insertion). The only way an
    existing node can move is when a new node declared *before* it hashes onto its exact
    address (about n / 65k per added node on a /16); workers behind NAT re-handshake anyway.
    """
    network = ipaddress.ip_network(cidr)
    first = int(network.network_address) + 1
    block = gateway_block(network)
    if len(gateways) > block:
        raise ValueError(f"mesh {cidr}: {len(gateways)} gateways exceed the {block} reserved gateway addresses")
    space = network.num_addresses - 2 - block
    if len(workers) > space:
        raise ValueError(f"mesh {cidr}: {len(workers)} workers do not fit in {space} addresses")
    out: dict[str, str] = {}
    for i, name in enumerate(gateways):
        out[name] = str(ipaddress.ip_address(first + i))
    taken: set[int] = set()
    for name in workers:
        offset = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % space
        while offset in taken:
            offset = (offset + 1) % space
        taken.add(offset)
        out[name] = str(ipaddress.ip_address(first + block + offset))
    return out


# ---- VRAM ---------------------------------------------------------------------------------------

def vram(spec: Spec) -> tuple[Vram, ...]:
    out = []
    for pool in spec.pools:
        prov = spec.provider(pool.provider)
        if not KINDS[prov.kind].leased:
            continue  # CPU processes or an upstream: no GPU memory to budget
        model = spec.model(pool.model)
        tokens = pool.max_model_len or model.context_length
        seqs = pool.max_concurrency
        if model.arch is not None:
            a = model.arch
            per_token = kv_bytes_per_token(a.layers, a.kv_heads, a.head_dim, a.kv_dtype_bytes)
            kv = per_token * tokens * seqs / GiB
        else:
            per_token, kv = None, 0.0
        gpu_vram = (spec.vram_gb(pool.gpu.type) or 0.0) * pool.gpu.count
        total = model.weights_gb + kv
        out.append(Vram(
            pool=pool.name, model=model.id, gpu_type=pool.gpu.type, gpu_count=pool.gpu.count,
            weights_gb=model.weights_gb, kv_bytes_per_token=per_token, tokens=tokens, sequences=seqs,
            kv_cache_gb=round(kv, 3), total_gb=round(total, 3), gpu_vram_gb=gpu_vram,
            fits=total <= gpu_vram, weights_only=model.arch is None,
        ))
    return tuple(out)


# ---- costs --------------------------------------------------------------------------------------

def costs(spec: Spec, extra_leases: dict[str, int] | None = None) -> Costs:
    """Monthly per pool and provider; COGS per 1M per pool; margin per tier.

    extra_leases: leases outside the pools' replicas (the canary), by pool name, billed like the pool.
    """
    overhead = spec.planning.overhead_per_1m_tokens
    rows: list[PoolCost] = []
    for pool in spec.pools:
        prov = spec.provider(pool.provider)
        if KINDS[prov.kind].upstream:
            cogs = (prov.price_per_1m_tokens + overhead) if prov.price_per_1m_tokens is not None else None
            rows.append(PoolCost(pool.name, prov.name, pool.model, pool.region, 0, None, "per-token",
                                 None, None, None, cogs))
            continue
        if pool.price_per_gpu_hour is not None:
            price, source = pool.price_per_gpu_hour, "pool"
        elif prov.price_cap_per_gpu_hour is not None:
            price, source = prov.price_cap_per_gpu_hour, "cap"
        else:
            price, source = None, None
        replicas = 0 if pool.role == "drained" else pool.replicas + (extra_leases or {}).get(pool.name, 0)
        gpus = pool.gpu.count * replicas
        monthly = monthly_cost(price, pool.gpu.count, replicas) if price is not None else None
        t = throughput(spec, pool.gpu.type, pool.model)
        cogs = cogs_per_1m(price, t.tokens_per_s, t.utilisation, overhead) if (t and price is not None) else None
        rows.append(PoolCost(pool.name, prov.name, pool.model, pool.region, gpus, price, source,
                             round(monthly, 2) if monthly is not None else None,
                             t.tokens_per_s if t else None, t.utilisation if t else None,
                             round(cogs, 4) if cogs is not None else None))
    per_provider: dict[str, float] = {}
    for r in rows:
        per_provider[r.provider] = per_provider.get(r.provider, 0.0) + (r.monthly or 0.0)
    total = round(sum(per_provider.values()), 2)

    # COGS per model: weighted by routing weight over the primary pools with a COGS figure.
    by_name = {p.name: p for p in spec.pools}
    model_cogs: dict[str, float | None] = {}
    for m in spec.models:
        cands = [(by_name[r.pool], r.cogs_per_1m) for r in rows if r.model == m.id and r.cogs_per_1m is not None]
        prim = [(p, c) for p, c in cands if p.role == "primary" and p.weight > 0
                and spec.provider(p.provider).role != "overflow"]
        use = prim or [(p, c) for p, c in cands if p.role != "drained"]
        wsum = sum(max(p.weight, 0.0) * max(p.replicas, 1) for p, _ in use)
        if not use:
            model_cogs[m.id] = None
        elif wsum <= 0:
            model_cogs[m.id] = sum(c for _, c in use) / len(use)
        else:
            model_cogs[m.id] = sum(p.weight * max(p.replicas, 1) * c for p, c in use) / wsum
    # Tier COGS: models weighted by forecast token volume (equal when there is no forecast).
    volume: dict[str, float] = {}
    for f in spec.forecast:
        volume[f.model] = volume.get(f.model, 0.0) + f.qps * (f.prompt_tokens + f.completion_tokens)
    tiers = []
    for tier in spec.tiers:
        known = [(m, model_cogs.get(m)) for m in tier.models]
        vals = [(m, c) for m, c in known if c is not None]
        if vals:
            weights = [volume.get(m, 0.0) for m, _ in vals]
            if sum(weights) <= 0:
                weights = [1.0] * len(vals)
            tier_cogs = sum(w * c for w, (_, c) in zip(weights, vals, strict=True)) / sum(weights)
            margin = tier.price_per_1m_tokens - tier_cogs
            pct = margin / tier.price_per_1m_tokens * 100 if tier.price_per_1m_tokens > 0 else None
            tiers.append(TierMargin(tier.name, tier.price_per_1m_tokens, round(tier_cogs, 4), round(margin, 4),
                                    round(pct, 1) if pct is not None else None,
                                    tuple((m, round(c, 4) if c is not None else None) for m, c in known)))
        else:
            tiers.append(TierMargin(tier.name, tier.price_per_1m_tokens, None, None, None, tuple(known)))
    models, fleet = loaded_costs(spec, rows)
    tiers = [_with_loaded(spec, tm, models) for tm in tiers]
    return Costs(pools=tuple(rows), providers=tuple(sorted((k, round(v, 2)) for k, v in per_provider.items())),
                 monthly_total=total, tiers=tuple(tiers), overhead_per_1m=overhead, models=models, fleet=fleet)


def _overflow_share(spec: Spec, model: str) -> float:
    """The share of a model's forecast tokens the plan sends to its overflow upstream: the declared
    planning.overflow_share_pct, or what its pools cannot carry at the forecast, whichever is more."""
    declared = spec.planning.overflow_share_pct / 100
    short = demand = 0.0
    for c in capacity(spec):
        if c.model != model:
            continue
        demand += c.demand_tokens_per_s
        if c.tokens_per_s is not None and c.efficiency is not None:
            short += max(0.0, c.demand_tokens_per_s - c.declared_equivalent * c.tokens_per_s * c.efficiency)
    return max(declared, short / demand if demand > 0 else 0.0)


def loaded_costs(spec: Spec, rows: list[PoolCost]) -> tuple[tuple[ModelCost, ...], FleetCost]:
    """The fleet's whole monthly cost per model (every lease, the overflow upstream for its share of
    the tokens, the gateway fleet and the declared overhead) and per 1M forecast tokens.

    The gateway fleet is shared by tokens. A model without a forecast has leases but no volume: its
    cost per 1M is None (nothing to divide by), and its leases count in the fleet's total only."""
    hours = HOURS_PER_MONTH * 3600
    tokens = {m.id: 0.0 for m in spec.models}
    for f in spec.forecast:
        tokens[f.model] += f.qps * (f.prompt_tokens + f.completion_tokens) * hours
    all_tokens = sum(tokens.values())
    by_pool = {p.name: p for p in spec.pools}
    out = []
    for m in spec.models:
        leases = sum(r.monthly or 0.0 for r in rows if r.model == m.id)
        per_token = [(by_pool[r.pool], spec.provider(r.provider).price_per_1m_tokens) for r in rows
                     if r.model == m.id and r.price_source == "per-token" and by_pool[r.pool].role != "drained"]
        ups = [(p, x) for p, x in per_token if x is not None]
        share = _overflow_share(spec, m.id) if ups else 0.0
        wsum = sum(max(p.weight, 0.0) for p, _ in ups)
        price = (sum(max(p.weight, 0.0) * x for p, x in ups) / wsum if wsum > 0
                 else sum(x for _, x in ups) / len(ups)) if ups else 0.0
        overflow = tokens[m.id] * share * price / 1e6
        gateway = spec.gateway.monthly_cost_usd * tokens[m.id] / all_tokens if all_tokens > 0 else 0.0
        overhead = spec.planning.overhead_per_1m_tokens * tokens[m.id] / 1e6
        monthly = leases + overflow + gateway + overhead
        per_1m = monthly / (tokens[m.id] / 1e6) if tokens[m.id] > 0 else None
        out.append(ModelCost(m.id, round(tokens[m.id]), round(leases, 2), round(share, 6), round(overflow, 2),
                             round(gateway, 2), round(overhead, 2), round(monthly, 2),
                             round(per_1m, 4) if per_1m is not None else None))
    gateway_total = spec.gateway.monthly_cost_usd
    leases = sum(r.monthly or 0.0 for r in rows)
    overflow = sum(c.overflow for c in out)
    overhead = spec.planning.overhead_per_1m_tokens * all_tokens / 1e6
    monthly = leases + overflow + gateway_total + overhead
    fleet = FleetCost(round(leases, 2), round(overflow, 2), round(gateway_total, 2), round(overhead, 2),
                      round(monthly, 2), round(all_tokens),
                      round(monthly / (all_tokens / 1e6), 4) if all_tokens > 0 else None)
    return tuple(out), fleet


def _with_loaded(spec: Spec, tm: TierMargin, models: tuple[ModelCost, ...]) -> TierMargin:
    """A tier's fully loaded cost: its models' monthly cost over their forecast tokens."""
    t = spec.tier(tm.tier)
    mine = [(c.cost_per_1m, c.tokens_per_month) for c in models if c.model in t.models and c.cost_per_1m is not None]
    tokens = sum(n for _, n in mine)
    if not mine or tokens <= 0:
        return tm
    cost = sum(x * n for x, n in mine) / tokens
    margin = t.price_per_1m_tokens - cost
    pct = margin / t.price_per_1m_tokens * 100 if t.price_per_1m_tokens > 0 else None
    from dataclasses import replace
    return replace(tm, loaded_cost_per_1m=round(cost, 4), loaded_margin_per_1m=round(margin, 4),
                   loaded_margin_pct=round(pct, 1) if pct is not None else None,
                   min_price_per_1m=round(cost * (1 + (spec.planning.min_margin_pct or 0.0) / 100), 4))


# ---- the plan -----------------------------------------------------------------------------------

def is_local_only(spec: Spec) -> bool:
    """All supply runs on this machine (sim / llamacpp): no leases, no public ingress."""
    return all(p.kind in LOCAL_KINDS for p in spec.providers)


def build_plan(spec: Spec) -> Plan:
    eff = effective_spec(spec)
    declared = {p.name: p for p in spec.pools}

    # Leases: every replica of every non-drained pool on a leasing provider, plus the canary.
    leases_raw: list[tuple[Pool, int, str | None, bool]] = []   # pool, replica, image override, failover
    for pool in eff.pools:
        prov = eff.provider(pool.provider)
        if prov.kind not in LEASED_KINDS or pool.role == "drained":
            continue
        base = declared.get(pool.name)
        base_replicas = base.replicas if base is not None and base.provider == pool.provider else 0
        for i in range(pool.replicas):
            leases_raw.append((pool, i, None, i >= base_replicas))
    canary_leases: dict[str, int] | None = None     # the canary's lease, billed like its base pool
    if eff.canary is not None:
        base = eff.pool(eff.canary.pool)
        if eff.provider(base.provider).kind in LEASED_KINDS and base.role != "drained":
            leases_raw.append((base.model_copy(update={"name": f"{base.name}-canary"}), 0, eff.canary.image, False))
            canary_leases = {eff.canary.pool: 1}

    gateways = [f"gateway-{i}" for i in range(eff.gateway.identities)]     # one per pod the fleet can scale to
    worker_names = [f"{p.name}-{i}" for p, i, _, _ in leases_raw]
    try:
        addresses = assign_addresses(eff.mesh.cidr, gateways, worker_names)
    except ValueError as e:
        from fleet.spec import SpecError
        raise SpecError(str(e)) from None

    leases = tuple(
        Lease(
            name=f"{p.name}-{i}", pool=p.name, model=p.model, provider=p.provider,
            provider_kind=eff.provider(p.provider).kind, region=p.region, gpu_type=p.gpu.type,
            gpu_count=p.gpu.count, price_cap=eff.provider(p.provider).price_cap_per_gpu_hour,
            image=image or p.image, connection=p.connection, mesh_address=addresses[f"{p.name}-{i}"],
            replica=i, role="canary" if image else p.role, price_per_gpu_hour=p.price_per_gpu_hour,
            failover=fo,
        )
        for p, i, image, fo in leases_raw
    )
    mesh = tuple(
        [MeshNode(g, "gateway", addresses[g], None, tuple(worker_names)) for g in gateways]
        + [MeshNode(w.name, "worker", w.mesh_address, w.pool, tuple(gateways)) for w in leases]
    )

    ports = local_endpoints(eff, eff)     # eff is already effective: no pool of it is drained twice
    next_port = max(ports.values(), default=eff.local_port_base - 1) + 1

    def endpoint(pool: Pool, i: int) -> str:
        kind = eff.provider(pool.provider).kind
        if kind in LOCAL_KINDS:
            port = ports.get((pool.name, i), next_port)
            return f"http://127.0.0.1:{port}"
        node = addresses.get(f"{pool.name}-{i}")
        if node is None:  # a drained pool's replica: no worker, no address
            return ""
        return f"http://{node}:{WORKER_PORT}"

    routing = routing_config(eff, endpoint)
    for m in routing["models"]:
        for p in m["pools"]:
            if p["role"] == "drained":
                p["endpoints"] = []

    pools = []
    for p in eff.pools:
        prov = eff.provider(p.provider)
        d = declared.get(p.name)
        declared_replicas = d.replicas if d is not None else 0
        pools.append(PoolPlan(
            name=p.name, model=p.model, provider=p.provider, provider_kind=prov.kind, region=p.region,
            role=p.role, declared_role=d.role if d is not None else p.role,
            weight=0.0 if p.role == "drained" else p.weight,
            gpu_type=p.gpu.type, gpu_count=p.gpu.count, replicas=p.replicas,
            declared_replicas=declared_replicas,
            failover_replicas=max(p.replicas - declared_replicas, 0),
            leased=prov.kind in LEASED_KINDS, added_by_failover=d is None,
        ))
    drained = tuple(sorted(drained_providers(spec)))
    providers = tuple({
        "name": p.name, "kind": p.kind, "role": p.role, "regions": list(p.regions),
        "price_cap_per_gpu_hour": p.price_cap_per_gpu_hour, "drained": p.name in drained,
        **({"base_url": p.base_url, "price_per_1m_tokens": p.price_per_1m_tokens} if KINDS[p.kind].upstream else {}),
    } for p in eff.providers)
    return Plan(
        stack=spec.stack, leases=leases, mesh=mesh, routing=routing,
        capacity=capacity(eff), vram=vram(eff),
        costs=costs(eff, canary_leases),
        pools=tuple(pools), providers=providers, drained=drained, effective=eff,
    )


# ---- what a stack change does --------------------------------------------------------------------

def _routing_pools(plan: Plan) -> dict[tuple[str, str], dict]:
    return {(m["id"], p["name"]): p for m in plan.routing.get("models", []) for p in m.get("pools", [])}


def diff(old: Plan, new: Plan) -> dict[str, Any]:
    """What going from ``old`` to ``new`` changes: leases, routing (roles, weights, endpoints),
    mesh nodes, capacity verdicts and the monthly cost. Empty lists mean no change."""
    a = {x.name: x for x in old.leases}
    b = {x.name: x for x in new.leases}
    changed = []
    for name in sorted(set(a) & set(b)):
        fa, fb = asdict(a[name]), asdict(b[name])
        fields = {k: [fa[k], fb[k]] for k in fa if fa[k] != fb[k]}
        if fields:
            changed.append({"name": name, "changes": fields})
    ra, rb = _routing_pools(old), _routing_pools(new)
    routing = []
    for key in sorted(set(ra) | set(rb)):
        pa, pb = ra.get(key), rb.get(key)
        if pa is None or pb is None:
            p = rb[key] if pa is None else ra[key]
            routing.append({"model": key[0], "pool": key[1], "change": "added" if pa is None else "removed",
                            "role": p["role"], "weight": p["weight"], "endpoints": len(p["endpoints"])})
            continue
        fields = {}
        for k in ("role", "weight"):
            if pa[k] != pb[k]:
                fields[k] = [pa[k], pb[k]]
        if len(pa["endpoints"]) != len(pb["endpoints"]):
            fields["endpoints"] = [len(pa["endpoints"]), len(pb["endpoints"])]
        if fields:
            routing.append({"model": key[0], "pool": key[1], "change": "changed", **fields})
    ma = {n.name: n.address for n in old.mesh}
    mb = {n.name: n.address for n in new.mesh}
    mesh = {
        "added": sorted(set(mb) - set(ma)),
        "removed": sorted(set(ma) - set(mb)),
        "readdressed": sorted(n for n in set(ma) & set(mb) if ma[n] != mb[n]),
    }
    ca = {(c.model, c.region): c for c in old.capacity}
    cb = {(c.model, c.region): c for c in new.capacity}
    capacity_changes = []
    for key in sorted(set(ca) | set(cb)):
        x, y = ca.get(key), cb.get(key)
        pick = lambda c: None if c is None else {  # noqa: E731
            "required_gpus": c.required_gpus, "declared_gpus": c.declared_gpus, "ok": c.ok, "n_plus_1": c.n_plus_1}
        if pick(x) != pick(y):
            capacity_changes.append({"model": key[0], "region": key[1], "before": pick(x), "after": pick(y)})
    pa_cost, pb_cost = dict(old.costs.providers), dict(new.costs.providers)
    providers = {k: round(pb_cost.get(k, 0.0) - pa_cost.get(k, 0.0), 2)
                 for k in sorted(set(pa_cost) | set(pb_cost)) if pb_cost.get(k, 0.0) != pa_cost.get(k, 0.0)}
    return {
        "leases": {"added": [asdict(b[n]) for n in sorted(set(b) - set(a))],
                   "removed": [asdict(a[n]) for n in sorted(set(a) - set(b))],
                   "changed": changed},
        "routing": routing,
        "mesh": mesh,
        "capacity": capacity_changes,
        "cost": {"monthly_before": old.costs.monthly_total, "monthly_after": new.costs.monthly_total,
                 "monthly_delta": round(new.costs.monthly_total - old.costs.monthly_total, 2),
                 "providers": providers},
    }
