"""GpuLease: one GPU lease on a marketplace, as a Pulumi dynamic resource inside a component.

The dynamic provider carries out the plan's ``Lease`` through the marketplace adapters
(fleet/marketplaces). One provider class per marketplace (``VastAiLeaseProvider``,
``RunPodLeaseProvider``, ``AkashLeaseProvider``) so each lease's provider code is the one
marketplace's, and a change to one marketplace does not touch the others' state.

Following Pulumi's dynamic-provider guide:

- ``check`` validates and fills defaults; ``diff`` names the exact properties that force a new
  lease; ``delete_before_replace`` is set because the lease's label is its idempotency key:
  create-before-delete would *find* the old lease under the same label and adopt it.
- Credentials never travel as inputs or outputs: the provider holds only the *name* of the stack
  secret (``credentials``) and reads the key in ``configure`` from the stack config, or from the
  adapter's env var (``VASTAI_API_KEY``, ...) inside each method. Clients are built in each method,
  because the provider is serialized and runs in another process.
- ``provider_version`` is an input, so a change to this code shows up as an update.
- ``read`` reports the live lease (refresh); a lease the marketplace no longer knows is gone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    ConfigureRequest,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

PROVIDER_VERSION = "1"
# Inputs that change what is rented or how it starts: a new lease (delete first, see above).
REPLACE_ON = ("provider_kind", "name", "gpu_type", "gpu_count", "region", "countries", "image", "args", "env",
              "ports", "disk_gb", "connection", "base_url")
# Inputs that only change how we judge the lease: updated in place.
UPDATE_ON = ("price_cap", "price_per_gpu_hour", "wait_s", "credentials", "provider_version")
DEFAULTS: dict[str, Any] = {"countries": [], "args": [], "env": {}, "ports": [], "disk_gb": 60,
                            "connection": "container", "wait_s": 900, "base_url": None, "price_per_gpu_hour": None,
                            "provider_version": PROVIDER_VERSION}
OUTPUTS = ("lease_id", "status", "raw_status", "price_per_hour", "endpoint_host", "endpoint_port", "ssh_host",
           "ssh_port", "ssh_user")


def _known(value: Any) -> bool:
    """During preview an input may still be unknown (the engine's sentinel string)."""
    return not (isinstance(value, str) and value == pulumi.UNKNOWN)


class LeaseProvider(ResourceProvider):
    """The shared body of the per-marketplace lease providers."""

    kind = ""

    def __init__(self, credentials: str | None = None, base_url: str | None = None) -> None:
        super().__init__()
        self.credentials = credentials      # the NAME of the stack secret, never its value
        self.base_url = base_url
        self._api_key: str | None = None

    # -- plumbing --
    def configure(self, req: ConfigureRequest) -> None:
        if self.credentials:
            value = req.config.get(f"infermesh:{self.credentials}")
            self._api_key = str(value) if value else None

    def adapter(self, props: Mapping[str, Any]):
        from fleet.marketplaces import API_KEY_ENV, LEASE_ADAPTERS

        key = self._api_key or os.environ.get(API_KEY_ENV[self.kind], "")
        base = os.environ.get(f"INFERMESH_{self.kind.upper()}_BASE_URL") or props.get("base_url") or self.base_url
        return LEASE_ADAPTERS[self.kind](key, base)

    @staticmethod
    def request(props: Mapping[str, Any]):
        from fleet.marketplaces import LeaseRequest, Port

        ports = []
        for spec in props.get("ports") or []:
            port, _, proto = str(spec).partition("/")
            ports.append(Port(int(port), proto or "tcp"))        # type: ignore[arg-type]
        return LeaseRequest(
            label=str(props["name"]), gpu_type=str(props["gpu_type"]), gpu_count=int(props["gpu_count"]),
            image=str(props["image"]), price_cap_per_gpu_hour=props.get("price_cap"),
            region=str(props.get("region") or ""), countries=tuple(props.get("countries") or ()),
            args=tuple(props.get("args") or ()), env=dict(props.get("env") or {}), ports=tuple(ports),
            disk_gb=int(props.get("disk_gb") or 60), ssh=props.get("connection") == "ssh",
        )

    @staticmethod
    def outputs(state) -> dict[str, Any]:
        first = next(iter(state.endpoints.values()), None)
        return {
            "lease_id": state.lease_id, "status": state.status, "raw_status": state.raw_status,
            "price_per_hour": state.price_per_hour,
            "endpoint_host": first.host if first else None, "endpoint_port": first.port if first else None,
            "ssh_host": state.ssh.host if state.ssh else None, "ssh_port": state.ssh.port if state.ssh else None,
            "ssh_user": state.ssh_user,
        }

    # -- the provider protocol --
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        props = {**DEFAULTS, **{k: v for k, v in news.items() if v is not None or k not in DEFAULTS}}
        failures = []

        def fail(prop: str, reason: str) -> None:
            failures.append(CheckFailure(prop, reason))

        if _known(props.get("provider_kind")) and props.get("provider_kind") != self.kind:
            fail("provider_kind", f"this provider rents on {self.kind!r}, not {props.get('provider_kind')!r}")
        for prop in ("name", "gpu_type", "image"):
            if _known(props.get(prop)) and not props.get(prop):
                fail(prop, "is required")
        count = props.get("gpu_count")
        if _known(count) and (not isinstance(count, int) or count < 1):
            fail("gpu_count", f"must be a whole number >= 1, got {count!r}")
        cap = props.get("price_cap")
        if _known(cap) and (not isinstance(cap, (int, float)) or cap <= 0):
            fail("price_cap", "a lease needs a positive price cap per GPU-hour (set the provider's "
                              "price_cap_per_gpu_hour); nothing is rented without one")
        if _known(props.get("connection")) and props.get("connection") not in ("container", "ssh"):
            fail("connection", "must be 'container' or 'ssh'")
        for spec in props.get("ports") or []:
            if _known(spec) and not (isinstance(spec, str) and spec.partition("/")[0].isdigit()
                                     and spec.partition("/")[2] in ("tcp", "udp", "http")):
                fail("ports", f"{spec!r} is not PORT/tcp|udp|http")
        return CheckResult(props, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        def differs(key: str) -> bool:
            return olds.get(key, DEFAULTS.get(key)) != news.get(key, DEFAULTS.get(key))

        replaces = [k for k in REPLACE_ON if differs(k)]
        updates = [k for k in UPDATE_ON if differs(k)]
        return DiffResult(changes=bool(replaces or updates), replaces=replaces,
                          stables=[k for k in REPLACE_ON if k not in replaces], delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        from fleet.marketplaces import LeaseDied

        adapter = self.adapter(props)
        state = adapter.create(self.request(props))
        wait = float(props.get("wait_s") or 0)
        if wait > 0 and state.status != "running":
            try:
                state = adapter.wait_running(state.lease_id, wait)
            except LeaseDied:
                adapter.destroy(state.lease_id)       # it serves nothing; don't pay for it
                raise
        return CreateResult(id_=state.lease_id, outs={**props, **self.outputs(state)})

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        from fleet.marketplaces import NotFound

        try:
            state = self.adapter(props).status(id_)
        except NotFound:
            return ReadResult(None, {})
        return ReadResult(id_, {**props, **self.outputs(state)})

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        from fleet.marketplaces import PriceAboveCap

        state = self.adapter(news).status(id_)
        cap, price = news.get("price_cap"), state.price_per_hour
        count = int(news.get("gpu_count") or 1)
        if cap is not None and price is not None and price / count > cap + 1e-9:
            raise PriceAboveCap(f"{self.kind}: lease {news.get('name')} bills {price / count:.4f}/GPU-hour, above the "
                                f"new cap {cap:.4f}; replace it (pulumi up --replace) or drain the provider",
                                provider=self.kind)
        return UpdateResult({**olds, **news, **self.outputs(state)})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self.adapter(props).destroy(id_)


class VastAiLeaseProvider(LeaseProvider):
    kind = "vastai"


class RunPodLeaseProvider(LeaseProvider):
    kind = "runpod"


class AkashLeaseProvider(LeaseProvider):
    kind = "akash"


LEASE_PROVIDERS: dict[str, type[LeaseProvider]] = {
    "vastai": VastAiLeaseProvider, "runpod": RunPodLeaseProvider, "akash": AkashLeaseProvider,
}


class GpuLeaseResource(Resource, module="infermesh", name="GpuLease"):
    """The dynamic resource (type ``pulumi-python:dynamic/infermesh:GpuLease``)."""

    lease_id: pulumi.Output[str]
    status: pulumi.Output[str]
    price_per_hour: pulumi.Output[float | None]
    endpoint_host: pulumi.Output[str | None]
    endpoint_port: pulumi.Output[int | None]
    ssh_host: pulumi.Output[str | None]
    ssh_port: pulumi.Output[int | None]
    ssh_user: pulumi.Output[str]

    def __init__(self, name: str, provider: LeaseProvider, props: dict[str, Any],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(provider, name, {**props, **{k: None for k in OUTPUTS}}, opts)


class GpuLeaseArgs(TypedDict):
    provider_kind: pulumi.Input[str]
    """The marketplace: ``vastai``, ``runpod`` or ``akash``."""
    credentials: str
    """Name of the stack secret with the marketplace key (``infermesh:<credentials>``); never the key."""
    gpu_type: pulumi.Input[str]
    """The plan's GPU type (``RTX4090``, ``L40S``, ...)."""
    gpu_count: pulumi.Input[int]
    """GPUs in this one lease."""
    region: pulumi.Input[str]
    """The plan's region; the adapter turns it into the marketplace's filter."""
    image: pulumi.Input[str]
    """The worker image, pinned by digest."""
    price_cap: pulumi.Input[float]
    """Highest price per GPU-hour; offers above it are refused."""
    countries: NotRequired[pulumi.Input[Sequence[str]]]
    """ISO country codes the region stands for."""
    args: NotRequired[pulumi.Input[Sequence[str]]]
    """Arguments to the image's entrypoint (vLLM's flags)."""
    env: NotRequired[pulumi.Input[Mapping[str, str]]]
    """Environment of the container; secret (it holds the worker's mesh key)."""
    ports: NotRequired[pulumi.Input[Sequence[str]]]
    """Container ports to publish, ``PORT/tcp|udp|http``; the worker API is never among them."""
    disk_gb: NotRequired[pulumi.Input[int]]
    """Container disk (GB): weights plus headroom."""
    connection: NotRequired[pulumi.Input[str]]
    """``container`` (runs the image) or ``ssh`` (a host for Ansible)."""
    price_per_gpu_hour: NotRequired[pulumi.Input[float | None]]
    """The pool's expected price, for the policy pack's price-under-cap rule."""
    base_url: NotRequired[pulumi.Input[str | None]]
    """The marketplace API's base URL (default: the adapter's)."""
    wait_s: NotRequired[pulumi.Input[int]]
    """How long create waits for the lease to run (0: return once rented)."""


class GpuLease(pulumi.ComponentResource):
    """One plan lease, rented idempotently under its name, with its endpoint and SSH address as outputs."""

    lease_id: pulumi.Output[str]
    status: pulumi.Output[str]
    endpoint_host: pulumi.Output[str | None]
    endpoint_port: pulumi.Output[int | None]
    ssh_host: pulumi.Output[str | None]
    ssh_port: pulumi.Output[int | None]
    ssh_user: pulumi.Output[str]

    def __init__(self, name: str, args: GpuLeaseArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:GpuLease", name, None, opts)
        kind = args["provider_kind"]
        if kind not in LEASE_PROVIDERS:
            raise ValueError(f"GpuLease {name}: provider_kind {kind!r} rents nothing; must be one of "
                             f"{', '.join(sorted(LEASE_PROVIDERS))}")
        if args.get("price_cap") is None:
            raise ValueError(f"GpuLease {name}: price_cap is required (the provider's price_cap_per_gpu_hour)")
        provider = LEASE_PROVIDERS[kind](args["credentials"], args.get("base_url"))
        props: dict[str, Any] = {
            "name": name, "provider_kind": kind, "gpu_type": args["gpu_type"], "gpu_count": args["gpu_count"],
            "region": args["region"], "image": args["image"], "price_cap": args["price_cap"],
            "credentials": args["credentials"],
            **{k: args.get(k, DEFAULTS[k]) for k in ("countries", "args", "ports", "disk_gb", "connection",
                                                     "price_per_gpu_hour", "base_url", "wait_s")},
            "env": pulumi.Output.secret(args.get("env", {})),
            "provider_version": PROVIDER_VERSION,
        }
        self.resource = GpuLeaseResource(
            f"{name}-lease", provider, props,
            pulumi.ResourceOptions(parent=self, delete_before_replace=True, additional_secret_outputs=["env"]))
        self.lease_id = self.resource.lease_id
        self.status = self.resource.status
        self.endpoint_host = self.resource.endpoint_host
        self.endpoint_port = self.resource.endpoint_port
        self.ssh_host = self.resource.ssh_host
        self.ssh_port = self.resource.ssh_port
        self.ssh_user = self.resource.ssh_user
        self.register_outputs({
            "lease_id": self.lease_id, "status": self.status, "endpoint_host": self.endpoint_host,
            "endpoint_port": self.endpoint_port, "ssh_host": self.ssh_host, "ssh_port": self.ssh_port,
            "ssh_user": self.ssh_user,
        })
