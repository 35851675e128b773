"""Akash Network through the Console managed-wallet API (marketplace-apis.md section 3).

Akash is a reverse auction: we publish an SDL manifest with a maximum price, providers bid,
we accept one bid as a lease and send the manifest. So ``create`` here is its own flow:

1. market check  GET  /v1/gpu-prices (no auth): the GPU model exists and is not dearer than the cap
2. deployment    POST /v1/deployments {"data": {"sdl"}} -> 201 {"data": {"dseq", "manifest"}} (no deposit:
                 the Console ignores it and funds every deployment itself)
3. bids          GET  /v1/bids?dseq=  polled until bids arrive (they take ~30 s on mainnet)
4. lease         POST /v1/leases {"manifest", "leases": [{"dseq","gseq","oseq","provider"}]}
                 for the cheapest open bid under the cap (the next one if it was lost meanwhile)
5. status        GET  /v1/deployments/{dseq}: ready when ``ready_replicas == total``;
                 endpoints from ``forwarded_ports`` (TCP) and ``ips`` (TCP and UDP); closed -> dead

If no acceptable bid arrives, the deployment is closed again and the error says why; a failure
after a bid was taken closes it too (``Marketplace.abandon``). Idempotency: Akash deployments
carry no label, so the SDL's placement group is named after the lease label
(``profiles.placement.<label>``). The Console's deployment list returns neither groups nor a name,
so ``leases`` reads each active deployment by dseq and takes the label from its stored SDL
(``consoleSettings.sdl``) **[U: that field path is from the IaC review, not the API docs we hold]**.
The placement requires providers audited by ``AUDITORS`` (``signedBy``).

What the SDL exposes (a decision, see ``sdl``): only the ports in the request, ``global: true``.
A container lease asks for the worker's port (vLLM on 8000, mutual TLS only: the gateways' client
certificate is required), an SSH lease for 22/tcp and the mesh's UDP port.

What the SDL holds: the provider that runs the lease, and the Console, keep the SDL, env included,
so nothing secret goes there. The Console API and the SDL reference document no way to pass a
secret apart from the env (no ``sealedSecrets`` field: the only "sealed secrets" Akash describes are
for its confidential-compute providers, in an unmerged docs change), so a worker makes its own TLS
key in its container and the env carries only the stack CA's certificate and a one-time bootstrap
token (fleet/marketplaces/worker_tls.py).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any, Mapping

import yaml

from fleet.marketplaces.base import (
    Endpoint,
    MarketplaceError,
    LeaseRequest,
    LeaseState,
    Marketplace,
    NoOffers,
    NotFound,
    Offer,
    OutOfCapacity,
    PriceAboveCap,
    ProviderError,
    maybe_rented,
    UnknownGpuType,
    select_under_cap,
)

SERVICE = "worker"
BLOCK_SECONDS = 6                     # Console's averageBlockTime
BLOCKS_PER_HOUR = 3600 // BLOCK_SECONDS
# Denoms priced 1:1 in USD micro-units: the managed wallet's `uact` and mainnet USDC (IBC).
USD_DENOMS = {"uact", "ibc/170C677610AC31DF0904FFE09CD3B5C657492170E7E52372E48756B71E56F2F1"}
PRICING_DENOM = "uact"
# Region values providers advertise as `location-region` [U: provider-chosen attribute values].
AKASH_REGIONS = {"us-west", "us-east", "us-central", "eu-west", "eu-central", "eu-east", "eu-north", "asia-east"}

# Providers must carry attributes signed by one of these auditors (the Akash auditor address as it
# appears in console bid.service.spec.ts; the ``signedBy`` syntax is [U] in marketplace-apis.md 3.1).
AUDITORS = ("akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63",)

# The plan's GPU types -> (Akash model attribute, VRAM) (lower-case model names, as the console templates).
GPU_MODELS: dict[str, tuple[str, str]] = {
    "H200": ("h200", "141Gi"), "H100": ("h100", "80Gi"), "A100-80G": ("a100", "80Gi"),
    "A100-40G": ("a100", "40Gi"), "L40S": ("l40s", "48Gi"), "A6000": ("rtxa6000", "48Gi"),
    "L4": ("l4", "24Gi"), "A10": ("a10", "24Gi"), "RTX4090": ("rtx4090", "24Gi"), "RTX3090": ("rtx3090", "24Gi"),
}


def usd_per_hour(denom: str, amount: str | float) -> float | None:
    """A bid's per-block price in USD/hour; None for denoms without a fixed USD value (uakt)."""
    if denom not in USD_DENOMS:
        return None
    try:
        return float(Decimal(str(amount)) * BLOCKS_PER_HOUR / Decimal(1_000_000))
    except InvalidOperation:
        return None


def max_amount_per_block(usd_per_hour_cap: float) -> int:
    return int(Decimal(str(usd_per_hour_cap)) * Decimal(1_000_000) / BLOCKS_PER_HOUR)


def sdl(request: LeaseRequest, *, cpu_per_gpu: int = 8, memory_gi_per_gpu: int = 32) -> str:
    """The SDL 2.0 manifest for one lease (one replica of one pool)."""
    if request.gpu_type not in GPU_MODELS:
        raise ValueError(f"akash: no Akash GPU model for GPU type {request.gpu_type!r}; known: {sorted(GPU_MODELS)}")
    cap = request.cap_total()
    if cap is None:
        raise PriceAboveCap(f"akash: {request.label} has no price cap; refusing to bid without one", provider="akash")
    model, ram = GPU_MODELS[request.gpu_type]
    ports = list(request.ports)
    if request.ssh and all(p.port != 22 for p in ports):
        from fleet.marketplaces.base import Port

        ports.append(Port(22, "tcp"))
    service: dict[str, Any] = {"image": request.image}
    if request.args and not request.ssh:
        service["args"] = list(request.args)
    if request.env:
        service["env"] = [f"{k}={v}" for k, v in sorted(request.env.items())]
    if ports:
        service["expose"] = [
            {"port": p.port, "as": p.port, **({"proto": "udp"} if p.proto == "udp" else {}),
             "to": [{"global": True}]}
            for p in ports
        ]
    placement: dict[str, Any] = {"pricing": {SERVICE: {"denom": PRICING_DENOM, "amount": max_amount_per_block(cap)}},
                                 "signedBy": {"anyOf": list(AUDITORS)}}
    if request.region in AKASH_REGIONS:
        placement["attributes"] = {"location-region": request.region}
    doc = {
        "version": "2.0",
        "services": {SERVICE: service},
        "profiles": {
            "compute": {SERVICE: {"resources": {
                "cpu": {"units": cpu_per_gpu * request.gpu_count},
                "memory": {"size": f"{memory_gi_per_gpu * request.gpu_count}Gi"},
                "storage": {"size": f"{request.disk_gb}Gi"},
                "gpu": {"units": request.gpu_count,
                        "attributes": {"vendor": {"nvidia": [{"model": model, "ram": ram}]}}},
            }}},
            "placement": {request.label: placement},
        },
        "deployment": {SERVICE: {request.label: {"profile": SERVICE, "count": 1}}},
    }
    return yaml.safe_dump(doc, sort_keys=False)


class Akash(Marketplace):
    kind = "akash"
    default_base_url = "https://console-api.akash.network"
    bid_wait_s: float = 90.0

    def auth_headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}

    # -- market data --
    def search(self, request: LeaseRequest) -> list[Offer]:
        """The market's view before any deposit: the model is listed, available, and not dearer than the cap.
        Real offers are bids, which exist only after a deployment (see ``create``)."""
        model, ram = GPU_MODELS.get(request.gpu_type, (None, None))
        if model is None:
            raise UnknownGpuType(f"akash: no Akash GPU model for GPU type {request.gpu_type!r}; known: "
                                 f"{sorted(GPU_MODELS)}", provider=self.kind)
        resp = self.http.request("GET", "/v1/gpu-prices")
        models = _field(resp.body, "models", list, "GET /v1/gpu-prices")
        rows = [m for m in models if m.get("vendor") == "nvidia" and m.get("model") == model
                and (m.get("ram") in (None, ram))]
        if not rows:
            raise NoOffers(f"akash: no provider lists nvidia {model} {ram}", provider=self.kind)
        available = sum(int((m.get("availability") or {}).get("available", 0)) for m in rows)
        offers = []
        for m in rows:
            price = m.get("price") or {}
            low = price.get("min")
            if low is not None and price.get("currency", "USD") == "USD":
                offers.append(Offer(self.kind, f"{model}-{m.get('interface') or 'any'}", request.gpu_type,
                                    f"nvidia {model} {m.get('ram') or ''}".strip(), request.gpu_count,
                                    float(low) * request.gpu_count, raw=m))
        if not offers:       # no market price published: let the bids decide
            offers.append(Offer(self.kind, f"{model}-any", request.gpu_type, f"nvidia {model}", request.gpu_count,
                                0.0))
        fit = select_under_cap(self.kind, request, offers)
        if available < request.gpu_count:
            raise OutOfCapacity(f"akash: {available} nvidia {model} available, {request.gpu_count} needed",
                                provider=self.kind)
        return fit

    # -- the auction --
    def create(self, request: LeaseRequest) -> LeaseState:
        existing = self.find(request.label)
        if existing is not None and existing.status != "dead":
            return existing
        if existing is not None:
            self.destroy(existing.lease_id)
        self.search(request)
        try:
            # No deposit: "Deprecated and ignored. The platform funds every deployment automatically."
            resp = self.http.request("POST", "/v1/deployments", json_body={"data": {"sdl": sdl(request)}},
                                     ok=(201, 200))
        except MarketplaceError as e:
            if maybe_rented(e):
                self._reap(request.label, e)
            raise
        data = _field(resp.body, "data", dict, "POST /v1/deployments")
        dseq, manifest = str(data.get("dseq") or ""), data.get("manifest")
        if not dseq or not isinstance(manifest, str):
            raise ProviderError(f"akash: POST /v1/deployments: no dseq/manifest in {str(data)[:200]}",
                                provider=self.kind)
        self._remember(LeaseState(self.kind, dseq, request.label, "pending", "deployment open"))
        try:
            return self._accept_bid(request, dseq, manifest)
        except MarketplaceError as e:
            if isinstance(e, (NoOffers, OutOfCapacity)):
                self.destroy(dseq)       # no lease: close the deployment (the platform funded it)
                self._forget(dseq)
                raise
            raise self.abandon(dseq, request.label, "taking a bid failed", e) from None

    def bids(self, dseq: str) -> list[dict[str, Any]]:
        resp = self.http.request("GET", "/v1/bids", params={"dseq": dseq})
        return [b for b in _field(resp.body, "data", list, "GET /v1/bids") if isinstance(b, dict) and "bid" in b]

    def _accept_bid(self, request: LeaseRequest, dseq: str, manifest: str) -> LeaseState:
        waited = 0.0
        while True:
            open_bids = [b["bid"] for b in self.bids(dseq) if b["bid"].get("state") == "open"]
            if open_bids or waited >= self.bid_wait_s:
                break
            self.sleep(self.poll_s)
            waited += self.poll_s
        if not open_bids:
            raise NoOffers(f"akash: no bids for {request.label} ({request.gpu_count} x {request.gpu_type}) "
                           f"within {self.bid_wait_s:g}s", provider=self.kind)
        offers, unpriced = [], []
        for bid in open_bids:
            price = bid.get("price") or {}
            usd = usd_per_hour(str(price.get("denom")), price.get("amount", "0"))
            if usd is None:
                unpriced.append(str(price.get("denom")))
                continue
            bid_id = bid["id"]
            offers.append(Offer(self.kind, f"{dseq}/{bid_id['gseq']}/{bid_id['oseq']}/{bid_id['provider']}",
                                request.gpu_type, GPU_MODELS[request.gpu_type][0], request.gpu_count, usd,
                                raw=bid))
        if not offers:
            raise NoOffers(f"akash: {len(open_bids)} bids for {request.label}, none in a USD denom "
                           f"({', '.join(sorted(set(unpriced)))})", provider=self.kind)
        history: list[Exception] = []
        for offer in select_under_cap(self.kind, request, offers):
            bid_id = offer.raw["id"]
            body = {"manifest": manifest, "leases": [{"dseq": dseq, "gseq": int(bid_id["gseq"]),
                                                      "oseq": int(bid_id["oseq"]), "provider": bid_id["provider"]}]}
            try:
                self.http.request("POST", "/v1/leases", json_body=body)
            except ProviderError as e:
                if e.status is not None and 400 <= e.status < 500 and e.status != 404:
                    history.append(e)      # the bid closed meanwhile: the next one
                    continue
                raise
            return self.status(dseq)
        raise OutOfCapacity(f"akash: every acceptable bid for {request.label} closed before the lease",
                            provider=self.kind, failover_history=history)

    def _launch(self, request: LeaseRequest, offer: Offer) -> str:   # pragma: no cover - create is overridden
        raise NotImplementedError("akash leases are made by create(): deployment, bids, lease")

    # -- leases --
    def leases(self) -> list[LeaseState]:
        """Active deployments, each read by dseq for its stored SDL: the Console's list items carry
        ``deployment``, ``leases`` and ``escrow_account`` but no groups and no name (console
        ``deployment.schema.ts``), so the label (the SDL's placement name) is only in the stored SDL."""
        skip, states = 0, []
        while True:
            resp = self.http.request("GET", "/v1/deployments", params={"skip": skip, "limit": 100})
            data = _field(resp.body, "data", dict, "GET /v1/deployments")
            items = data.get("deployments") or []
            for d in items:
                dep = d.get("deployment") or {} if isinstance(d, dict) else {}
                dseq = str((dep.get("id") or {}).get("dseq") or "")
                if dseq and dep.get("state") != "closed":
                    try:
                        states.append(self.status(dseq))
                    except NotFound:
                        continue
            page = data.get("pagination") or {}
            if not page.get("hasMore") or not items:
                break
            skip += len(items)
        return states

    def status(self, lease_id: str) -> LeaseState:
        resp = self.http.request("GET", f"/v1/deployments/{lease_id}")
        return self._state(_field(resp.body, "data", dict, f"GET /v1/deployments/{lease_id}"))

    def destroy(self, lease_id: str) -> None:
        try:
            self.http.request("DELETE", f"/v1/deployments/{lease_id}")
        except NotFound:
            pass

    def _state(self, d: Mapping[str, Any], label: str = "") -> LeaseState:
        dep = d.get("deployment") or {}
        dseq = str((dep.get("id") or {}).get("dseq") or "")
        if not dseq:
            raise ProviderError(f"akash: deployment without id.dseq: {str(d)[:200]}", provider=self.kind)
        label = label or label_of(d)
        leases = d.get("leases") or []
        lease = next((x for x in leases if x.get("state") == "active"), leases[0] if leases else None)
        endpoints: dict[str, Endpoint] = {}
        price = None
        raw_status, status = str(dep.get("state")), "pending"
        if (dep.get("state") == "closed"
                or (lease is not None and lease.get("state") in ("closed", "insufficient_funds"))):
            status = "dead"
            raw_status = f"deployment {dep.get('state')}, lease {lease.get('state') if lease else 'none'}"
        elif lease is not None:
            p = lease.get("price") or {}
            price = usd_per_hour(str(p.get("denom")), p.get("amount", "0"))
            st = lease.get("status") or {}
            svc = (st.get("services") or {}).get(SERVICE) or {}
            # ForwardedPortSchema is {port, externalPort, host?, available?}: TCP only, host optional.
            for fp in (st.get("forwarded_ports") or {}).get(SERVICE) or []:
                if fp.get("host") and fp.get("externalPort"):
                    endpoints[f"{fp['port']}/tcp"] = Endpoint(str(fp["host"]), int(fp["externalPort"]), "tcp")
            # IP leases ({IP, Port, ExternalPort, Protocol}) carry UDP as well as TCP.
            for ip in (st.get("ips") or {}).get(SERVICE) or []:
                if ip.get("IP") and ip.get("Port"):
                    proto = str(ip.get("Protocol") or "tcp").lower()
                    endpoints[f"{ip['Port']}/{proto}"] = Endpoint(str(ip["IP"]), int(ip.get("ExternalPort")
                                                                                      or ip["Port"]), proto)
            total = int(svc.get("total") or 0)
            ready = int(svc.get("ready_replicas") or 0)
            if total and ready >= total:
                status, raw_status = "running", f"lease active, {ready}/{total} ready"
            else:
                raw_status = f"lease {lease.get('state')}, {ready}/{total} ready"
        else:
            raw_status = f"deployment {dep.get('state')}, no lease"
        ssh = endpoints.get("22/tcp")
        return LeaseState(provider_kind=self.kind, lease_id=dseq, label=label, status=status,  # type: ignore[arg-type]
                          raw_status=raw_status, price_per_hour=price, endpoints=endpoints, ssh=ssh, raw=dict(d))


def _field(body: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get(key), kind):
        raise ProviderError(f"akash: {where}: expected {key!r} ({kind.__name__}) in {str(body)[:200]}",
                            provider="akash")
    return body[key]


def label_of(d: Mapping[str, Any]) -> str:
    """Our label: the placement name in the deployment's SDL as the Console stores it
    (``consoleSettings.sdl`` on ``GET /v1/deployments/{dseq}``, per the IaC review; [U]: see
    tests/fakes/marketplaces.py, GUESSES)."""
    text = ((d.get("consoleSettings") or {}).get("sdl")) if isinstance(d.get("consoleSettings"), dict) else None
    if not isinstance(text, str):
        return ""
    try:
        doc = yaml.safe_load(text)
        placement = doc["profiles"]["placement"]
        return str(next(iter(placement))) if isinstance(placement, dict) and placement else ""
    except (yaml.YAMLError, KeyError, TypeError):
        return ""
