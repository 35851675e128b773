"""GpuLease: one GPU lease on a marketplace, as a Pulumi dynamic resource inside a component.

The dynamic provider carries out the plan's ``Lease`` through the marketplace adapters
(fleet/marketplaces). One provider class per marketplace (``VastAiLeaseProvider``,
``RunPodLeaseProvider``, ``AkashLeaseProvider``) so each lease's provider code is the one
marketplace's, and a change to one marketplace does not touch the others' state. The classes are
pickled by reference, so this module's path is part of every stack's state: do not move it.

What the engine hands the provider (pulumi/dynamic/__main__.py, pulumi/runtime/rpc.py): every
property crosses gRPC as a protobuf Struct, so **every number arrives as a float** (``gpu_count``
is ``1.0``) and a value not known yet during preview crosses as ``pulumi.runtime.rpc.UNKNOWN`` (a
sentinel string) and reaches check/diff as a ``pulumi.output.Unknown`` instance (see ``_known``).
``check`` accepts whole floats and returns ints; every method compares numbers by value.
tests/engine.py feeds the methods exactly that.

- Labels (docs/leases.md): ``<project>--<stack>--<lease>--<generation>``. The generation is a short
  hash of the inputs that force a new lease, so a replacement carries a new label: create-before-
  delete is safe (the new lease never adopts the old one), two stacks or projects with the same
  pool names never see each other's leases, and ``infermesh leases audit`` finds a stack's leases
  by the label prefix. ``check`` computes the label, so it is an input like the others.
- Create is idempotent and leaves nothing outside state: the adapter looks the label up first and
  adopts a live lease it finds; a failure after renting (the wait for running times out, the
  status call fails, the billed price is above the cap) terminates what was rented before the
  error is raised, and the error says whether that worked (``Marketplace.rent``).
- Errors reach the operator as one line naming the marketplace, the lease (and its pool) and what
  to do (``LeaseError``); in the provider host tracebacks are switched off for them.
- ``read`` returns gone for a lease the marketplace no longer knows *or* reports dead (and gives a
  dead one back first), so ``pulumi refresh`` drops it and the next ``up`` replaces it.
- The mTLS channel's certificate (inputs ``tls_name``, ``tls_ca``, ``tls_ca_key`` (secret),
  ``tls_days``, ``tls_renew_days``): no private key goes to the marketplace. ``create`` adds the stack
  CA's certificate and a one-time bootstrap token to the env, and once the lease runs it signs the
  certificate request of the key the worker made itself and pushes the certificate
  (fleet/marketplaces/worker_tls.py); a worker that does not take it is given back like one that does
  not start. Rotation: ``check`` puts the certificate's renewal period in the label
  (``tls_epoch`` = days since 1970 // (``tls_days`` - ``tls_renew_days``)), so the first ``pulumi up``
  of a new period replaces each mTLS lease (surge-paced, create-before-delete) before its
  certificate enters the last ``tls_renew_days`` of its validity.
- Credentials never travel as inputs or outputs: the provider holds only the *name* of the stack
  secret (``credentials``) and reads the key in ``configure`` from the stack config, or from the
  adapter's env var (``VASTAI_API_KEY``, ...). Clients are built in each method, because the
  provider is serialized and runs in another process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
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
from pulumi.output import Unknown
from pulumi.runtime import rpc

from fleet.kinds import LEASED_KINDS

PROVIDER_VERSION = "2"
# Inputs that change what is rented or how it starts: a new lease (created before the old one goes).
# The tls_* ones exist only on leases of the mTLS channel (and only then take part in the label).
REPLACE_ON = ("provider_kind", "project", "stack", "name", "gpu_type", "gpu_count", "region", "image", "args",
              "env", "ports", "connection", "tls_name", "tls_ca", "tls_epoch")
TLS_ONLY = ("tls_name", "tls_ca", "tls_epoch")
# Inputs that only change how we judge or reach the lease, or how the next one is rented: updated in place.
UPDATE_ON = ("price_cap", "price_per_gpu_hour", "wait_s", "credentials", "provider_version", "base_url",
             "countries", "disk_gb", "min_cuda", "registry", "tls_ca_key", "tls_days", "tls_renew_days",
             "ssh_keys")
# min_cuda: the worker image's CUDA runtime (vLLM 0.12.0 is built on CUDA 12.9); hosts whose driver
# cannot run it are filtered out where the marketplace can filter (Vast cuda_max_good, RunPod minCudaVersion).
DEFAULTS: dict[str, Any] = {"countries": [], "args": [], "env": {}, "ports": [], "disk_gb": 60,
                            "connection": "container", "wait_s": 900, "base_url": None, "price_per_gpu_hour": None,
                            "provider_version": PROVIDER_VERSION, "min_cuda": "12.9", "registry": "",
                            "tls_name": None, "tls_ca": None, "tls_ca_key": None, "tls_days": None,
                            "tls_renew_days": None, "tls_epoch": None, "ssh_keys": []}
WHOLE = {"gpu_count": 1, "disk_gb": 1, "wait_s": 0}          # integer inputs and their minimum
OUTPUTS = ("lease_id", "status", "raw_status", "price_per_hour", "endpoint_host", "endpoint_port", "ssh_host",
           "ssh_port", "ssh_user")
LABEL_SEP = "--"


def _known(value: Any) -> bool:
    """During preview an input may still be unknown. On the wire it is ``rpc.UNKNOWN`` (a string); the
    provider host's ``deserialize_properties(..., keep_unknowns=True)`` hands it over as a *new*
    ``pulumi.output.Unknown`` instance (SDK 3.2xx), so both are recognised, by type."""
    if isinstance(value, Unknown):
        return False
    if isinstance(value, str):
        return value != rpc.UNKNOWN
    if isinstance(value, (list, tuple)):
        return all(_known(v) for v in value)
    if isinstance(value, dict):
        return all(_known(v) for v in value.values())
    return True


def whole(value: Any) -> int | None:
    """An integer as the engine sends it (``1.0``) or as Python has it (``1``); None if not whole."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _norm(key: str, value: Any) -> Any:
    """One value as compared and hashed: whole numbers as ints, sequences as lists."""
    if key in WHOLE and whole(value) is not None:
        return whole(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def label_prefix(project: str, stack: str) -> str:
    """What every lease label of one stack of one project starts with."""
    return f"{project}{LABEL_SEP}{stack}{LABEL_SEP}"


def lease_label(props: Mapping[str, Any]) -> str:
    """``<project>--<stack>--<lease>--<generation>``: the generation hashes the replace-inputs (the
    tls_* ones only where set, so a lease of another channel keeps the label it had)."""
    identity = {k: _norm(k, props.get(k, DEFAULTS.get(k))) for k in REPLACE_ON
                if k not in TLS_ONLY or props.get(k) is not None}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{label_prefix(str(props['project']), str(props['stack']))}{props['name']}{LABEL_SEP}{digest}"


def parse_label(label: str) -> dict[str, str] | None:
    """The parts of a label this module made, or None for a label that is not ours."""
    parts = label.split(LABEL_SEP)
    if len(parts) != 4 or not all(parts) or len(parts[3]) != 8:
        return None
    return dict(zip(("project", "stack", "lease", "generation"), parts, strict=True))


def tls_epoch(days: int, renew_days: int, now: float | None = None) -> int:
    """The certificate's renewal period now: whole days since 1970 // (validity - renewal window). A
    lease created in period n is replaced in period n + 1, before its certificate is within
    ``renew_days`` of its end."""
    period = max(int(days) - int(renew_days), 1)
    return int((time.time() if now is None else now) // 86400) // period


def tls_port(props: Mapping[str, Any]) -> int | None:
    """The container port the worker serves (and bootstraps) on: the first TCP port but SSH's."""
    for spec in props.get("ports") or []:
        port, _, proto = str(spec).partition("/")
        if proto in ("tcp", "http", "") and port.isdigit() and port != "22":
            return int(port)
    return None


def pool_of(lease_name: str) -> str:
    return lease_name.rsplit("-", 1)[0] if lease_name.rsplit("-", 1)[-1].isdigit() else lease_name


class LeaseError(Exception):
    """What the operator reads when a lease operation fails: one line, with what to do."""


def _in_provider_host() -> bool:
    """True inside the dynamic provider host (``python -m pulumi.dynamic``), where the SDK reports a
    failed call with ``traceback.format_exc()``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return bool(spec and str(getattr(spec, "name", "")).startswith("pulumi.dynamic"))


def _what_to_do(err: Exception, props: Mapping[str, Any]) -> str:
    from fleet.marketplaces import AuthFailed, LeaseAbandoned, MarketplaceError, NotFound, ProviderError, RateLimited

    if isinstance(err, AuthFailed):
        return (err.fix or "set a valid key: pulumi config set --secret infermesh:<credentials> ...").replace(
            "<credentials>", str(props.get("credentials") or "<credentials>"))
    if isinstance(err, RateLimited):
        wait = f" (it asked for {err.retry_after:g}s)" if err.retry_after else ""
        return f"the marketplace is limiting our calls{wait}; run `pulumi up` again in a few minutes"
    if isinstance(err, LeaseAbandoned):
        return err.fix
    if isinstance(err, MarketplaceError) and err.fix:
        return err.fix
    if isinstance(err, NotFound):
        return "run `pulumi refresh` so the stack forgets it, then `pulumi up`"
    if isinstance(err, ProviderError) and err.retryable:
        return ("the marketplace did not answer properly; run `pulumi up` again later (a lease it already rented "
                "is adopted, not rented twice)")
    return "check the lease's inputs against the marketplace, then run `pulumi up` again"


def _operator_errors(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every marketplace error leaves a provider method as one LeaseError line; anything else (a bug)
    as a LeaseError that carries its traceback, so nothing is lost."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def method(self: LeaseProvider, *args: Any) -> Any:
            from fleet.marketplaces import MarketplaceError

            props = next((a for a in reversed(args) if isinstance(a, Mapping)), {})
            name = props.get("name") or "?"
            where = f"{self.kind}: lease {name} (pool {pool_of(str(name))}), {op}"
            try:
                return fn(self, *args)
            except LeaseError:
                raise
            except MarketplaceError as e:
                err = LeaseError(f"{where}: {e}. What to do: {_what_to_do(e, props)}")
            except Exception:
                err = LeaseError(f"{where}: unexpected error (a bug in infermesh; please report it):\n"
                                 f"{traceback.format_exc()}")
            if _in_provider_host():
                sys.tracebacklimit = 0          # the SDK prints format_exc(): the message alone
            raise err from None

        return method

    return wrap


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
            ports.append(Port(int(port), proto or "tcp"))
        cap = props.get("price_cap")
        return LeaseRequest(
            label=str(props.get("label") or lease_label(props)), gpu_type=str(props["gpu_type"]),
            gpu_count=int(float(props["gpu_count"])), image=str(props["image"]),
            price_cap_per_gpu_hour=None if cap is None else float(cap),
            region=str(props.get("region") or ""), countries=tuple(props.get("countries") or ()),
            args=tuple(props.get("args") or ()), env=dict(props.get("env") or {}), ports=tuple(ports),
            disk_gb=int(float(props.get("disk_gb") or 60)), ssh=props.get("connection") == "ssh",
            min_cuda=str(props.get("min_cuda") or ""), registry=str(props.get("registry") or ""),
            ssh_keys=tuple(str(k) for k in props.get("ssh_keys") or ()),
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
    @_operator_errors("check")
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        props = {**DEFAULTS, **{k: v for k, v in news.items() if v is not None or k not in DEFAULTS}}
        failures = []

        def fail(prop: str, reason: str) -> None:
            failures.append(CheckFailure(prop, reason))

        if _known(props.get("provider_kind")) and props.get("provider_kind") != self.kind:
            fail("provider_kind", f"this provider rents on {self.kind!r}, not {props.get('provider_kind')!r}")
        for prop in ("name", "gpu_type", "image", "project", "stack"):
            if _known(props.get(prop)) and not props.get(prop):
                fail(prop, "is required")
        for prop in ("name", "project", "stack"):
            if _known(props.get(prop)) and LABEL_SEP in str(props.get(prop) or ""):
                fail(prop, f"must not contain {LABEL_SEP!r} (it separates the parts of the lease's label)")
        for prop, least in WHOLE.items():
            value = props.get(prop)
            if not _known(value):
                continue
            n = whole(value)
            if n is None or n < least:
                fail(prop, f"must be a whole number >= {least}, got {value!r}")
            else:
                props[prop] = n
        cap = props.get("price_cap")
        if _known(cap):
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0:
                fail("price_cap", "a lease needs a positive price cap per GPU-hour (set the provider's "
                                  "price_cap_per_gpu_hour); nothing is rented without one")
            else:
                props["price_cap"] = float(cap)
        if _known(props.get("connection")) and props.get("connection") not in ("container", "ssh"):
            fail("connection", "must be 'container' or 'ssh'")
        ports = props.get("ports")
        if _known(ports):
            for spec in ports or []:
                if not (isinstance(spec, str) and spec.partition("/")[0].isdigit()
                        and spec.partition("/")[2] in ("tcp", "udp", "http")):
                    fail("ports", f"{spec!r} is not PORT/tcp|udp|http")
        if props.get("tls_name") is not None:
            self._check_tls(props, fail)
        keys = props.get("ssh_keys")
        if _known(keys):
            if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) and k.strip() for k in keys):
                fail("ssh_keys", "must be a list of OpenSSH public keys")
            else:
                props["ssh_keys"] = [k.strip() for k in keys]
        known = all(_known(props.get(k, DEFAULTS.get(k))) for k in REPLACE_ON)
        if not failures:
            props["label"] = lease_label(props) if known else rpc.UNKNOWN
        return CheckResult(props, failures)

    @staticmethod
    def _check_tls(props: dict[str, Any], fail: Callable[[str, str], None]) -> None:
        """The mTLS channel's inputs; sets ``tls_epoch`` (the certificate's renewal period)."""
        for prop in ("tls_name", "tls_ca", "tls_ca_key"):
            value = props.get(prop)
            if _known(value) and not (isinstance(value, str) and value.strip()):
                fail(prop, "is required on the mtls channel")
        if _known(props.get("tls_ca")) and "BEGIN CERTIFICATE" not in str(props.get("tls_ca") or ""):
            fail("tls_ca", "must be the stack CA's PEM certificate")
        if _known(props.get("connection")) and props.get("connection") != "container":
            fail("tls_name", "the mtls channel is for container leases (SSH hosts join the WireGuard mesh)")
        if _known(props.get("ports")) and tls_port(props) is None:
            fail("ports", "an mtls lease publishes the port its worker serves (PORT/tcp)")
        days, renew = props.get("tls_days"), props.get("tls_renew_days")
        if not (_known(days) and _known(renew)):
            props["tls_epoch"] = rpc.UNKNOWN
            return
        d, r = whole(days), whole(renew)
        if d is None or d < 1:
            fail("tls_days", f"must be a whole number >= 1, got {days!r}")
        elif r is None or not 0 <= r < d:
            fail("tls_renew_days", f"must be a whole number from 0 to tls_days - 1, got {renew!r}")
        else:
            props["tls_days"], props["tls_renew_days"] = d, r
            props["tls_epoch"] = tls_epoch(d, r)

    @_operator_errors("diff")
    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        def differs(key: str) -> bool:
            new = news.get(key, DEFAULTS.get(key))
            if not _known(new):
                return True         # not known until the update: it may change
            if key in ("project", "stack") and key not in olds:
                return False        # a lease rented by provider_version 1 (bare-name label): not a new lease
            return _norm(key, olds.get(key, DEFAULTS.get(key))) != _norm(key, new)

        replaces = [k for k in REPLACE_ON if differs(k)]
        updates = [k for k in UPDATE_ON if differs(k)]
        # The new lease has a new label (its generation), so it is rented before the old one goes.
        return DiffResult(changes=bool(replaces or updates), replaces=replaces,
                          stables=[k for k in REPLACE_ON if k not in replaces], delete_before_replace=False)

    @_operator_errors("create")
    def create(self, props: dict[str, Any]) -> CreateResult:
        adapter = self.adapter(props)
        request = self.request(props)
        hint = f"infermesh leases audit --stack {props.get('stack')}"
        mtls = props.get("tls_name") is not None
        if mtls:
            from fleet.marketplaces.worker_tls import bootstrap_env

            # the CA's certificate and the lease's one-time token: the env holds nothing else of the channel
            request = dataclasses.replace(request, env={**request.env, **bootstrap_env(
                str(props["tls_ca"]), str(props["tls_ca_key"]), request.label)})
        if request.ssh and request.ssh_keys:
            adapter.register_ssh_keys(request.ssh_keys)        # before the host starts: it takes the account's keys
        wait_s = float(props.get("wait_s") or 0)
        state = adapter.rent(request, wait_s=wait_s, audit_hint=hint)
        if mtls:
            state = self._deliver_certificate(adapter, props, state, request.label, wait_s, hint)
        return CreateResult(id_=state.lease_id, outs={**props, "label": state.label or props.get("label"),
                                                      **self.outputs(state)})

    @staticmethod
    def _deliver_certificate(adapter, props: Mapping[str, Any], state, label: str, wait_s: float, hint: str):  # noqa: ANN001, ANN205
        """Sign the worker's own key's request for the lease's name and push it (worker_tls.deliver);
        a lease whose worker does not take it is given back."""
        from fleet.marketplaces import MarketplaceError
        from fleet.marketplaces.worker_tls import BootstrapFailed, bootstrap_token, deliver

        port = tls_port(props)
        try:
            if state.status != "running":
                state = adapter.wait_running(state.lease_id, max(wait_s, 60.0))
            endpoint = state.endpoint(port, "tcp") if port else None
            if endpoint is None:
                raise BootstrapFailed(f"{adapter.kind}: lease {state.lease_id} runs but forwards no port {port}/tcp "
                                      "to reach its worker", retryable=False)
            deliver(endpoint.host, endpoint.port, token=bootstrap_token(str(props["tls_ca_key"]), label),
                    ca_cert_pem=str(props["tls_ca"]), ca_key_pem=str(props["tls_ca_key"]), name=str(props["tls_name"]),
                    days=int(whole(props.get("tls_days")) or 1), timeout_s=max(wait_s, 60.0),
                    poll_s=adapter.poll_s, sleep=adapter.sleep)
        except MarketplaceError as e:
            raise adapter.abandon(state.lease_id, label, "its worker did not take its TLS certificate", e,
                                  hint) from None
        return state

    @_operator_errors("read")
    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        from fleet.marketplaces import MarketplaceError, NotFound

        adapter = self.adapter(props)
        try:
            state = adapter.status(id_)
        except NotFound:
            return ReadResult(None, {})
        if state.status == "dead":
            # It serves nothing and may still bill (storage): give it back, then let the stack forget it,
            # so the next `pulumi up` rents a replacement.
            try:
                adapter.destroy(id_)
            except MarketplaceError:
                pass        # still labelled: the next create under this label or `leases audit` ends it
            return ReadResult(None, {})
        return ReadResult(id_, {**props, **self.outputs(state)})

    @_operator_errors("update")
    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        from fleet.marketplaces import PriceAboveCap

        adapter = self.adapter(news)
        request = self.request(news)
        if request.ssh and request.ssh_keys:
            adapter.register_ssh_keys(request.ssh_keys)        # a key added since: on the account for new hosts
        state = adapter.status(id_)
        cap, price = news.get("price_cap"), state.price_per_hour
        count = whole(news.get("gpu_count")) or 1
        if cap is not None and price is not None and price / count > float(cap) + 1e-9:
            raise PriceAboveCap(f"lease {state.lease_id} bills {price / count:.4f}/GPU-hour, above the new cap "
                                f"{float(cap):.4f}", provider=self.kind)
        # The lease keeps the label it was rented under (a lease from provider_version 1 has the bare name).
        label = state.label or olds.get("label") or olds.get("name")
        return UpdateResult({**olds, **news, "label": label, **self.outputs(state)})

    @_operator_errors("delete")
    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self.adapter(props).destroy(id_)


class VastAiLeaseProvider(LeaseProvider):
    kind = "vastai"


class RunPodLeaseProvider(LeaseProvider):
    kind = "runpod"


class AkashLeaseProvider(LeaseProvider):
    kind = "akash"


# listed from the table of provider kinds (fleet/kinds.py); each keeps its own class, for its own Pulumi state
LEASE_PROVIDERS: dict[str, type[LeaseProvider]] = {
    k: {"vastai": VastAiLeaseProvider, "runpod": RunPodLeaseProvider, "akash": AkashLeaseProvider}[k]
    for k in LEASED_KINDS
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
    label: pulumi.Output[str]

    def __init__(self, name: str, provider: LeaseProvider, props: dict[str, Any],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(provider, name, {**props, "label": None, **{k: None for k in OUTPUTS}}, opts)


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
    """Environment of the container; secret (on the WireGuard channel it holds the worker's mesh key; on
    the mTLS channel nothing secret: the provider adds the CA certificate and the bootstrap token)."""
    ports: NotRequired[pulumi.Input[Sequence[str]]]
    """Container ports to publish, ``PORT/tcp|udp|http``: the worker API on the mTLS channel (the first
    TCP port), WireGuard's UDP port and SSH otherwise."""
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
    min_cuda: NotRequired[pulumi.Input[str]]
    """Lowest CUDA version the image needs from the host (default 12.9, the worker image's)."""
    registry: NotRequired[pulumi.Input[str]]
    """Private registry access (secret): Vast ``image_login`` text or a RunPod registry credential id."""
    ssh_keys: NotRequired[pulumi.Input[Sequence[str]]]
    """SSH hosts: the operator's OpenSSH public keys, added to the marketplace account's keys (RunPod)."""
    tls_name: NotRequired[pulumi.Input[str]]
    """On the mTLS channel: the name the worker's certificate carries (fleet.channel.worker_server_name)."""
    tls_ca: NotRequired[pulumi.Input[str]]
    """On the mTLS channel: the stack CA's PEM certificate (public; the worker gets it in its env)."""
    tls_ca_key: NotRequired[pulumi.Input[str]]
    """On the mTLS channel: the stack CA's PEM key (secret), which signs the worker's own key's request."""
    tls_days: NotRequired[pulumi.Input[int]]
    """On the mTLS channel: the worker certificate's validity in days."""
    tls_renew_days: NotRequired[pulumi.Input[int]]
    """On the mTLS channel: the lease is replaced before its certificate is this close to its end."""
    project: NotRequired[str]
    """The Pulumi project, for the label (default: the running program's)."""
    stack: NotRequired[str]
    """The Pulumi stack, for the label (default: the running program's)."""


class GpuLease(pulumi.ComponentResource):
    """One plan lease, rented idempotently under its stack-scoped label, with its endpoint and SSH address as outputs.

    A replacement is created before the old lease is deleted (the new one has a new label); ``opts``
    may carry ``depends_on`` to pace a pool's replacements (WorkerFleet's surge)."""

    lease_id: pulumi.Output[str]
    status: pulumi.Output[str]
    endpoint_host: pulumi.Output[str | None]
    endpoint_port: pulumi.Output[int | None]
    ssh_host: pulumi.Output[str | None]
    ssh_port: pulumi.Output[int | None]
    ssh_user: pulumi.Output[str]
    label: pulumi.Output[str]

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
            "project": args.get("project") or pulumi.get_project(), "stack": args.get("stack") or pulumi.get_stack(),
            **{k: args.get(k, DEFAULTS[k]) for k in ("countries", "args", "ports", "disk_gb", "connection",
                                                     "price_per_gpu_hour", "base_url", "wait_s", "min_cuda")},
            "env": pulumi.Output.secret(args.get("env", {})),
            "registry": pulumi.Output.secret(args.get("registry", "")),
            "provider_version": PROVIDER_VERSION,
        }
        if args.get("ssh_keys"):
            props["ssh_keys"] = args["ssh_keys"]
        if args.get("tls_name") is not None:
            missing = [k for k in ("tls_ca", "tls_ca_key", "tls_days", "tls_renew_days") if args.get(k) is None]
            if missing:
                raise ValueError(f"GpuLease {name}: tls_name without {', '.join(missing)}")
            props.update({k: args[k] for k in ("tls_name", "tls_ca", "tls_days", "tls_renew_days")},
                         tls_ca_key=pulumi.Output.secret(args["tls_ca_key"]))
        # A lease waits for the leases its component waits for (WorkerFleet's surge), resource to resource.
        waits = opts.depends_on if opts is not None and opts.depends_on is not None else []
        waits = [w.resource if isinstance(w, GpuLease) else w
                 for w in (waits if isinstance(waits, (list, tuple)) else [waits])]
        self.resource = GpuLeaseResource(
            f"{name}-lease", provider, props,
            pulumi.ResourceOptions(parent=self, delete_before_replace=False, depends_on=waits,
                                   additional_secret_outputs=["env", "registry", "tls_ca_key"]))
        self.label = self.resource.label
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
            "ssh_user": self.ssh_user, "label": self.label,
        })
