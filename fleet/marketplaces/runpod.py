"""RunPod Pods against REST **v2** (marketplace-apis.md section 2.1).

Why v2: REST v1 (rest.runpod.io/v1) retired on 2026-11-15, so an adapter written now on v1
would be dead on arrival; v2 is also the only REST surface with a catalog to search
(``GET /v2/catalog/gpus``), RFC 9457 error bodies and a ``Retry-After`` on 429.

search  GET  /v2/catalog/gpus?include=AVAILABILITY&product=POD&count=N&cloud=SECURE[&countryCodes=..]
create  POST /v2/pods -> 201 Pod
list    GET  /v2/pods -> {"pods": [...]}; ``find`` matches ``name`` (our label) (base class)
status  GET  /v2/pods/{id}: status PROVISIONING|STARTING -> pending, RUNNING -> running,
        EXITED|ERROR|TERMINATED -> dead; endpoint from ``runtime.ports``
destroy DELETE /v2/pods/{id} -> 204
ssh     GET  /v2/account/ssh-keys -> {"keys": [...]}; PUT the same shape replaces the WHOLE set: an SSH
        pod (``startSsh``) gets the account's keys (``PUBLIC_KEY``), so ``register_ssh_keys`` reads
        them, and PUTs their union with ours only when one of ours is missing (never one removed)

RunPod has no per-host offers and no bid: an "offer" is a GPU type with its on-demand price per
GPU and its availability. The price cap is checked against the catalog before create and against
the pod's billed ``cost`` after it; a pod billed above the cap is terminated at once.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from fleet.marketplaces.base import (
    AuthFailed,
    Endpoint,
    LeaseRequest,
    LeaseState,
    Marketplace,
    MarketplaceError,
    NoOffers,
    NotFound,
    Offer,
    OutOfCapacity,
    PriceAboveCap,
    ProviderError,
    Status,
    UnknownGpuType,
    select_under_cap,
)

# The plan's GPU types -> RunPod GPU type ids, only ids RunPod publishes (references/gpu-types.mdx;
# its A100s are "NVIDIA A100 80GB PCIe" and "NVIDIA A100-SXM4-80GB": there is no A100 40GB).
GPU_IDS: dict[str, str] = {
    "H200": "NVIDIA H200", "H100": "NVIDIA H100 80GB HBM3", "A100-80G": "NVIDIA A100-SXM4-80GB",
    "L40S": "NVIDIA L40S", "A6000": "NVIDIA RTX A6000",
    "L4": "NVIDIA L4", "RTX4090": "NVIDIA GeForce RTX 4090", "RTX3090": "NVIDIA GeForce RTX 3090",
}
CLOUD = "SECURE"
# The spec: capacity exhaustion at create is a 400 whose only content is a human `detail`, and a
# client should try the next (data center, GPU) candidate. Validation errors are 422. [U: the wording
# of the detail; we do not depend on it. GUESSES]
_NO_CAPACITY = re.compile(r"no (longer )?(any )?(instances|machines|gpus?) (are )?available|out of capacity|"
                          r"insufficient capacity|not enough free gpus", re.I)


def normalize_status(status: str | None) -> Status:
    if status == "RUNNING":
        return "running"
    if status in ("EXITED", "ERROR", "TERMINATED"):
        return "dead"
    return "pending"


class RunPod(Marketplace):
    kind = "runpod"
    default_base_url = "https://api.runpod.io"

    def classify(self, status: int, body: Any, headers: Mapping[str, str]) -> MarketplaceError | None:
        detail = " ".join(str(body.get(k, "")) for k in ("title", "detail")) if isinstance(body, dict) else str(body)
        if status == 402:
            err: MarketplaceError = ProviderError(f"runpod: HTTP 402: {detail.strip()}", provider=self.kind,
                                                  status=status)
            err.fix = "the RunPod account's balance is too low: add funds (or enable auto-pay), then run `pulumi up`"
            err.failover = True
            return err
        if status == 403:
            err = AuthFailed(f"runpod: HTTP 403: {detail.strip()}", provider=self.kind, status=status)
            err.fix = ("the key is valid but may not do this: give it the Pods scope (read/write) or use an account "
                       "that can reach the requested cloud and GPU pool; a new key alone will not help")
            return err
        if 400 <= status < 500 and status not in (401, 404, 422, 429) and (status == 400 or
                                                                            _NO_CAPACITY.search(detail)):
            return OutOfCapacity(f"runpod: {detail.strip()}", provider=self.kind, status=status)
        return None

    def account_ssh_keys(self) -> list[str]:
        resp = self.http.request("GET", "/v2/account/ssh-keys")
        keys = resp.body.get("keys") if isinstance(resp.body, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            # Writing back a list we misread would replace the account's keys with it: stop here.
            raise ProviderError(f"runpod: GET /v2/account/ssh-keys: expected {{'keys': [str]}} in "
                                f"{str(resp.body)[:200]}; the account's keys are left as they are", provider=self.kind)
        return keys

    def register_ssh_keys(self, keys: tuple[str, ...] | list[str]) -> list[str]:
        """Add our SSH public keys to the account's (PUT replaces the whole set, so: read, union, PUT only
        when one is missing). A key counts as there when its type and body are, whatever its comment. The
        PUT is not resent on an unclear outcome (the next `pulumi up` reads afresh), so it cannot undo a
        change made meanwhile more than once; RunPod offers no conditional write [U: GUESSES]."""
        have = self.account_ssh_keys()
        present = {_key_id(k) for k in have}
        missing, seen = [], set(present)
        for key in keys:
            if _key_id(key) not in seen:
                missing.append(key.strip())
                seen.add(_key_id(key))
        if missing:
            try:
                self.http.request("PUT", "/v2/account/ssh-keys", json_body={"keys": [*have, *missing]},
                                  ok=(200, 204))
            except OutOfCapacity as e:          # a 400 here is RunPod refusing the keys, not capacity
                err = ProviderError(f"runpod: PUT /v2/account/ssh-keys refused the keys: {e}", provider=self.kind,
                                    status=400)
                err.fix = "check the stack's ssh_public_keys (each the line of an OpenSSH .pub file)"
                raise err from None
        return missing

    def search(self, request: LeaseRequest) -> list[Offer]:
        gpu_id = GPU_IDS.get(request.gpu_type)
        if gpu_id is None:
            raise UnknownGpuType(f"runpod: RunPod's published GPU types have no {request.gpu_type!r}; known: "
                                 f"{sorted(GPU_IDS)}", provider=self.kind)
        params = {"include": "AVAILABILITY", "product": "POD", "count": request.gpu_count, "cloud": CLOUD,
                  "countryCodes": ",".join(request.countries) or None, "minCudaVersion": request.min_cuda or None}
        resp = self.http.request("GET", "/v2/catalog/gpus", params=params)
        gpus = _field(resp.body, "gpus", list, "GET /v2/catalog/gpus")
        match = [g for g in gpus if g.get("id") == gpu_id]
        if not match:
            raise NoOffers(f"runpod: {gpu_id} is not in the catalog for {request.gpu_count} GPUs"
                           f"{' in ' + ','.join(request.countries) if request.countries else ''}", provider=self.kind)
        g = match[0]
        price = (g.get("price") or {}).get("secure")
        max_count = (g.get("maxCount") or {}).get("secure")
        if price is None or not g.get("secure", True) or (max_count is not None and max_count < request.gpu_count):
            raise NoOffers(f"runpod: {gpu_id} x {request.gpu_count} is not offered on the {CLOUD} cloud",
                           provider=self.kind)
        centers = [d for d in g.get("dataCenters") or [] if d.get("availability", "NONE") != "NONE"]
        offer = Offer(provider_kind=self.kind, offer_id=gpu_id, gpu_type=request.gpu_type, gpu_name=gpu_id,
                      gpu_count=request.gpu_count, price_per_hour=float(price) * request.gpu_count,
                      region=",".join(d["id"] for d in centers), raw=g)
        fit = select_under_cap(self.kind, request, [offer])   # the price first: a dear offer is refused as such
        if g.get("availability", "NONE") == "NONE" or ("dataCenters" in g and not centers):
            raise OutOfCapacity(f"runpod: no {gpu_id} available now on the {CLOUD} cloud", provider=self.kind)
        return fit

    def _launch(self, request: LeaseRequest, offer: Offer) -> str:
        ports = [f"{p.port}/{p.proto}" for p in request.ports]
        if request.ssh and "22/tcp" not in ports:
            ports.append("22/tcp")
        gpu: dict[str, Any] = {"id": offer.offer_id, "count": request.gpu_count}
        if request.min_cuda:
            gpu["minCudaVersion"] = request.min_cuda
        body: dict[str, Any] = {
            "name": request.label, "image": request.image, "gpu": gpu,
            "cloud": CLOUD, "disk": request.disk_gb, "ports": ports, "env": dict(request.env),
            "startSsh": request.ssh,
        }
        if request.registry:
            body["registry"] = request.registry          # a registry credential id (private image)
        if request.args and not request.ssh:
            body["args"] = " ".join(_quote(a) for a in request.args)
        # One data center per call: a capacity 400 moves on to the next one (the spec's advice).
        centers = [c for c in offer.region.split(",") if c] or [""]
        history: list[Exception] = []
        for center in centers:
            if center:
                body["dataCenterIds"] = [center]
            try:
                resp = self.http.request("POST", "/v2/pods", json_body=body, ok=(201, 200))
                break
            except OutOfCapacity as e:
                history.append(e)
        else:
            raise OutOfCapacity(f"runpod: no room for {request.gpu_count} x {offer.offer_id} in "
                                f"{', '.join(c for c in centers if c) or 'any data center'}: {history[-1]}",
                                provider=self.kind, status=400, failover_history=history)
        pod = resp.body
        if not isinstance(pod, dict) or not pod.get("id"):
            raise ProviderError(f"runpod: POST /v2/pods answered {str(pod)[:200]}", provider=self.kind)
        cost = pod.get("cost")
        cap = request.cap_total()
        if isinstance(cost, (int, float)) and cap is not None and cost > cap + 1e-9:
            self.destroy(str(pod["id"]))
            raise PriceAboveCap(f"runpod: pod {pod['id']} billed {cost:.4f}/h, above the cap {cap:.4f}/h for "
                                f"{request.label}; terminated", provider=self.kind,
                                cheapest_per_gpu_hour=cost / request.gpu_count,
                                cap_per_gpu_hour=request.price_cap_per_gpu_hour)
        return str(pod["id"])

    def leases(self) -> list[LeaseState]:
        resp = self.http.request("GET", "/v2/pods")
        pods = _field(resp.body, "pods", list, "GET /v2/pods")
        return [self._state(p) for p in pods if isinstance(p, dict) and p.get("id") and p.get("status") != "TERMINATED"]

    def status(self, lease_id: str) -> LeaseState:
        resp = self.http.request("GET", f"/v2/pods/{lease_id}")
        if not isinstance(resp.body, dict) or "status" not in resp.body:
            raise ProviderError(f"runpod: GET /v2/pods/{lease_id}: no status in {str(resp.body)[:200]}",
                                provider=self.kind)
        return self._state(resp.body)

    def destroy(self, lease_id: str) -> None:
        try:
            self.http.request("DELETE", f"/v2/pods/{lease_id}")
        except NotFound:
            pass

    def _state(self, pod: Mapping[str, Any]) -> LeaseState:
        pod_id = str(pod["id"])
        endpoints: dict[str, Endpoint] = {}
        runtime = pod.get("runtime") or {}
        for p in runtime.get("ports") or []:
            if p.get("ip") and p.get("public"):
                proto = "tcp" if p.get("type") in (None, "tcp", "http") else str(p["type"])
                endpoints[f"{p['private']}/{proto}"] = Endpoint(str(p["ip"]), int(p["public"]), proto)
        for spec in pod.get("ports") or []:
            port, _, kind = str(spec).partition("/")
            if kind == "http" and f"{port}/tcp" not in endpoints:
                # HTTP ports are served by RunPod's TLS proxy when no public IP maps them.
                endpoints[f"{port}/tcp"] = Endpoint(f"{pod_id}-{port}.proxy.runpod.net", 443, "https")
        ssh_info = pod.get("ssh") or {}
        direct = ssh_info.get("direct") or ssh_info.get("proxy")
        ssh = Endpoint(str(direct["host"]), int(direct["port"])) if direct else None
        status = pod.get("status")
        return LeaseState(
            provider_kind=self.kind, lease_id=pod_id, label=str(pod.get("name") or ""),
            status=normalize_status(status), raw_status=str(status), price_per_hour=pod.get("cost"),
            endpoints=endpoints, ssh=ssh, ssh_user=str(direct.get("username") or "root") if direct else "root",
            raw=dict(pod),
        )


def _key_id(key: str) -> tuple[str, ...]:
    """An OpenSSH public key line without its comment: (type, base64 body)."""
    return tuple(key.split()[:2])


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _field(body: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get(key), kind):
        raise ProviderError(f"runpod: {where}: expected {key!r} ({kind.__name__}) in {str(body)[:200]}",
                            provider="runpod")
    return body[key]
