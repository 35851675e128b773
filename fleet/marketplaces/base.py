"""The marketplace adapter interface, its typed records, its errors and the shared HTTP plumbing.

Every GPU marketplace adapter (fleet/marketplaces/<kind>.py) subclasses :class:`Marketplace`
and implements five small methods against the marketplace's documented API
(docs/marketplace-apis.md): ``search``, ``find``, ``status``, ``destroy`` and ``_launch``.
The base class builds the rest on them, the same way for every marketplace:

- ``create(request)`` is idempotent: the lease's deterministic label (the plan's ``Lease.name``)
  is looked up first, so a retried ``pulumi up`` finds the lease it already rented instead of
  renting a second one. Offers come cheapest first and never above the price cap; an offer that
  vanishes between search and create (``OutOfCapacity``) moves on to the next one.
- ``wait_running(lease_id)`` polls until the lease serves, and raises ``LeaseDied`` when the
  marketplace reports it dead (status normalized to ``pending | running | dead``).

Errors carry decisions, not just messages (SkyPilot's style): callers read ``retryable``
(the same call may succeed later), ``failover`` (another offer or provider may succeed) and
``fix`` (what the operator has to do), never the message text.

Where an adapter relies on a behaviour the marketplace does not document (marked [U] in the adapter),
the fake that tests it lists the same guess under GUESSES in tests/fakes/marketplaces.py: one list.

HTTP is a small synchronous client on ``urllib.request``: Pulumi dynamic providers are
synchronous and run serialized in another process, so each method builds its client inside
and no event loop or extra dependency is needed. It retries 429, 5xx and connection errors
with exponential backoff and full jitter, honours ``Retry-After``, and maps each marketplace's
error shape to the classes below.
"""

from __future__ import annotations

import email.utils
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Status = Literal["pending", "running", "dead"]


# ---- errors that carry decisions ------------------------------------------------------------------

class MarketplaceError(Exception):
    """Base of every adapter error. Read the attributes, not the message."""

    retryable: bool = False     # the same call may succeed later (backoff and retry)
    failover: bool = True       # another offer or another provider may succeed
    fix: str = ""               # what an operator has to change, when retrying cannot help

    def __init__(self, message: str, *, provider: str = "", status: int | None = None,
                 failover_history: list[Exception] | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        # Copied so that a caller's list is never shared (and mutated) between errors.
        self.failover_history: list[Exception] = list(failover_history or [])


class NoOffers(MarketplaceError):
    """Nothing on the market matches the request (GPU type, count, region). Fail over."""

    fix = "widen the pool's regions or GPU type, or let another provider carry it"


class PriceAboveCap(NoOffers):
    """Offers exist, but every one costs more than the cap. Never rented; fail over or raise the cap."""

    fix = "raise the provider's price_cap_per_gpu_hour or let another provider carry the pool"

    def __init__(self, message: str, *, cheapest_per_gpu_hour: float | None = None,
                 cap_per_gpu_hour: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.cheapest_per_gpu_hour = cheapest_per_gpu_hour
        self.cap_per_gpu_hour = cap_per_gpu_hour


class OutOfCapacity(MarketplaceError):
    """The offer was taken or the market ran dry between search and create. Try the next offer."""

    retryable = True


class AuthFailed(MarketplaceError):
    """401/403: the key is wrong, expired or lacks scope. Retrying or failing over cannot fix it."""

    failover = False
    fix = "set a valid key: pulumi config set --secret infermesh:<credentials> ..."


class RateLimited(MarketplaceError):
    """429 after every retry. ``retry_after`` is the marketplace's own hint in seconds, if it gave one."""

    retryable = True
    failover = False

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class LeaseDied(MarketplaceError):
    """The lease reached a state it never comes back from (exited, ERROR, closed). Replace it."""

    def __init__(self, message: str, *, lease_id: str = "", raw_status: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.lease_id = lease_id
        self.raw_status = raw_status


class ProviderError(MarketplaceError):
    """Anything else the marketplace answered: a 4xx we sent wrong (a bug: not retryable), a 5xx
    that outlived the retries, a timeout, a response whose shape changed."""

    def __init__(self, message: str, *, retryable: bool = False, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retryable = retryable


class NotFound(ProviderError):
    """404 on a lease we asked about: it is gone (destroy treats this as done)."""


class LeaseAbandoned(MarketplaceError):
    """A lease was rented, then something failed before it could be handed to the stack (the wait for
    running timed out, the status call failed, it bills above the cap). ``terminated`` says whether
    it was given back; when it was not, it keeps its label, so the next create adopts it and
    ``infermesh leases audit --terminate`` finds it."""

    retryable = True

    def __init__(self, message: str, *, lease_id: str, label: str, terminated: bool, cause: Exception,
                 fix: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.lease_id = lease_id
        self.label = label
        self.terminated = terminated
        self.cause = cause
        self.fix = fix or getattr(cause, "fix", "") or "run `pulumi up` again"


class UnknownGpuType(NoOffers):
    """The marketplace has no GPU of this type under any name we know."""

    fix = "give the pool a GPU type this marketplace rents, or move it to another provider"


class ModelUnavailable(NoOffers):
    """An OpenAI-compatible upstream does not list the model the stack routes to it."""

    fix = "check the model id against the upstream's /v1/models, or drop the pool"


# ---- typed records ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Port:
    """A container port to publish: ``8000/tcp``, ``22/tcp``, ``51820/udp``."""

    port: int
    proto: Literal["tcp", "udp", "http"] = "tcp"


@dataclass(frozen=True)
class LeaseRequest:
    """What to rent: the input record of every adapter (one per plan ``Lease``)."""

    # Deterministic label (the plan's lease name): what makes create idempotent.
    label: str
    # The plan's GPU type (``RTX4090``, ``H100``, ...); each adapter maps it to its own names.
    gpu_type: str
    gpu_count: int
    image: str
    # Highest acceptable price per GPU-hour in USD; None refuses to rent at all (no blank cheques).
    price_cap_per_gpu_hour: float | None
    # The plan's region, and the ISO country codes it stands for (empty: anywhere).
    region: str = ""
    countries: tuple[str, ...] = ()
    # Arguments to the image's ENTRYPOINT (vLLM's server flags); the entrypoint is kept.
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # Container ports to publish. Workers publish no API port: they dial the gateways over the mesh.
    ports: tuple[Port, ...] = ()
    disk_gb: int = 50
    # An SSH-reachable host (bootstrapped by Ansible) instead of a container running ``args``.
    ssh: bool = False
    # The lowest CUDA version the image needs from the host's driver ("12.9"; "" for any).
    min_cuda: str = ""
    # Private image registry: Vast's ``image_login`` ("-u USER -p TOKEN HOST"), RunPod's registry
    # credential id; "" for a public image.
    registry: str = field(default="", repr=False)
    # SSH hosts: the operator's OpenSSH public keys, added to the account's keys where the marketplace
    # injects account keys into a host (RunPod); never one removed.
    ssh_keys: tuple[str, ...] = ()

    def cap_total(self) -> float | None:
        return None if self.price_cap_per_gpu_hour is None else self.price_cap_per_gpu_hour * self.gpu_count


@dataclass(frozen=True)
class Offer:
    """One thing the market would rent us, normalized."""

    provider_kind: str
    offer_id: str                   # what create takes: Vast ask id, RunPod GPU type id, Akash bid id
    gpu_type: str                   # ours
    gpu_name: str                   # theirs
    gpu_count: int
    price_per_hour: float           # USD/h for the whole offer (all GPUs, storage included where priced)
    region: str = ""                # country code or data center, as the market names it
    reliability: float | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def price_per_gpu_hour(self) -> float:
        return self.price_per_hour / max(self.gpu_count, 1)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    scheme: str = "tcp"             # tcp | udp | https (a provider's HTTPS proxy)


@dataclass(frozen=True)
class LeaseState:
    """A lease as the marketplace reports it, normalized."""

    provider_kind: str
    lease_id: str
    label: str
    status: Status
    raw_status: str                 # the marketplace's own word, for messages and logs
    price_per_hour: float | None = None
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)   # "8000/tcp" -> public host:port
    ssh: Endpoint | None = None
    ssh_user: str = "root"
    message: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def endpoint(self, port: int, proto: str = "tcp") -> Endpoint | None:
        return self.endpoints.get(f"{port}/{proto}")


# ---- HTTP plumbing (once, for every adapter) -------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5               # tries in all, the first included
    base_s: float = 0.5             # backoff: min(cap, base x 2^n) with full jitter
    cap_s: float = 30.0
    max_retry_after_s: float = 300.0   # a Retry-After beyond this is not waited for: raise RateLimited


@dataclass(frozen=True)
class Response:
    status: int
    body: Any                       # parsed JSON, or text when the body is not JSON, or None
    headers: Mapping[str, str]


_NO_BODY = object()
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})

Classifier = Callable[[int, Any, Mapping[str, str]], "MarketplaceError | None"]


def error_message(body: Any) -> str:
    """The human part of the error shapes in marketplace-apis.md (Vast ``msg``, RFC 9457 ``detail``,
    Akash ``message``, OpenAI ``error.message``, GraphQL ``errors[0].message``, or plain text)."""
    if isinstance(body, dict):
        for key in ("msg", "detail", "message", "title"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str) and err:
            return err
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message", errors[0]))
        return json.dumps(body)[:300]
    if isinstance(body, str):
        return body.strip()[:300]
    return ""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def default_classify(provider: str, status: int, body: Any, headers: Mapping[str, str]) -> MarketplaceError:
    msg = error_message(body) or f"HTTP {status}"
    text = f"{provider}: HTTP {status}: {msg}"
    if status in (401, 403):
        return AuthFailed(text, provider=provider, status=status)
    if status == 429:
        return RateLimited(text, provider=provider, status=status,
                           retry_after=parse_retry_after(headers.get("Retry-After")))
    if status == 404:
        return NotFound(text, provider=provider, status=status)
    return ProviderError(text, provider=provider, status=status, retryable=status >= 500)


class HttpClient:
    """JSON over HTTP with auth, timeouts, retries and error mapping. One per adapter call."""

    def __init__(self, base_url: str, *, provider: str, headers: Mapping[str, str],
                 classify: Classifier | None = None, retry: RetryPolicy | None = None,
                 timeout_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.provider = provider
        self.headers = {"Accept": "application/json", "User-Agent": "infermesh-fleet/0.1", **headers}
        self.classify = classify
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.rng = rng or random.Random()

    def _url(self, path: str, params: Mapping[str, Any] | None) -> str:
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        if params:
            clean = {k: v for k, v in params.items() if v is not None}
            if clean:
                url += ("&" if "?" in url else "?") + urllib.parse.urlencode(clean)
        return url

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform(0, min(cap, base x 2^attempt)) (AWS architecture blog)."""
        return self.rng.uniform(0, min(self.retry.cap_s, self.retry.base_s * (2 ** attempt)))

    def _once(self, method: str, url: str, data: bytes | None) -> Response:
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw, status, hdrs = resp.read(), resp.status, resp.headers
        except urllib.error.HTTPError as e:
            raw, status, hdrs = e.read(), e.code, e.headers
        text = raw.decode("utf-8", "replace") if raw else ""
        try:
            body: Any = json.loads(text) if text else None
        except json.JSONDecodeError:
            body = text
        return Response(status, body, {k: v for k, v in (hdrs or {}).items()})

    def request(self, method: str, path: str, *, json_body: Any = _NO_BODY,
                params: Mapping[str, Any] | None = None, ok: tuple[int, ...] = (200, 201, 202, 204),
                expect_json: bool = True) -> Response:
        """Send, retrying what is safe to retry; return the response or raise the mapped error.

        Non-idempotent calls (POST/PUT: create) are retried only when the marketplace says it
        did nothing (429, 503) or the connection was refused, never after a timeout or a 500,
        so one ``create`` never rents twice; the caller's label lookup covers the rest."""
        method = method.upper()
        url = self._url(path, params)
        data = None if json_body is _NO_BODY else json.dumps(json_body).encode()
        idempotent = method in IDEMPOTENT_METHODS
        last: MarketplaceError | None = None
        for attempt in range(self.retry.attempts):
            wait: float | None = None
            try:
                resp = self._once(method, url, data)
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                refused = isinstance(reason, ConnectionRefusedError) or isinstance(e, ConnectionRefusedError)
                last = ProviderError(f"{self.provider}: {method} {path}: cannot connect ({reason})",
                                     provider=self.provider, retryable=True)
                if not (idempotent or refused):
                    raise last from None
            else:
                if resp.status in ok and not (expect_json and resp.status != 204 and isinstance(resp.body, str)):
                    return resp
                if resp.status in ok:
                    # 2xx with a body that is not JSON (cut off, an HTML error page): nothing to act on.
                    last = ProviderError(f"{self.provider}: {method} {path}: malformed answer (HTTP {resp.status}, "
                                         f"not JSON: {resp.body[:80]!r})", provider=self.provider,
                                         status=resp.status, retryable=True)
                    if not idempotent:
                        raise last
                    if attempt + 1 >= self.retry.attempts:
                        break
                    self.sleep(self.backoff(attempt))
                    continue
                err = (self.classify(resp.status, resp.body, resp.headers) if self.classify else None) \
                    or default_classify(self.provider, resp.status, resp.body, resp.headers)
                if resp.status not in RETRYABLE_STATUS or not isinstance(err, (RateLimited, ProviderError)) \
                        or not err.retryable:
                    raise err
                if not idempotent and resp.status not in (429, 503):
                    raise err
                last = err
                hint = parse_retry_after(resp.headers.get("Retry-After"))
                if hint is not None:
                    if hint > self.retry.max_retry_after_s:
                        raise RateLimited(f"{err} (Retry-After {hint:g}s is beyond the "
                                          f"{self.retry.max_retry_after_s:g}s we wait)",
                                          provider=self.provider, status=resp.status, retry_after=hint)
                    wait = hint
            if attempt + 1 >= self.retry.attempts:
                break
            self.sleep(wait if wait is not None else self.backoff(attempt))
        assert last is not None
        tries = self.retry.attempts
        if isinstance(last, RateLimited):
            raise RateLimited(f"{last} (gave up after {tries} tries)", provider=self.provider,
                              status=last.status, retry_after=last.retry_after)
        raise ProviderError(f"{last} (gave up after {tries} tries)", provider=self.provider,
                            status=last.status, retryable=True)


_LISTINGS: dict[tuple[str, str, str], dict[str, LeaseState]] = {}
_LISTINGS_LOCK = threading.Lock()


_POLLERS: dict[tuple[str, str, str], dict[str, Any]] = {}
_POLL_LOCK = threading.Lock()


def forget_listings() -> None:
    """Drop every cached listing and poller (what a new process starts with)."""
    with _LISTINGS_LOCK:
        _LISTINGS.clear()
    with _POLL_LOCK:
        _POLLERS.clear()


# ---- the adapter interface ----------------------------------------------------------------------------

class Marketplace(ABC):
    """A GPU marketplace: search offers, rent one idempotently, read it, give it back.

    ``base_url`` points the adapter at the real API or at a fake (tests/fakes/marketplaces.py).
    ``sleep`` is injectable so that tests of backoff and polling take no wall time.
    """

    kind: ClassVar[str]
    default_base_url: ClassVar[str]
    shared_poll: ClassVar[bool] = False     # wait_running shares one listing per round (see ``poll``)

    def __init__(self, api_key: str, base_url: str | None = None, *, retry: RetryPolicy | None = None,
                 timeout_s: float = 30.0, poll_s: float = 5.0, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        if not api_key:
            raise AuthFailed(f"{self.kind}: no API key", provider=self.kind)
        self.api_key = api_key
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.poll_s = poll_s
        self.sleep = sleep
        self.http = HttpClient(self.base_url, provider=self.kind, headers=self.auth_headers(),
                               classify=self.classify, retry=retry, timeout_s=timeout_s, sleep=sleep, rng=rng)

    def __repr__(self) -> str:          # never the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- what each marketplace implements --
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def classify(self, status: int, body: Any, headers: Mapping[str, str]) -> MarketplaceError | None:
        """Marketplace-specific error shapes; None falls back to :func:`default_classify`."""
        return None

    @abstractmethod
    def search(self, request: LeaseRequest) -> list[Offer]:
        """Offers that fit, cheapest first, none above the cap. Raises NoOffers / PriceAboveCap."""

    @abstractmethod
    def status(self, lease_id: str) -> LeaseState:
        """Raises NotFound when the marketplace no longer knows the lease."""

    @abstractmethod
    def destroy(self, lease_id: str) -> None:
        """Give the lease back. Idempotent: a lease already gone is not an error."""

    @abstractmethod
    def _launch(self, request: LeaseRequest, offer: Offer) -> str:
        """Rent this offer; return the lease id. Raises OutOfCapacity when the offer is gone."""

    def register_ssh_keys(self, keys: tuple[str, ...] | list[str]) -> list[str]:
        """Make sure the account holds these SSH public keys for the SSH hosts it starts; the keys added
        (none where the marketplace has no account keys, or they are all there). Never removes one."""
        return []

    # -- one listing per marketplace account per process --
    def _listing_key(self) -> tuple[str, str, str]:
        import hashlib

        return (self.kind, self.base_url, hashlib.sha256(self.api_key.encode()).hexdigest()[:16])

    def listing(self, fresh: bool = False) -> list[LeaseState]:
        """The account's leases, listed once per process (a ``pulumi up`` runs its provider in one
        process, and Vast limits calls per endpoint): what this process rents or gives back is kept up
        to date in it, and each lease found in it is read back before it is trusted."""
        key = self._listing_key()
        with _LISTINGS_LOCK:
            cached = _LISTINGS.get(key)
        if cached is not None and not fresh:
            return list(cached.values())
        states = self.leases()
        with _LISTINGS_LOCK:
            _LISTINGS[key] = {s.lease_id: s for s in states}
        return states

    def _remember(self, state: LeaseState) -> None:
        with _LISTINGS_LOCK:
            if self._listing_key() in _LISTINGS:
                _LISTINGS[self._listing_key()][state.lease_id] = state

    def _forget(self, lease_id: str) -> None:
        with _LISTINGS_LOCK:
            _LISTINGS.get(self._listing_key(), {}).pop(str(lease_id), None)

    def find(self, label: str, fresh: bool = False) -> LeaseState | None:
        """The lease under this label (a live one first), each candidate read back by id."""
        found = []
        for candidate in [s for s in self.listing(fresh) if s.label == label]:
            try:
                found.append(self.status(candidate.lease_id))
            except NotFound:
                self._forget(candidate.lease_id)
        live: list[LeaseState | None] = [s for s in found if s.status != "dead"]
        return (live or found or [None])[0]

    def leases(self) -> list[LeaseState]:
        """Every lease of this account the marketplace lists (for ``find`` and ``infermesh leases audit``)."""
        raise NotImplementedError(f"{self.kind}: listing leases is not implemented")

    def leases_labelled(self, prefix: str) -> list[LeaseState]:
        """The leases (dead ones too: they may still bill storage) whose label starts with ``prefix``."""
        return [s for s in self.leases() if s.label.startswith(prefix)]

    # -- built on them, the same for every marketplace --
    def create(self, request: LeaseRequest) -> LeaseState:
        """Rent one lease under ``request.label``, or adopt the live one already under it.

        A create call whose outcome is unknown (no answer, a 5xx, a malformed answer: it may have
        rented) is followed by a lookup of the label; what it finds is given back before the error is
        raised, so a failed create never leaves a lease behind and a retried one never rents twice."""
        if not request.label:
            raise ValueError("a lease request needs a label (the plan's lease name)")
        existing = self.find(request.label)
        if existing is not None and existing.status != "dead":
            return existing
        if existing is not None:
            # A dead lease under our label serves nothing and may still bill storage.
            self.destroy(existing.lease_id)
            self._forget(existing.lease_id)
        offers = self.search(request)
        history: list[Exception] = []
        for offer in offers:
            check_price(self.kind, request, offer)
            try:
                lease_id = self._launch(request, offer)
            except OutOfCapacity as e:
                history.append(e)
                continue
            except MarketplaceError as e:
                if maybe_rented(e):
                    self._reap(request.label, e)
                raise
            self._remember(LeaseState(self.kind, lease_id, request.label, "pending", "rented"))
            try:
                return self.status(lease_id)
            except MarketplaceError as e:
                raise self.abandon(lease_id, request.label, "reading the new lease back failed", e) from None
        raise OutOfCapacity(f"{self.kind}: all {len(offers)} offers for {request.label} were taken before we "
                            "could rent one", provider=self.kind, failover_history=history)

    def rent(self, request: LeaseRequest, wait_s: float = 900.0, audit_hint: str = "") -> LeaseState:
        """create, then wait until it runs and check what it bills; a lease that fails any of these after it
        was rented is given back (``LeaseAbandoned`` says whether that worked)."""
        state = self.create(request)
        try:
            if wait_s > 0 and state.status != "running":
                state = self.wait_running(state.lease_id, wait_s)
            cap = request.cap_total()
            if cap is not None and state.price_per_hour is not None and state.price_per_hour > cap + 1e-9:
                raise PriceAboveCap(f"{self.kind}: lease {state.lease_id} bills {state.price_per_hour:.4f}/h, above "
                                    f"the cap {cap:.4f}/h for {request.gpu_count} GPU(s)", provider=self.kind,
                                    cheapest_per_gpu_hour=state.price_per_hour / max(request.gpu_count, 1),
                                    cap_per_gpu_hour=request.price_cap_per_gpu_hour)
        except MarketplaceError as e:
            what = "it did not start" if not isinstance(e, PriceAboveCap) else "it bills above the cap"
            raise self.abandon(state.lease_id, request.label, what, e, audit_hint) from None
        return state

    def abandon(self, lease_id: str, label: str, what: str, cause: Exception, audit_hint: str = "") -> LeaseAbandoned:
        """Give back a lease that was rented but cannot be handed over; the error says whether that worked."""
        try:
            self.destroy(lease_id)
            self._forget(lease_id)
        except MarketplaceError as e:
            hint = audit_hint or "infermesh leases audit --stack <stack>"
            return LeaseAbandoned(
                f"{self.kind}: rented lease {lease_id} ({label}), then {what} ({cause}); terminating it ALSO "
                f"failed ({e}), so it may still bill", lease_id=lease_id, label=label, terminated=False,
                cause=cause, provider=self.kind,
                fix=f"the next `pulumi up` adopts it by its label, or `{hint} --terminate` ends it")
        return LeaseAbandoned(f"{self.kind}: rented lease {lease_id} ({label}), then {what} ({cause}); terminated "
                              "it, nothing of it bills", lease_id=lease_id, label=label, terminated=True,
                              cause=cause, provider=self.kind,
                              fix=getattr(cause, "fix", "") or "run `pulumi up` again (it rents afresh)")

    def _reap(self, label: str, cause: MarketplaceError) -> None:
        """After a create call that may have rented: give back whatever now carries the label."""
        try:
            found = self.find(label, fresh=True)
            if found is not None:
                self.destroy(found.lease_id)
                self._forget(found.lease_id)
                cause.args = (f"{cause.args[0]}; a lease {found.lease_id} had been rented under {label} and was "
                              "terminated",)
        except MarketplaceError as e:
            cause.args = (f"{cause.args[0]}; whether a lease was rented under {label} could not be checked ({e}): "
                          "the next `pulumi up` adopts it, or `infermesh leases audit --terminate` ends it",)

    def poll(self, lease_id: str, seen: list[int]) -> LeaseState:
        """One look at a lease for ``wait_running``. With ``shared_poll``, every waiter of this process on
        this marketplace account shares one listing per round: the first waiter of a round lists the
        account once, the others read the same answer (``seen`` holds the listing generation this waiter
        last used; a listing without the lease, made before it was rented, is renewed). A lease the
        account's listing does not show is read by id."""
        if not self.shared_poll:
            return self.status(lease_id)
        with _POLL_LOCK:
            poller = _POLLERS.setdefault(self._listing_key(), {"generation": 0, "states": {}, "lock": threading.Lock()})
        with poller["lock"]:
            if poller["generation"] <= seen[0] or str(lease_id) not in poller["states"]:
                poller["states"] = {s.lease_id: s for s in self.leases()}
                poller["generation"] += 1
            seen[0] = poller["generation"]
            state = poller["states"].get(str(lease_id))
        return state if state is not None else self.status(lease_id)

    def wait_running(self, lease_id: str, timeout_s: float = 900.0) -> LeaseState:
        deadline = time.monotonic() + timeout_s
        waited = 0.0
        seen = [0]                  # no listing used yet
        while True:
            state = self.poll(lease_id, seen)
            if state.status == "running":
                return state
            if state.status == "dead":
                raise LeaseDied(f"{self.kind}: lease {state.label or lease_id} ({lease_id}) died: "
                                f"{state.raw_status}{': ' + state.message if state.message else ''}",
                                provider=self.kind, lease_id=lease_id, raw_status=state.raw_status)
            # Wall time, or the injected sleeps when they take none (tests).
            if time.monotonic() >= deadline or waited >= timeout_s:
                raise ProviderError(f"{self.kind}: lease {lease_id} still {state.raw_status} after {timeout_s:g}s",
                                    provider=self.kind, retryable=True)
            self.sleep(self.poll_s)
            waited += self.poll_s


def maybe_rented(err: MarketplaceError) -> bool:
    """A create call that failed this way may still have rented (no answer, a 5xx, a malformed answer)."""
    return (isinstance(err, ProviderError) and not isinstance(err, NotFound)
            and (err.status is None or err.status >= 500 or 200 <= err.status < 300))


def check_price(kind: str, request: LeaseRequest, offer: Offer) -> None:
    """The last guard before money is spent: never rent above the cap, and never without one."""
    cap = request.price_cap_per_gpu_hour
    if cap is None:
        raise PriceAboveCap(f"{kind}: {request.label} has no price cap; refusing to rent without one",
                            provider=kind, cheapest_per_gpu_hour=offer.price_per_gpu_hour)
    if offer.price_per_gpu_hour > cap + 1e-9:
        raise PriceAboveCap(f"{kind}: offer {offer.offer_id} costs {offer.price_per_gpu_hour:.4f}/GPU-hour, above "
                            f"the cap {cap:.4f} for {request.label}", provider=kind,
                            cheapest_per_gpu_hour=offer.price_per_gpu_hour, cap_per_gpu_hour=cap)


def select_under_cap(kind: str, request: LeaseRequest, offers: list[Offer]) -> list[Offer]:
    """Cheapest first and under the cap; NoOffers when the market is empty, PriceAboveCap when it is dear."""
    what = f"{request.gpu_count} x {request.gpu_type}" + (f" in {request.region}" if request.region else "")
    if not offers:
        raise NoOffers(f"{kind}: no offers for {what}", provider=kind)
    offers = sorted(offers, key=lambda o: (o.price_per_hour, o.offer_id))
    cap = request.price_cap_per_gpu_hour
    if cap is None:
        raise PriceAboveCap(f"{kind}: {request.label} has no price cap; refusing to rent without one",
                            provider=kind, cheapest_per_gpu_hour=offers[0].price_per_gpu_hour)
    fit = [o for o in offers if o.price_per_gpu_hour <= cap + 1e-9]
    if not fit:
        cheapest = offers[0].price_per_gpu_hour
        raise PriceAboveCap(f"{kind}: cheapest offer for {what} is {cheapest:.4f}/GPU-hour, above the cap "
                            f"{cap:.4f}; refusing to rent", provider=kind,
                            cheapest_per_gpu_hour=cheapest, cap_per_gpu_hour=cap)
    return fit


# Region names the plan uses -> ISO country codes, for marketplaces that filter by country.
REGION_COUNTRIES: dict[str, tuple[str, ...]] = {
    "eu-west": ("NL", "BE", "LU", "FR", "DE", "GB", "IE"),
    "eu-central": ("DE", "AT", "CH", "CZ", "PL"),
    "eu-north": ("SE", "NO", "FI", "DK", "IS"),
    "us-east": ("US", "CA"),
    "us-west": ("US", "CA"),
    "us-central": ("US",),
    "asia-east": ("JP", "KR", "TW", "HK", "SG"),
}


def countries_for(region: str, location: str = "") -> tuple[str, ...]:
    """Countries a plan region stands for: the table above, else a trailing ``, CC`` of its location."""
    if region in REGION_COUNTRIES:
        return REGION_COUNTRIES[region]
    tail = location.rsplit(",", 1)[-1].strip() if location else ""
    return (tail.upper(),) if len(tail) == 2 and tail.isalpha() else ()
