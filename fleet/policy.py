"""The policy rules: pure functions over the spec and its plan, each returning violations.

The same rules run in two places: `infermesh check --stack S` (infermesh_cli/commands/check.py) and
the Pulumi CrossGuard pack in policies/ (stack validation calls :func:`check`; resource
validations call the per-resource helpers at the bottom of this module). A violation names
the rule, the resource, what is wrong and how to fix it::

    multi-provider model/qwen2.5-7b-instruct: paid tiers (pro) serve it from one provider only: vast (fix: ...)

Local-only stacks (every provider `sim` or `llamacpp`: the whole service on one machine) are
exempt from the rules about *supply redundancy* (multi-provider, reserved-fallback) and from
ingress-tls: their "providers" are processes on one machine, so provider diversity protects
nothing, and nothing listens beyond loopback.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from fleet.kinds import LEASED_KINDS, LOCAL_KINDS, is_upstream
from fleet.plan import Plan, build_plan, is_local_only
from fleet.spec import Spec

DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")
RESERVED_TIERS = ("pro", "business")


@dataclass(frozen=True)
class Violation:
    rule: str
    resource: str
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.rule} {self.resource}: {self.message} (fix: {self.fix})"

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "resource": self.resource, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    check: Callable[[Spec, Plan], list[Violation]]


def _active(spec: Spec, pool) -> bool:
    """A pool that serves traffic: not drained, has replicas (upstreams always have one endpoint)."""
    prov = spec.provider(pool.provider)
    return pool.role != "drained" and (pool.replicas > 0 or is_upstream(prov.kind))


# ---- the rules ------------------------------------------------------------------------------------

def multi_provider(spec: Spec, plan: Plan) -> list[Violation]:
    """Every model of a paid tier is served by pools on two or more providers (overflow upstreams don't count)."""
    if is_local_only(spec):
        return []
    eff = plan.effective or spec
    out = []
    paid: dict[str, list[str]] = {}
    for t in spec.tiers:
        if t.paid:
            for m in t.models:
                paid.setdefault(m, []).append(t.name)
    for model, tiers in paid.items():
        providers = sorted({p.provider for p in eff.pools if p.model == model and _active(eff, p)
                            and eff.provider(p.provider).role != "overflow"})
        if len(providers) < 2:
            out.append(Violation(
                "multi-provider", f"model/{model}",
                f"paid tiers ({', '.join(tiers)}) need it on 2+ providers; served by "
                f"{', '.join(providers) if providers else 'none'}",
                "add a pool for this model on another provider"))
    return out


def capacity_n_plus_1(spec: Spec, plan: Plan) -> list[Violation]:
    """Where a forecast exists, the declared pools carry it with headroom, even after losing the largest provider."""
    out = []
    for c in plan.capacity:
        res = f"capacity/{c.model}@{c.region}"
        if c.required_gpus is None:
            out.append(Violation("capacity-n-plus-1", res, "no throughput figure to size this model",
                                 f"add a `throughput` entry for {c.model} on the GPU type its pools use"))
            continue
        if not c.ok:
            out.append(Violation(
                "capacity-n-plus-1", res,
                f"declared {c.declared_equivalent:g} GPUs < required {c.required_gpus} "
                f"({c.qps:g} QPS x {c.tokens_per_request} tokens / ({c.tokens_per_s:g} x {c.efficiency:g}) "
                f"x headroom {c.headroom:g})",
                f"raise replicas of {c.model} pools in {c.region}"))
        elif not c.n_plus_1:
            out.append(Violation(
                "capacity-n-plus-1", res,
                f"losing {c.largest_provider} leaves {c.after_loss:g} GPUs < required {c.required_gpus}",
                f"add replicas of {c.model} in {c.region} on providers other than {c.largest_provider}"))
    return out


def reserved_fallback(spec: Spec, plan: Plan) -> list[Violation]:
    """Pro and business tiers (and any tier with a monthly fee) have a reserved provider serving their models
    (or, where the tier allows fallback, the model's fallback)."""
    if is_local_only(spec):
        return []
    eff = plan.effective or spec
    reserved = {p.name for p in eff.providers if p.role == "reserved" and not p.drained}

    def on_reserved(model: str) -> bool:
        return any(p.model == model and p.provider in reserved and _active(eff, p) for p in eff.pools)

    out = []
    for t in spec.tiers:
        if t.name not in RESERVED_TIERS and t.monthly_fee <= 0:
            continue
        for m in t.models:
            fb = eff.model(m).fallback
            if on_reserved(m) or (t.allow_fallback and fb is not None and on_reserved(fb)):
                continue
            out.append(Violation(
                "reserved-fallback", f"tier/{t.name}",
                f"model {m} has no pool on a reserved provider"
                + (f" ({', '.join(sorted(reserved))})" if reserved else " (none declared)"),
                f"add a pool for {m} on a provider with role: reserved"))
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def workers_mesh_only(spec: Spec, plan: Plan) -> list[Violation]:
    """No worker port is reachable outside the mesh: the mesh is private address space and every worker
    endpoint the gateway uses is a mesh address (or loopback on this machine)."""
    out = []
    network = ipaddress.ip_network(spec.mesh.cidr)
    if not network.is_private:
        out.append(Violation("workers-mesh-only", "mesh", f"mesh CIDR {spec.mesh.cidr} is public address space",
                             "use a private range such as 10.90.0.0/16"))
    upstreams = {p.name for p in spec.providers if is_upstream(p.kind)}
    for m in plan.routing.get("models", []):
        for pool in m.get("pools", []):
            if pool.get("provider") in upstreams:
                continue
            for ep in pool.get("endpoints", []):
                url = ep.get("url") or ""
                if not url:
                    continue
                host = urlparse(url).hostname or ""
                try:
                    in_mesh = ipaddress.ip_address(host) in network
                except ValueError:
                    in_mesh = False
                if not (in_mesh or _is_loopback(host)):
                    out.append(Violation(
                        "workers-mesh-only", f"endpoint/{ep.get('id', pool.get('name'))}",
                        f"worker endpoint {url} is outside the mesh {spec.mesh.cidr}",
                        "route workers over their mesh address; never publish a worker port"))
    for lease in plan.leases:
        if ipaddress.ip_address(lease.mesh_address) not in network:
            out.append(Violation("workers-mesh-only", f"lease/{lease.name}",
                                 f"mesh address {lease.mesh_address} is outside {spec.mesh.cidr}",
                                 "re-plan: addresses come from the mesh CIDR"))
    return out


def image_digest(spec: Spec, plan: Plan) -> list[Violation]:
    """Worker images are pinned by digest (`...@sha256:<64 hex>`) outside local (sim / llamacpp) providers."""
    out = []
    eff = plan.effective or spec
    for pool in eff.pools:
        kind = eff.provider(pool.provider).kind
        if kind in LOCAL_KINDS or is_upstream(kind) or pool.role == "drained":
            continue
        if not pool.image or not DIGEST_RE.search(pool.image):
            out.append(Violation("image-digest", f"pool/{pool.name}",
                                 f"image {pool.image or '(none)'} is not pinned by digest",
                                 "use <registry>/<repo>@sha256:<digest> (the Images component's output)"))
    if spec.canary is not None and spec.provider(spec.pool(spec.canary.pool).provider).kind in LEASED_KINDS:
        if not DIGEST_RE.search(spec.canary.image):
            out.append(Violation("image-digest", "canary", f"canary image {spec.canary.image} is not pinned by digest",
                                 "use <registry>/<repo>@sha256:<digest>"))
    return out


def prompt_logging_off(spec: Spec, plan: Plan) -> list[Violation]:
    """Prompts and completions are not logged by default (tenants may opt in, with a TTL)."""
    if spec.gateway.privacy.log_prompts:
        return [Violation("prompt-logging-off", "gateway", "privacy.log_prompts is on for every tenant",
                          "set gateway.privacy.log_prompts: false; tenants opt in one by one")]
    return []


def ingress_tls(spec: Spec, plan: Plan) -> list[Violation]:
    """The public ingress has TLS (a cert-manager issuer), unless the stack is local-only."""
    if is_local_only(spec) or spec.gateway.tls_issuer:
        return []
    return [Violation("ingress-tls", "gateway", f"ingress {spec.gateway.host} has no TLS issuer",
                      "set gateway.tls_issuer to a cert-manager ClusterIssuer")]


def vram_fits(spec: Spec, plan: Plan) -> list[Violation]:
    """Each pool's weights plus KV cache at its concurrency and sequence length fit its GPUs."""
    out = []
    for v in plan.vram:
        if not v.fits:
            out.append(Violation(
                "vram-fits", f"pool/{v.pool}",
                f"{v.model} needs {v.total_gb:g} GiB (weights {v.weights_gb:g} + KV {v.kv_cache_gb:g} for "
                f"{v.sequences} x {v.tokens} tokens) > {v.gpu_count} x {v.gpu_type} = {v.gpu_vram_gb:g} GiB",
                "lower max_concurrency or max_model_len, or use a bigger GPU / more GPUs"))
        elif v.weights_only:
            out.append(Violation(
                "vram-fits", f"pool/{v.pool}", f"model {v.model} declares no arch: the KV cache cannot be counted",
                "add arch (layers, kv_heads, head_dim, kv_dtype_bytes) to the model"))
    return out


def price_under_cap(spec: Spec, plan: Plan) -> list[Violation]:
    """Every lease has a price cap, and the expected price is under it."""
    out = []
    seen: set[str] = set()
    for lease in plan.leases:
        if lease.price_cap is None:
            if lease.provider not in seen:
                seen.add(lease.provider)
                out.append(Violation("price-under-cap", f"provider/{lease.provider}",
                                     "leases GPUs without price_cap_per_gpu_hour (unbounded spend)",
                                     "set price_cap_per_gpu_hour on the provider"))
        elif lease.price_per_gpu_hour is not None and lease.price_per_gpu_hour > lease.price_cap:
            if lease.pool not in seen:
                seen.add(lease.pool)
                out.append(Violation("price-under-cap", f"pool/{lease.pool}",
                                     f"price {lease.price_per_gpu_hour:g}/GPU-hour is above the cap "
                                     f"{lease.price_cap:g} of {lease.provider}",
                                     "lower the pool's price_per_gpu_hour or raise the provider's cap"))
    return out


def slo_order(spec: Spec, plan: Plan) -> list[Violation]:
    """A higher tier (higher priority) promises a tighter-or-equal TTFT p95 and a higher-or-equal availability."""
    out = []
    tiers = sorted(spec.tiers, key=lambda t: t.priority)
    for lo in tiers:
        for hi in tiers:
            if hi.priority <= lo.priority:
                continue
            if hi.slo.ttft_p95_ms > lo.slo.ttft_p95_ms:
                out.append(Violation("slo-order", f"tier/{hi.name}",
                                     f"ttft_p95_ms {hi.slo.ttft_p95_ms:g} is looser than lower tier "
                                     f"{lo.name}'s {lo.slo.ttft_p95_ms:g}",
                                     f"set {hi.name}'s slo.ttft_p95_ms <= {lo.slo.ttft_p95_ms:g}"))
            if hi.slo.availability < lo.slo.availability:
                out.append(Violation("slo-order", f"tier/{hi.name}",
                                     f"availability {hi.slo.availability:g}% is below lower tier "
                                     f"{lo.name}'s {lo.slo.availability:g}%",
                                     f"set {hi.name}'s slo.availability >= {lo.slo.availability:g}"))
    return out


def tier_margin(spec: Spec, plan: Plan) -> list[Violation]:
    """A paid tier is priced at or above its fully loaded cost per 1M tokens x (1 + planning.min_margin_pct / 100)."""
    if is_local_only(spec) or spec.planning.min_margin_pct is None:
        return []
    out = []
    pct = spec.planning.min_margin_pct
    tiers = plan.costs.tiers
    if plan.drained:     # a failover is transient and never blocked: prices are judged on the declared fleet
        undrained = [p.model_copy(update={"drained": False}) for p in spec.providers]
        steady = spec.model_copy(update={"providers": undrained})
        tiers = build_plan(steady).costs.tiers
    for tm in tiers:
        t = spec.tier(tm.tier)
        if not t.paid or tm.loaded_cost_per_1m is None or tm.min_price_per_1m is None:
            continue
        if t.price_per_1m_tokens + 1e-9 < tm.min_price_per_1m:
            out.append(Violation(
                "tier-margin", f"tier/{t.name}",
                f"price ${t.price_per_1m_tokens:g} per 1M tokens is below its fully loaded cost "
                f"${tm.loaded_cost_per_1m:.4f} x {1 + pct / 100:g} (min margin {pct:g}%) = ${tm.min_price_per_1m:.4f}",
                f"raise {t.name}'s price_per_1m_tokens to at least {tm.min_price_per_1m:.4f}, or cut the fleet's "
                f"cost (leases, standby, gateway) per forecast token"))
    return out


RULES: tuple[Rule, ...] = tuple(
    Rule(rid, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else rid, fn) for rid, fn in [
        ("multi-provider", multi_provider),
        ("capacity-n-plus-1", capacity_n_plus_1),
        ("reserved-fallback", reserved_fallback),
        ("workers-mesh-only", workers_mesh_only),
        ("image-digest", image_digest),
        ("prompt-logging-off", prompt_logging_off),
        ("ingress-tls", ingress_tls),
        ("vram-fits", vram_fits),
        ("price-under-cap", price_under_cap),
        ("slo-order", slo_order),
        ("tier-margin", tier_margin),
    ]
)


def rule(rule_id: str) -> Rule:
    return next(r for r in RULES if r.id == rule_id)


def check(spec: Spec, plan: Plan | None = None, rules: Iterable[str] | None = None) -> list[Violation]:
    """All violations of the stack, rule by rule, in RULES order."""
    plan = plan if plan is not None else build_plan(spec)
    wanted = set(rules) if rules is not None else None
    out: list[Violation] = []
    for r in RULES:
        if wanted is None or r.id in wanted:
            out.extend(r.check(spec, plan))
    return out


# ---- per-resource rules (the CrossGuard pack's resource validations) -------------------------------
# They judge what the Pulumi program actually registers, with the same rule ids and wording.

def _get(props: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if n in props and props[n] is not None:
            return props[n]
    return None


def worker_service_exposed(resource_type: str, props: Mapping[str, Any], name: str = "") -> list[Violation]:
    """A Kubernetes Service in front of workers must not be LoadBalancer / NodePort / have external IPs."""
    if not resource_type.startswith("kubernetes:core/v1:Service"):
        return []
    meta = props.get("metadata") or {}
    labels = meta.get("labels") or {}
    svc_name = meta.get("name") or name
    is_worker = (labels.get("app.kubernetes.io/component") == "worker" or labels.get("infermesh/role") == "worker"
                 or "worker" in str(svc_name))
    spec = props.get("spec") or {}
    public = spec.get("type") in ("LoadBalancer", "NodePort") or bool(spec.get("externalIPs"))
    if is_worker and public:
        return [Violation("workers-mesh-only", f"service/{svc_name}",
                          f"worker Service is {spec.get('type') or 'exposed via externalIPs'}",
                          "workers are reached over the mesh only: use ClusterIP or no Service")]
    return []


def ingress_without_tls(resource_type: str, props: Mapping[str, Any], name: str = "") -> list[Violation]:
    if not resource_type.startswith("kubernetes:networking.k8s.io/v1:Ingress"):
        return []
    spec = props.get("spec") or {}
    if not spec.get("tls"):
        meta = props.get("metadata") or {}
        return [Violation("ingress-tls", f"ingress/{meta.get('name') or name}", "Ingress has no tls section",
                          "set gateway.tls_issuer; the GatewayFleet adds tls + the cert-manager annotation")]
    return []


def lease_resource(resource_type: str, props: Mapping[str, Any], name: str = "") -> list[Violation]:
    """A GPU lease resource (the GpuLease dynamic resource or component): digest-pinned image, price under cap.

    Recognised by its properties (a dynamic resource's type is generic): it has a price cap and a GPU type."""
    cap = _get(props, "price_cap", "priceCap", "price_cap_per_gpu_hour")
    gpu = _get(props, "gpu_type", "gpuType")
    if gpu is None or ("GpuLease" not in resource_type and cap is None and "lease" not in resource_type.lower()):
        return []
    kind = _get(props, "provider_kind", "providerKind", "kind")
    res = f"lease/{_get(props, 'name', 'lease_name', 'label') or name}"
    out = []
    if kind not in LOCAL_KINDS:
        image = _get(props, "image")
        if not image or not DIGEST_RE.search(str(image)):
            out.append(Violation("image-digest", res, f"image {image or '(none)'} is not pinned by digest",
                                 "use <registry>/<repo>@sha256:<digest>"))
    price = _get(props, "price_per_gpu_hour", "pricePerGpuHour", "price", "dph_total", "hourly_price")
    if cap is None:
        out.append(Violation("price-under-cap", res, "lease has no price cap", "set price_cap_per_gpu_hour"))
    elif isinstance(price, (int, float)) and isinstance(cap, (int, float)) and price > cap:
        out.append(Violation("price-under-cap", res, f"price {price:g}/GPU-hour is above the cap {cap:g}",
                             "lower the pool's price or raise the provider's cap"))
    return out


RESOURCE_RULES: tuple[Callable[..., list[Violation]], ...] = (
    worker_service_exposed, ingress_without_tls, lease_resource,
)


def check_resource(resource_type: str, props: Mapping[str, Any], name: str = "") -> list[Violation]:
    out: list[Violation] = []
    for fn in RESOURCE_RULES:
        out.extend(fn(resource_type, props, name))
    return out
