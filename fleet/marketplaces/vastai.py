"""Vast.ai (peer-to-peer GPU marketplace) against its REST API v0 (marketplace-apis.md section 1).

search  POST /api/v0/bundles/ with the filter grammar as the whole body -> {"offers": [...]}
create  PUT  /api/v0/asks/{offer_id}/ -> {"success": true, "new_contract": <instance id>}
list    GET  /api/v0/instances/?owner=me -> {"instances": [...]}; ``find`` matches ``label`` (base class)
status  GET  /api/v0/instances/{id}/?owner=me -> {"instances": {<one object>}}; ``{"instances": null}``
        (HTTP 200) means no such instance (vast-cli ``show_instance``), as a 404 does [U: GUESSES]
destroy DELETE /api/v0/instances/{id}/

Containers run the image's own ENTRYPOINT with ``runtype: "args"`` (vLLM's server); SSH leases
use ``ssh_direct``. Ports ride in ``env`` as docker flags (``{"-p 22:22": "1"}``), the shape the
official CLI sends. ``actual_status`` ``exited``/``unknown``/``offline`` never come back: dead.
"""

from __future__ import annotations

from typing import Any, Mapping

from fleet.marketplaces.base import (
    Endpoint,
    LeaseRequest,
    LeaseState,
    Marketplace,
    MarketplaceError,
    NotFound,
    Offer,
    OutOfCapacity,
    ProviderError,
    Status,
    UnknownGpuType,
    select_under_cap,
)

# The plan's GPU types -> Vast's gpu_name (spaces, as the CLI sends them).
GPU_NAMES: dict[str, str] = {
    "H200": "H200", "H100": "H100 SXM", "A100-80G": "A100 SXM4", "A100-40G": "A100 PCIE",
    "L40S": "L40S", "A6000": "RTX A6000", "L4": "L4", "A10": "A10",
    "RTX4090": "RTX 4090", "RTX3090": "RTX 3090",
}

RUNNING = {"running"}
DEAD = {"exited", "unknown", "offline", "stopped", "frozen"}   # stopped/frozen: our workers never stop on purpose


def normalize_status(actual: str | None) -> Status:
    if actual in RUNNING:
        return "running"
    if actual in DEAD:
        return "dead"
    return "pending"          # null (provisioning), created, loading, rebooting


class VastAi(Marketplace):
    kind = "vastai"
    default_base_url = "https://console.vast.ai/api/v0"
    # Vast limits each endpoint to a minimum interval per key and sends no Retry-After: leases waiting
    # to run share one GET /instances/ per round instead of one GET /instances/{id}/ each.
    shared_poll = True

    def classify(self, status: int, body: Any, headers: Mapping[str, str]) -> MarketplaceError | None:
        if isinstance(body, dict) and status in (404, 410) and (
                body.get("error") == "no_such_ask" or "no_such_ask" in str(body.get("msg", ""))):
            return OutOfCapacity(f"vastai: {body.get('msg') or 'offer no longer available'}",
                                 provider=self.kind, status=status)
        return None

    # -- offers --
    def query(self, request: LeaseRequest) -> dict[str, Any]:
        gpu_name = GPU_NAMES.get(request.gpu_type)
        if gpu_name is None:
            raise UnknownGpuType(f"vastai: no Vast gpu_name for GPU type {request.gpu_type!r}; known: "
                                 f"{sorted(GPU_NAMES)}", provider=self.kind)
        q: dict[str, Any] = {
            "verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True}, "rented": {"eq": False},
            "gpu_name": {"eq": gpu_name}, "num_gpus": {"eq": request.gpu_count},
            "reliability": {"gte": 0.95},
            "order": [["dph_total", "asc"]], "type": "on-demand", "limit": 20,
            "allocated_storage": request.disk_gb,
        }
        # No dph_total filter: ordered cheapest first, the answer tells "none" from "all too dear"
        # (NoOffers vs PriceAboveCap); the cap is enforced here, on our side, before any create.
        if request.countries:
            q["geolocation"] = {"in": list(request.countries)}
        if request.ports:
            q["direct_port_count"] = {"gte": len(request.ports)}
        if request.min_cuda:
            # The host driver's highest CUDA must run the image's (vLLM 0.12.0: CUDA 12.9).
            q["cuda_max_good"] = {"gte": float(request.min_cuda)}
        return q

    def search(self, request: LeaseRequest) -> list[Offer]:
        resp = self.http.request("POST", "/bundles/", json_body=self.query(request))
        raw = _field(resp.body, "offers", list, "POST /bundles/")
        offers = []
        for o in raw:
            if o.get("num_gpus") != request.gpu_count:
                continue
            geo = str(o.get("geolocation") or "")
            country = geo.rsplit(",", 1)[-1].strip() if geo else ""
            if request.countries and country not in request.countries:
                continue      # the filter should have done this; a changed API must not rent elsewhere
            offers.append(Offer(
                provider_kind=self.kind, offer_id=str(o["id"]), gpu_type=request.gpu_type,
                gpu_name=str(o.get("gpu_name")), gpu_count=int(o["num_gpus"]),
                price_per_hour=float(o["dph_total"]), region=country,
                reliability=o.get("reliability2", o.get("reliability")), raw=o,
            ))
        return select_under_cap(self.kind, request, offers)

    # -- leases --
    def _launch(self, request: LeaseRequest, offer: Offer) -> str:
        env: dict[str, str] = dict(request.env)
        for p in request.ports:
            flag = f"-p {p.port}:{p.port}" + ("/udp" if p.proto == "udp" else "")
            env[flag] = "1"
        body: dict[str, Any] = {
            "client_id": "me", "image": request.image, "env": env, "disk": request.disk_gb,
            "label": request.label, "cancel_unavail": True, "target_state": "running",
        }
        if request.registry:
            body["image_login"] = request.registry      # "-u USER -p TOKEN HOST": a private image
        if request.ssh:
            body["runtype"] = "ssh_direct"
            env.setdefault("-p 22:22", "1")
        else:
            body["runtype"] = "args"
            body["args"] = list(request.args)
        resp = self.http.request("PUT", f"/asks/{offer.offer_id}/", json_body=body)
        if not isinstance(resp.body, dict) or not resp.body.get("success") or "new_contract" not in resp.body:
            raise ProviderError(f"vastai: create on ask {offer.offer_id} answered {resp.body!r}", provider=self.kind)
        return str(resp.body["new_contract"])

    def leases(self) -> list[LeaseState]:
        resp = self.http.request("GET", "/instances/", params={"owner": "me"})
        items = _field(resp.body, "instances", list, "GET /instances/")
        return [self._state(i) for i in items if isinstance(i, dict) and "id" in i]

    def status(self, lease_id: str) -> LeaseState:
        resp = self.http.request("GET", f"/instances/{lease_id}/", params={"owner": "me"})
        # vast-cli's show_instance: {"instances": null} (HTTP 200) is "no such instance", like a 404.
        if isinstance(resp.body, dict) and resp.body.get("instances") in (None, {}) and "instances" in resp.body:
            raise NotFound(f"vastai: instance {lease_id} not found", provider=self.kind, status=404)
        inst = _field(resp.body, "instances", dict, f"GET /instances/{lease_id}/")
        return self._state(inst)

    def destroy(self, lease_id: str) -> None:
        try:
            self.http.request("DELETE", f"/instances/{lease_id}/", json_body={})
        except NotFound:
            pass

    def _state(self, inst: Mapping[str, Any]) -> LeaseState:
        host = inst.get("public_ipaddr") or ""
        endpoints: dict[str, Endpoint] = {}
        for key, binds in (inst.get("ports") or {}).items():
            if isinstance(binds, list) and binds and host:
                endpoints[key] = Endpoint(str(host), int(binds[0]["HostPort"]), key.split("/")[-1])
        ssh = endpoints.get("22/tcp")
        if ssh is None and inst.get("ssh_host") and inst.get("ssh_port"):
            ssh = Endpoint(str(inst["ssh_host"]), int(inst["ssh_port"]))
        actual = inst.get("actual_status")
        return LeaseState(
            provider_kind=self.kind, lease_id=str(inst["id"]), label=str(inst.get("label") or ""),
            status=normalize_status(actual), raw_status=str(actual), price_per_hour=inst.get("dph_total"),
            endpoints=endpoints, ssh=ssh, message=str(inst.get("status_msg") or ""), raw=dict(inst),
        )


def _field(body: Any, key: str, kind: type, where: str) -> Any:
    """A field the adapter depends on; a changed API fails loudly here, not silently later."""
    if not isinstance(body, dict) or not isinstance(body.get(key), kind):
        raise ProviderError(f"vastai: {where}: expected {key!r} ({kind.__name__}) in {str(body)[:200]}",
                            provider="vastai")
    return body[key]
