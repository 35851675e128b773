"""The declared service: stacks/Pulumi.<stack>.yaml parsed into typed, validated objects.

A stack file is ordinary Pulumi structured config. Everything infermesh reads lives under
the project's namespace (``infermesh:<key>``)::

    config:
      infermesh:regions: [...]
      infermesh:providers: [...]
      infermesh:vastai-api-key:
        secure: v1:...          # a Pulumi secret, referenced by a provider's `credentials`

``load(stack)`` returns a :class:`Spec` or raises :class:`SpecError` with one message that
names the field and the reason. Nothing here talks to a network or a cloud: the spec is data.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fleet import project
from fleet.kinds import is_upstream

NAMESPACE = "infermesh"
ROOT = project.INSTALL_ROOT        # the code's own checkout; the operator's project: fleet.project.root()

Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9._/-]*[a-z0-9])?$", max_length=120)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
# Prices, fees and costs: a number written as a number (not a quoted string, not true/false), finite and
# never negative; anything else is refused naming the field (docs/money.md).
Money = Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)]


def _openssh_public_key(text: str) -> str:
    """One OpenSSH public key line (``ssh-ed25519 AAAA... comment``), as ~/.ssh/id_*.pub holds it."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    line = text.strip()
    if "\n" in line or "PRIVATE KEY" in line:
        raise ValueError("one OpenSSH public key per entry (the .pub file's line), never a private key")
    try:
        load_ssh_public_key(line.encode())
    except Exception:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm: either way not a key we can use
        shown = repr(line[:40]) + ("..." if len(line) > 40 else "")
        raise ValueError(f"not an OpenSSH public key: {shown} (give the line of a .pub file, e.g. "
                         "`ssh-ed25519 AAAAC3Nza... you@host`)") from None
    return line


# An operator's SSH public key (spec field ``ssh_public_keys``).
SshPublicKey = Annotated[str, AfterValidator(_openssh_public_key)]

# GPU types the plan knows, with their memory in GiB. A stack may add its own under `gpus`.
GPU_VRAM_GB: dict[str, float] = {
    "H200": 141, "H100": 80, "A100-80G": 80, "A100-40G": 40, "L40S": 48, "A6000": 48,
    "L4": 24, "A10": 24, "RTX4090": 24, "RTX3090": 24, "cpu": 0,
}


class SpecError(Exception):
    """A stack file that cannot be used. ``str()`` is the one message shown to the operator."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Region(_Strict):
    name: Name
    location: str = ""
    # where this region's requests go while it has no healthy capacity for their model (gateway/router.py)
    backup: Name | None = None


class Provider(_Strict):
    """Supply behind the gateway: a GPU marketplace, a reserved cloud, or an OpenAI-compatible upstream.

    kind: the adapter. `sim` and `llamacpp` run workers as local processes (no cloud);
    `vastai`, `runpod`, `akash` lease GPUs; `openai` is an external OpenAI-compatible upstream
    used for overflow (no lease, billed per token).
    role: `marketplace` (ordinary supply), `reserved` (the centralized fallback the
    paid tiers rely on), `overflow` (an external upstream used only when pools are short).
    """

    name: Name
    kind: Literal["sim", "llamacpp", "vastai", "runpod", "akash", "openai"]
    role: Literal["marketplace", "reserved", "overflow"] = "marketplace"
    regions: list[Name] = Field(min_length=1)
    price_cap_per_gpu_hour: Money | None = None
    # Name of the stack-config secret holding the API key (`infermesh:<credentials>`).
    credentials: str | None = None
    # Name of the stack-config secret with private-registry access for the worker image here
    # (Vast: `image_login` text "-u USER -p TOKEN HOST"; RunPod: a registry credential id).
    registry_credentials: str | None = None
    # Only for kind `openai`: the upstream's base URL and its price per 1M tokens.
    base_url: str | None = None
    price_per_1m_tokens: Money | None = None
    # Only for kind `openai`: the upstream's own limits per key (GonkaGate: 50 concurrent, 600 a minute),
    # which the gateway never exceeds, across replicas (gateway/state/upstream_limits.py)
    max_concurrency: PosInt | None = None
    rpm: PosInt | None = None
    # Declarative failover (`infermesh failover drain`): the provider is out of service; the plan
    # drains its pools (no leases, weight 0) and adds replacement capacity on the others.
    drained: bool = False

    @model_validator(mode="after")
    def _kind_fields(self) -> Provider:
        if is_upstream(self.kind) and not self.base_url:
            raise ValueError("an `openai` provider needs base_url")
        if self.kind in ("vastai", "runpod", "akash", "openai") and not self.credentials:
            raise ValueError(f"a `{self.kind}` provider needs credentials (the name of a stack secret)")
        return self


class ModelArch(_Strict):
    """What the VRAM check needs: KV cache bytes per token = layers x kv_heads x 2 x head_dim x dtype_bytes."""

    layers: PosInt
    kv_heads: PosInt
    head_dim: PosInt
    kv_dtype_bytes: PosInt = 2


class Model(_Strict):
    id: Name                                   # the name customers send as `model`
    # chat: chat, completions and responses; embedding: /v1/embeddings only (vLLM `--runner pooling`)
    kind: Literal["chat", "embedding"] = "chat"
    weights: str                               # e.g. "Qwen/Qwen2.5-7B-Instruct" or a GGUF path
    revision: str = "main"
    sha256: str | None = None                  # checksum of the weights the worker verifies
    quantization: str | None = None
    context_length: PosInt = 8192
    weights_gb: NonNegFloat = 0                # VRAM taken by the weights
    arch: ModelArch | None = None
    fallback: Name | None = None               # model that serves tiers allowing fallback


class SimKnobs(_Strict):
    """Knobs of the `sim` engine (a simulator, not a model)."""

    ttft_ms: NonNegFloat = 30
    itl_ms: NonNegFloat = 5                    # inter-token latency
    output_tokens: PosInt = 16
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0
    seed: int | None = None
    embedding_dim: Annotated[int, Field(ge=1, le=8192)] = 64     # vector size when the model is an embedding one


class Gpu(_Strict):
    type: str
    count: PosInt = 1


class Pool(_Strict):
    """Replicas of one model on one provider in one region."""

    name: Name
    model: Name
    provider: Name
    region: Name
    gpu: Gpu = Gpu(type="cpu")
    replicas: NonNegInt = 1
    weight: NonNegFloat = 1
    role: Literal["primary", "standby", "canary", "drained"] = "primary"
    image: str | None = None                   # worker image, pinned by digest outside local stacks
    max_concurrency: PosInt = 64               # concurrent sequences per replica (vLLM max_num_seqs)
    max_model_len: PosInt | None = None        # tokens per sequence for the KV budget (model context by default)
    price_per_gpu_hour: Money | None = None
    connection: Literal["container", "ssh"] = "container"
    surge: PosInt = 1                          # leases of this pool replaced at a time (docs/leases.md)
    sim: SimKnobs | None = None                # only for sim providers
    gguf: str | None = None                    # only for llamacpp providers
    upstream_model: str | None = None          # only for openai-kind providers: the model's id there


class Timeouts(_Strict):
    connect_s: PosFloat = 2.0
    ttft_s: PosFloat = 10.0
    idle_s: PosFloat = 30.0                    # longest gap between two stream chunks
    total_s: PosFloat = 300.0


class Slo(_Strict):
    """A tier's targets, as gateway/sla.py defines and measures them."""

    availability: Annotated[float, Field(gt=0, lt=100)] = 99.5   # percent of the period's minutes that are good
    ttft_p95_ms: PosFloat = 2000               # streams' p95 time to first content event (latency credit, per hour)
    ttlt_p95_ms: PosFloat = 30000              # p95 time to last token, normalised to ttlt_tokens
    ttlt_tokens: PosInt = 256                  # the token budget TTLT is stated at
    max_5xx_pct: Annotated[float, Field(ge=0, le=100)] = 0.2    # requests failed by the service, per month


class EmbeddingLimits(_Strict):
    """A tier's own limits for /v1/embeddings (buckets apart from chat's, per tenant)."""

    rpm: PosInt
    tpm: PosInt
    max_inputs: Annotated[int, Field(ge=1, le=2048)] = 2048   # items in one request's `input` (OpenAI: 2048)


DegradeAction = Literal["shed", "fallback", "pause_long_prompts", "cap_max_tokens"]


class Degrade(_Strict):
    """The latency circuit breaker (gateway/risk.py, Breaker): a model's p95 TTFT over the strictest
    TTFT SLO of the tiers serving it, over the last ``window_s``, opens it; each tier's ``degrade``
    says which actions may then apply to it."""

    window_s: PosFloat = 180                   # the seeds: 2 to 5 minutes
    long_prompt_tokens: PosInt = 4000          # prompts above this are paused while it is open


class Tier(_Strict):
    name: Name
    models: list[Name] = Field(min_length=1)
    rpm: PosInt
    tpm: PosInt
    key_rpm: PosInt | None = None              # per API key, inside the tenant's rpm/tpm (None: tenant only)
    key_tpm: PosInt | None = None
    max_prompt_tokens: PosInt = 8192
    max_output_tokens: PosInt = 1024
    degraded_max_output_tokens: PosInt | None = None   # max_tokens cap while an SLO is at risk (gateway/risk.py)
    # the contract under the latency breaker (gateway.degrade): which actions may apply to this tier while a
    # model it uses is over its TTFT SLO. shed and fallback apply only below the model's top tier
    degrade: list[DegradeAction] = []
    priority: NonNegInt = 0                    # shed lowest first under overload
    # requests in flight per tenant (and per key), counted before the body is read (gateway/door.py)
    max_concurrent_requests: PosInt = 256
    key_max_concurrent_requests: PosInt | None = None
    allow_fallback: bool = False
    # a chat stream whose worker dies after its first content event is continued from another endpoint with
    # the text delivered so far as the assistant's prefix: one stream, one [DONE], billed once (gateway/proxy.py)
    stream_resume: bool = False
    limits_fail_open: bool | None = None       # when shared limits are unreachable (None: open for paid tiers)
    price_per_1m_tokens: Money = 0
    price_per_1m_cached_tokens: Money | None = None   # cached prompt tokens (None: price_per_1m_tokens)
    embeddings: EmbeddingLimits | None = None  # /v1/embeddings limits (None: rpm and tpm, in buckets of their own)
    monthly_fee: Money = 0
    # the least a tenant of this tier pays for usage in a month (the invoice tops usage up to it)
    monthly_minimum: Money = 0
    slo: Slo = Slo()
    timeouts: Timeouts = Timeouts()

    @property
    def paid(self) -> bool:
        """A tier that charges, per token or per month (the policy rules and the limits' fail-open default)."""
        return self.price_per_1m_tokens > 0 or self.monthly_fee > 0


class StateBackends(_Strict):
    limits: Literal["memory", "redis"] = "memory"
    ledger: Literal["sqlite", "postgres"] = "sqlite"
    redis_url: str | None = None
    postgres_dsn: str | None = None

    @model_validator(mode="after")
    def _urls(self) -> StateBackends:
        if self.limits == "redis" and not self.redis_url:
            raise ValueError("limits: redis needs redis_url")
        if self.ledger == "postgres" and not self.postgres_dsn:
            raise ValueError("ledger: postgres needs postgres_dsn")
        return self


class Privacy(_Strict):
    log_prompts: bool = False                  # tenants may still opt in, with a TTL
    debug_log_ttl_hours: PosInt = 24


class Gateway(_Strict):
    replicas: PosInt = 1
    # the most replicas the autoscaler may run (Kubernetes: the HPA's maxReplicas); the plan declares a mesh
    # identity (gateway-N: a WireGuard key, an address, a UDP endpoint) for each, so every pod it can start is
    # a mesh peer. Default: replicas (no autoscaling). Gateways on SSH hosts: one host per identity.
    max_replicas: PosInt | None = None
    namespace: str = "infermesh"
    host: str = "localhost"                    # public ingress host
    tls_issuer: str | None = None              # cert-manager ClusterIssuer
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    max_body_bytes: PosInt = 1_048_576
    probe_interval_s: PosFloat = 30
    health_interval_s: PosFloat = 5
    # the region the gateway serves in (requests stay there while it has healthy capacity, then go to its
    # backup); INFERMESH_REGION overrides it per deployment, a request's x-infermesh-region header per request
    region: Name | None = None
    # black holes (gateway/router.py, liveness): every worker's /health this often (0: off), answered within
    # liveness_timeout_s; two misses in a row (the second ping at once) take it out
    liveness_interval_s: NonNegFloat = 0.5
    liveness_timeout_s: PosFloat = 0.5
    drain_timeout_s: PosFloat = 30
    max_in_flight: PosInt = 2048               # admission sheds the lowest tier above this
    # the door (gateway/door.py): what a client may cost before it is admitted
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536   # a request head; above: 431
    max_headers: Annotated[int, Field(ge=8, le=1000)] = 100               # header fields in a head; above: 431
    header_timeout_s: PosFloat = 10            # the whole head within this of the connection (or last answer)
    body_timeout_s: PosFloat = 30              # the whole body within this of the head; else 408 (metered)
    max_json_depth: Annotated[int, Field(ge=4, le=200)] = 32   # nesting of a request's JSON; deeper: 400
    failures_per_minute: PosInt = 120          # bad keys and unknown models per client address; above: 429
    trusted_proxies: list[str] = []            # CIDRs whose X-Forwarded-For names the client (the ingress)

    @model_validator(mode="after")
    def _scale(self) -> Gateway:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below replicas {self.replicas}")
        return self

    @property
    def identities(self) -> int:
        """How many gateway mesh identities the plan declares: as many as the fleet can scale to."""
        return self.max_replicas or self.replicas

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        import ipaddress

        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or CIDR") from None
        return v
    # ... and when the event loop runs this late on average (ms; 0: off): the core is saturated (gateway/overload.py)
    max_loop_lag_ms: NonNegFloat = 100
    # what the gateway fleet costs a month, all in (its nodes, Redis, PostgreSQL, load balancer): USD,
    # part of the fully loaded cost per 1M tokens (fleet/plan.py costs)
    monthly_cost_usd: Money = 0
    state: StateBackends = StateBackends()
    privacy: Privacy = Privacy()
    degrade: Degrade = Degrade()


class Mesh(_Strict):
    cidr: str = "10.90.0.0/16"
    port: Annotated[int, Field(ge=1, le=65535)] = 51820
    keepalive_s: NonNegInt = 25
    # Kubernetes gateway pods on nodes without the WireGuard module: their mesh sidecar runs wireguard-go
    # on the node's /dev/net/tun (a hostPath device) instead of the kernel's WireGuard (docs/mesh.md)
    userspace: bool = False
    # annotations of the gateway pods' UDP load balancers (one per mesh identity): the cloud's kind of load
    # balancer, e.g. {"service.beta.kubernetes.io/aws-load-balancer-type": "external", ...} on EKS
    lb_annotations: dict[str, str] = {}
    # bump to replace every mesh key of a Pulumi-managed stack (WireGuardMesh's `rotation`): `pulumi up`, then
    # `infermesh bootstrap --from-pulumi` gives the SSH hosts theirs (docs/mesh.md#keys-one-source-per-stack)
    rotation: NonNegInt = 0

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_network(v)
        except ValueError as e:
            raise ValueError(f"not a CIDR: {e}") from None
        return v


class Forecast(_Strict):
    model: Name
    region: Name
    qps: NonNegFloat
    prompt_tokens: PosInt
    completion_tokens: PosInt


class Throughput(_Strict):
    """Measured decode throughput of one GPU type serving one model (tokens/s at saturation)."""

    gpu: str
    model: Name
    tokens_per_s: PosFloat
    efficiency: Annotated[float, Field(gt=0, le=1)] = 0.75   # E in the capacity formula
    utilisation: Annotated[float, Field(gt=0, le=1)] = 0.6   # U in the cost formula


CANARY_MAX_WEIGHT = 50                         # percent of its pool's traffic a canary takes at most (and > 0)


class Canary(_Strict):
    pool: Name
    image: str
    weight: Annotated[float, Field(gt=0, le=CANARY_MAX_WEIGHT)] = 5         # percent of the pool's traffic
    sim: SimKnobs | None = None                # sim pools: how the new build behaves (default: the pool's knobs)


class Delivery(_Strict):
    """How CI/CD reaches this stack (docs/ci.md): where images go, where canary SLIs come from, the
    gateway's admin token and how the canary bot changes main."""

    registry: str | None = None                # image registry and path, e.g. ghcr.io/acme/infermesh
    prometheus_url: str | None = None          # Prometheus scraping every gateway pod (else: the pods themselves)
    admin_token: Name | None = None            # stack secret with the gateway's admin token (every pod gets it)
    canary_commits: Literal["pull-request", "direct"] = "pull-request"   # how canary start/promote reach main

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+", v):
            raise ValueError(f"{v!r} is not a registry and path like ghcr.io/acme/infermesh")
        return v

    @field_validator("prometheus_url")
    @classmethod
    def _prometheus(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


class SlaWindow(_Strict):
    """Time the SLA excludes (gateway/sla.py): scheduled maintenance announced at least
    MAINTENANCE_NOTICE_H before it starts (at most MAINTENANCE_MAX_MIN minutes a month count), or
    an exclusion the addendum allows (force majeure, a customer's misuse: `tenant` limits it to one)."""

    start: datetime
    end: datetime
    reason: str = Field(min_length=1, max_length=200)
    announced: datetime | None = None          # maintenance only: when customers were told
    tenant: str | None = None                  # exclusions only: one customer's (misuse)

    @model_validator(mode="after")
    def _order(self) -> SlaWindow:
        for f in ("start", "end", "announced"):
            v = getattr(self, f)
            if v is not None and v.tzinfo is None:
                setattr(self, f, v.replace(tzinfo=timezone.utc))
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class SlaTerms(_Strict):
    maintenance: list[SlaWindow] = []
    exclusions: list[SlaWindow] = []


class Planning(_Strict):
    headroom: Annotated[float, Field(ge=1.0, le=2.0)] = 1.3
    overhead_per_1m_tokens: Money = 0.0
    # policy rule tier-margin: a paid tier's price is at least its fully loaded cost x (1 + this / 100);
    # null turns the rule off for a stack that sells nothing (staging)
    min_margin_pct: Annotated[float, Field(ge=0, le=1000, strict=True, allow_inf_nan=False)] | None = 0.0
    # percent of the forecast tokens expected at the overflow upstream (measured); the plan also sends it
    # whatever the primary pools cannot carry
    overflow_share_pct: Annotated[float, Field(ge=0, le=100, strict=True, allow_inf_nan=False)] = 0.0


class ChannelTls(_Strict):
    """The gateway-to-worker channel's certificates (fleet/channel.py; pulumi-tls resources in
    fleet/components/certs.py): their declared validity. A certificate within ``renew_before_days``
    of its end is re-issued by the next `pulumi up` (the worker's lease is then replaced, surge-paced)."""
    ca_validity_days: PosInt = 1095
    cert_validity_days: PosInt = 90
    renew_before_days: PosInt = 30

    @model_validator(mode="after")
    def _renewal(self) -> ChannelTls:
        if self.renew_before_days >= self.cert_validity_days:
            raise ValueError(f"renew_before_days ({self.renew_before_days}) must be below cert_validity_days "
                             f"({self.cert_validity_days})")
        if self.cert_validity_days > self.ca_validity_days:
            raise ValueError("cert_validity_days cannot exceed ca_validity_days")
        return self


class Spec(_Strict):
    stack: str
    regions: list[Region] = Field(min_length=1)
    providers: list[Provider] = Field(min_length=1)
    models: list[Model] = Field(min_length=1)
    pools: list[Pool] = Field(min_length=1)
    tiers: list[Tier] = Field(min_length=1)
    gateway: Gateway = Gateway()
    mesh: Mesh = Mesh()
    channel: ChannelTls = ChannelTls()        # mutual TLS to marketplace workers: certificate validity
    forecast: list[Forecast] = []
    throughput: list[Throughput] = []
    gpus: dict[str, PosFloat] = {}             # extra GPU types: name -> VRAM GiB
    planning: Planning = Planning()
    sla: SlaTerms = SlaTerms()                 # excluded time: maintenance and the addendum's exclusions
    canary: Canary | None = None
    delivery: Delivery = Delivery()
    allow_sim_workers: bool = False            # bootstrap may accept hosts without a GPU
    # The operator's SSH public keys: registered on a marketplace account for its SSH-host pools where the
    # marketplace takes account keys (RunPod: added to the account's keys, none removed; docs/leases.md)
    ssh_public_keys: list[SshPublicKey] = []
    local_port_base: Annotated[int, Field(ge=1024, le=65000)] = 9100  # local workers' first port
    secrets: dict[str, str] = Field(default={}, repr=False)  # resolved `infermesh:<name>` secrets

    # ---- lookups -------------------------------------------------------------------------
    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)

    def model(self, model_id: str) -> Model:
        return next(m for m in self.models if m.id == model_id)

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def pool(self, name: str) -> Pool:
        return next(p for p in self.pools if p.name == name)

    def vram_gb(self, gpu_type: str) -> float | None:
        return self.gpus.get(gpu_type, GPU_VRAM_GB.get(gpu_type))

    # ---- cross-references ----------------------------------------------------------------
    @model_validator(mode="after")
    def _references(self) -> Spec:
        def unique(items: list[Any], what: str, key: str = "name") -> set[str]:
            seen: set[str] = set()
            for i, item in enumerate(items):
                value = getattr(item, key)
                if value in seen:
                    raise _At(f"{what}[{i}].{key}", f"duplicate {key} {value!r}")
                seen.add(value)
            return seen

        regions = unique(self.regions, "regions")
        for i, r in enumerate(self.regions):
            if r.backup is not None and (r.backup not in regions or r.backup == r.name):
                raise _At(f"regions[{i}].backup", f"{r.backup!r} is not another declared region")
        if self.gateway.region is not None and self.gateway.region not in regions:
            raise _At("gateway.region", f"unknown region {self.gateway.region!r}")
        providers = unique(self.providers, "providers")
        models = unique(self.models, "models", "id")
        unique(self.pools, "pools")
        unique(self.tiers, "tiers")
        for i, p in enumerate(self.providers):
            for region in p.regions:
                if region not in regions:
                    raise _At(f"providers[{i}].regions", f"unknown region {region!r}")
            if p.registry_credentials and p.registry_credentials not in self.secrets:
                raise _At(f"providers[{i}].registry_credentials",
                          f"secret {NAMESPACE}:{p.registry_credentials} is not set in the stack file "
                          f"(pulumi config set --secret {NAMESPACE}:{p.registry_credentials} ...)")
            if p.credentials and p.credentials not in self.secrets:
                raise _At(f"providers[{i}].credentials",
                          f"secret {NAMESPACE}:{p.credentials} is not set in the stack file "
                          f"(pulumi config set --secret {NAMESPACE}:{p.credentials} ...)")
        for i, m in enumerate(self.models):
            if m.fallback is not None and m.fallback not in models:
                raise _At(f"models[{i}].fallback", f"unknown model {m.fallback!r}")
            if m.fallback == m.id:
                raise _At(f"models[{i}].fallback", "a model cannot be its own fallback")
            if m.fallback is not None and self.model(m.fallback).kind != m.kind:
                raise _At(f"models[{i}].fallback", f"{m.fallback!r} is not a {m.kind} model like {m.id!r}")
        for i, pool in enumerate(self.pools):
            where = f"pools[{i}] ({pool.name})"
            if pool.model not in models:
                raise _At(f"{where}.model", f"unknown model {pool.model!r}")
            if pool.provider not in providers:
                raise _At(f"{where}.provider", f"unknown provider {pool.provider!r}; declared: {sorted(providers)}")
            prov = self.provider(pool.provider)
            if pool.region not in prov.regions:
                raise _At(f"{where}.region", f"provider {prov.name!r} does not serve region {pool.region!r}")
            if is_upstream(prov.kind):
                continue
            vram = self.vram_gb(pool.gpu.type)
            if vram is None:
                raise _At(f"{where}.gpu.type", f"unknown GPU type {pool.gpu.type!r}; add it under `gpus`")
            model = self.model(pool.model)
            if prov.kind not in ("sim", "llamacpp") and model.weights_gb > vram * pool.gpu.count:
                raise _At(f"{where}.gpu", f"{pool.gpu.count} x {pool.gpu.type} ({vram * pool.gpu.count:g} GiB) "
                                           f"cannot hold {model.id}'s weights ({model.weights_gb:g} GiB)")
            if prov.kind == "sim" and pool.sim is None:
                pass  # sim pools may use default knobs
            if prov.kind == "llamacpp" and not pool.gguf:
                raise _At(f"{where}.gguf", "a llamacpp pool names its GGUF file")
            cap = prov.price_cap_per_gpu_hour
            if cap is not None and pool.price_per_gpu_hour is not None and pool.price_per_gpu_hour > cap:
                raise _At(f"{where}.price_per_gpu_hour",
                          f"{pool.price_per_gpu_hour} is above provider {prov.name!r}'s cap {cap}")
        for i, t in enumerate(self.tiers):
            for model_id in t.models:
                if model_id not in models:
                    raise _At(f"tiers[{i}] ({t.name}).models", f"unknown model {model_id!r}")
        for i, f in enumerate(self.forecast):
            if f.model not in models:
                raise _At(f"forecast[{i}].model", f"unknown model {f.model!r}")
            if f.region not in regions:
                raise _At(f"forecast[{i}].region", f"unknown region {f.region!r}")
        if self.canary is not None and self.canary.pool not in {p.name for p in self.pools}:
            raise _At("canary.pool", f"unknown pool {self.canary.pool!r}")
        token = self.delivery.admin_token
        if token is not None and token not in self.secrets:
            raise _At("delivery.admin_token", f"secret {NAMESPACE}:{token} is not set in the stack file "
                                              f"(pulumi config set --secret {NAMESPACE}:{token} ...)")
        return self


class _At(ValueError):
    """A cross-reference error that already knows its field path."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ---- loading --------------------------------------------------------------------------------

# Limits of what a stack file may be (docs/cli-inputs.md). A real stack file is a few kB, a dozen
# levels deep and uses few or no aliases; these bounds refuse hostile files in milliseconds.
MAX_STACK_FILE_BYTES = 1 << 20          # 1 MiB
MAX_DEPTH = 64                          # nesting of mappings and lists, aliases expanded
MAX_NODES = 100_000                     # values in the document with every alias expanded (billion laughs)
MAX_NUMBER = 10**15                     # magnitude of any number; and it must be finite


class _Refused(yaml.MarkedYAMLError):
    """A stack file over one of the limits above (or an alias inside a secret)."""


class _StackLoader(yaml.SafeLoader):
    """PyYAML's safe loader with limits: nesting depth while composing, no anchor or alias inside a
    secret (``{secure: ...}``), and constructor errors (a 5,000-digit integer, 2026-02-30) as
    YAML errors with a line rather than a ValueError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._secure = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        secure = (isinstance(parent, yaml.MappingNode) and isinstance(index, yaml.ScalarNode)
                  and index.value == "secure")
        if (self._secure or secure) and (isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None)):
            raise _Refused(None, None, "an anchor or alias in a secret ({secure: ...}) is refused; "
                                       "a secret is one string", event.start_mark)
        self._depth += 1
        self._secure += secure
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._secure -= secure

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:
            reason = str(e).split(":")[0]        # Python's int limit adds advice about sys.set_int_max_str_digits
            raise _Refused(None, None, f"cannot read the value {_clip(node.value)}: {reason}",
                           node.start_mark) from None


def _clip(value: Any, n: int = 40) -> str:
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text if len(text) <= n else text[:n] + "...")


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def _check_expansion(root: Any) -> None:
    """Refuse a document whose aliases expand past MAX_NODES values or MAX_DEPTH levels, or refer
    to themselves. Computed on the composed graph (aliases are shared nodes), without expanding it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()
    todo: list[tuple[Any, bool]] = [(root, False)]
    while todo:
        node, done = todo.pop()
        key = id(node)
        if done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            active.discard(key)
            if size[key] > MAX_NODES:
                raise _Refused(None, None, f"aliases expand to more than {MAX_NODES:,} values", node.start_mark)
            if depth[key] > MAX_DEPTH:
                raise _Refused(None, None, f"aliases expand to more than {MAX_DEPTH} levels", node.start_mark)
            continue
        if key in size:
            continue
        if key in active:
            raise _Refused(None, None, "an alias refers to a value that contains it", node.start_mark)
        active.add(key)
        todo.append((node, True))
        todo.extend((c, False) for c in _children(node) if id(c) not in size)


def _load_yaml(text: str) -> Any:
    loader = _StackLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def stack_path(stack: str, stacks_dir: Path | None = None) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", stack):
        raise SpecError(f"stack name {stack!r}: use letters, digits, '.', '_' or '-'")
    if stacks_dir is None:
        try:
            stacks_dir = project.stacks_dir()      # found from the current directory, as pulumi does
        except project.ProjectError as e:
            raise SpecError(str(e)) from None
    return stacks_dir / f"Pulumi.{stack}.yaml"


def read_text(path: Path, what: str = "stack file") -> str:
    """A file's text: at most MAX_STACK_FILE_BYTES of UTF-8. Raises SpecError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STACK_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the {what} ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_STACK_FILE_BYTES:
        raise SpecError(f"{path}: larger than {MAX_STACK_FILE_BYTES // 1024} KiB; not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_yaml(path: Path, what: str = "stack file") -> Any:
    """A YAML (or JSON) file read with the stack-file limits above: size, UTF-8, depth, alias
    expansion, no alias in secrets. Any problem is a SpecError of one line naming the file and, where
    it has one, the line. Also for the other files the CLI reads (hosts files)."""
    text = read_text(path, what)
    try:
        return _load_yaml(text)
    except yaml.reader.ReaderError as e:
        raise SpecError(f"{path}: character #x{e.character:04x} at offset {e.position} "
                        f"is not allowed in YAML") from None
    except _Refused as e:
        mark = e.problem_mark
        raise SpecError(f"{path}: line {mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        reason = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{where} is not valid YAML ({reason})") from None
    except (ValueError, OverflowError, TypeError) as e:   # a constructor outside construct_object
        raise SpecError(f"{path}: cannot read a value ({e})") from None


def read_config(path: Path) -> dict[str, Any]:
    """The `infermesh:` keys of a stack file, namespace stripped. Raises SpecError."""
    doc = read_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise SpecError(f"{path}: expected a mapping with a `config:` section (Pulumi stack config)")
    out: dict[str, Any] = {}
    for key, value in doc["config"].items():
        ns, _, name = str(key).partition(":")
        if ns == NAMESPACE and name:
            out[name] = value
    return out


def _check_numbers(config: dict[str, Any], source: str) -> None:
    """Every number finite and within ±MAX_NUMBER, named by its field when not."""
    todo: list[tuple[Any, str]] = [(v, f"{NAMESPACE}:{k}") for k, v in config.items()]
    while todo:
        value, where = todo.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value) or abs(value) > MAX_NUMBER:
                shown = f"{value:.3g}" if isinstance(value, float) else _clip(str(value))
                raise SpecError(f"{source}: {where}: the number {shown} is out of range "
                                f"(numbers are finite and at most 1e15 in magnitude)")
        elif isinstance(value, dict):
            todo.extend((v, f"{where}.{k}") for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((v, f"{where}[{i}]") for i, v in enumerate(value))


def parse(config: dict[str, Any], stack: str, source: str = "<config>",
          secrets: dict[str, str] | None = None) -> Spec:
    """Validate already-read config. Secrets are values shaped ``{secure: ...}`` in the file, or
    plain values handed in by Pulumi at deploy time; either way they never reach a log."""
    data: dict[str, Any] = {"stack": stack}
    found_secrets: dict[str, str] = dict(secrets or {})
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            if not isinstance(value["secure"], str):
                raise SpecError(f"{source}: {NAMESPACE}:{key}.secure: a secret is one string (Pulumi's ciphertext)")
            found_secrets[key] = value["secure"]
        elif key in _FIELDS:
            data[key] = value
        elif key in found_secrets or isinstance(value, str):
            found_secrets[key] = value if isinstance(value, str) else str(value)
        else:
            raise SpecError(f"{source}: {NAMESPACE}:{key}: unknown setting; known: {', '.join(sorted(_FIELDS))}")
    _check_numbers({k: v for k, v in config.items() if k in data}, source)
    data["secrets"] = found_secrets
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: {_describe(e, data)}") from None


def load(stack: str, stacks_dir: Path | None = None) -> Spec:
    path = stack_path(stack, stacks_dir)
    return parse(read_config(path), stack, source=str(path.relative_to(path.parent.parent))
                 if path.is_relative_to(path.parent.parent) else str(path))


_FIELDS = {name for name in Spec.model_fields if name not in ("stack", "secrets")}


def _describe(e: ValidationError, data: dict[str, Any]) -> str:
    """One line for the first error: the field path (with the pool/tier name where known) and why."""
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"]]
    msg = err["msg"]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _At):
        return str(ctx_err)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    path = _path(loc, data)
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown field"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    return f"{path}: {msg}" if path else msg


def _path(loc: list[str], data: Any) -> str:
    parts: list[str] = []
    node = data
    for key in loc:
        if key.isascii() and key.isdigit() and isinstance(node, list):
            idx = int(key)
            node = node[idx] if idx < len(node) else None
            label = f"[{idx}]"
            if isinstance(node, dict) and ("name" in node or "id" in node):
                label += f" ({_printable(str(node.get('name', node.get('id'))))})"
            parts.append(label)
        else:
            node = node.get(key) if isinstance(node, dict) else None
            parts.append(("." if parts else "") + key)
    return "".join(parts)


def _printable(text: str, limit: int = 60) -> str:
    """A value from the file as shown in a message: control characters escaped, cut to `limit`."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
