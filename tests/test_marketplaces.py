"""Each marketplace adapter against its FAKE server (tests/fakes/marketplaces.py), on 127.0.0.1.

Happy path (search, create, running, endpoint, destroy), idempotent create, the price cap,
every error shape mapped to its error class, retries on 429 (with and without Retry-After),
giving up after N tries, and a lease that dies. No test sleeps: adapters take an injected sleep.
"""

from __future__ import annotations

import random

import pytest
import yaml

from fleet.marketplaces import (
    Akash,
    AuthFailed,
    LeaseDied,
    LeaseRequest,
    ModelUnavailable,
    NoOffers,
    NotFound,
    OpenAIUpstream,
    OutOfCapacity,
    Port,
    PriceAboveCap,
    ProviderError,
    RateLimited,
    RetryPolicy,
    RunPod,
    VastAi,
    adapter_class,
)
from fleet.marketplaces.base import HttpClient, forget_listings, parse_retry_after
from tests.fakes.marketplaces import FakeAkash, FakeOpenAIUpstream, FakeRunPod, FakeVastAi

KEY = "test-key"
IMAGE = "registry.example/infermesh/worker@sha256:" + "a" * 64


class Sleeps(list):
    """An injected sleep: records the waits, never waits."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture(autouse=True)
def fresh_process():
    """Each test starts as a new provider process would: no cached listing."""
    forget_listings()
    yield
    forget_listings()


def _fake(cls):
    fake = cls(KEY).start()
    return fake


@pytest.fixture
def vast():
    fake = _fake(FakeVastAi)
    yield fake
    fake.stop()


@pytest.fixture
def runpod():
    fake = _fake(FakeRunPod)
    yield fake
    fake.stop()


@pytest.fixture
def akash():
    fake = _fake(FakeAkash)
    yield fake
    fake.stop()


@pytest.fixture
def upstream():
    fake = _fake(FakeOpenAIUpstream)
    yield fake
    fake.stop()


def request(label="qwen-eu-vast-0", gpu="RTX4090", cap=0.5, **kw) -> LeaseRequest:
    kw.setdefault("region", "eu-west")
    kw.setdefault("countries", ("NL", "DE"))
    return LeaseRequest(label=label, gpu_type=gpu, gpu_count=kw.pop("count", 1), image=IMAGE,
                        price_cap_per_gpu_hour=cap, args=("--model", "Qwen/Qwen2.5-7B-Instruct", "--port", "8000"),
                        env={"INFERMESH_LEASE": label}, ports=kw.pop("ports", (Port(8000, "tcp"),)), **kw)


def adapter(cls, fake, sleeps, attempts=4, **kw):
    return cls(KEY if "key" not in kw else kw.pop("key"), fake.url + kw.pop("suffix", ""),
               retry=RetryPolicy(attempts=attempts, base_s=0.5, cap_s=8), sleep=sleeps, poll_s=1.0,
               rng=random.Random(7), timeout_s=5, **kw)


def vast_adapter(fake, sleeps, **kw):
    return adapter(VastAi, fake, sleeps, suffix="/api/v0", **kw)


# ==== Vast.ai ==========================================================================================

def test_vast_happy_path(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    offers = a.search(request())
    # Cheapest first, only the requested countries (104 is in the US), none above the cap (103 at 0.95).
    assert [o.offer_id for o in offers] == ["102", "101"]
    assert offers[0].price_per_gpu_hour == pytest.approx(0.38) and offers[0].region == "NL"
    state = a.create(request())
    assert state.status == "pending" and state.label == "qwen-eu-vast-0"
    running = a.wait_running(state.lease_id)
    assert running.status == "running" and running.raw_status == "running"
    ep = running.endpoint(8000)
    assert ep is not None and ep.host == "203.0.113.102" and ep.port == 40000
    # The fake saw the documented create shape: args runtype, ports as docker flags in env, our label.
    [put] = vast.calls("PUT", r"/asks/102/$")
    assert put["body"]["runtype"] == "args" and put["body"]["args"][:2] == ["--model", "Qwen/Qwen2.5-7B-Instruct"]
    assert put["body"]["env"]["-p 8000:8000"] == "1" and put["body"]["label"] == "qwen-eu-vast-0"
    assert put["headers"]["authorization"] == f"Bearer {KEY}"
    a.destroy(state.lease_id)
    assert vast.instances == {}
    a.destroy(state.lease_id)        # idempotent: already gone is fine


def test_vast_search_sends_the_documented_filter(vast, sleeps):
    vast_adapter(vast, sleeps).search(request(count=1))
    [call] = vast.calls("POST", r"/bundles/$")
    q = call["body"]
    assert q["gpu_name"] == {"eq": "RTX 4090"} and q["num_gpus"] == {"eq": 1}
    assert q["geolocation"] == {"in": ["NL", "DE"]} and q["order"] == [["dph_total", "asc"]]
    assert q["rentable"] == {"eq": True} and q["type"] == "on-demand"


def test_vast_create_is_idempotent(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    first = a.create(request())
    second = a.create(request())
    assert second.lease_id == first.lease_id
    assert len(vast.instances) == 1 and len(vast.calls("PUT")) == 1


def test_vast_dead_lease_under_label_is_replaced(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    first = a.create(request())
    vast.kill(first.lease_id)
    second = a.create(request())
    assert second.lease_id != first.lease_id and list(vast.instances) == [int(second.lease_id)]


def test_vast_price_cap_refused(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    with pytest.raises(PriceAboveCap) as e:
        a.create(request(cap=0.2))
    assert "0.3800/GPU-hour, above the cap 0.2000" in str(e.value)
    assert e.value.cheapest_per_gpu_hour == pytest.approx(0.38) and e.value.failover
    assert vast.calls("PUT") == [] and vast.instances == {}


def test_vast_no_cap_never_rents(vast, sleeps):
    with pytest.raises(PriceAboveCap, match="no price cap"):
        vast_adapter(vast, sleeps).create(request(cap=None))
    assert vast.calls("PUT") == []


def test_vast_no_offers(vast, sleeps):
    vast.offers = []
    with pytest.raises(NoOffers) as e:
        vast_adapter(vast, sleeps).create(request())
    assert not isinstance(e.value, PriceAboveCap) and "no offers for 1 x RTX4090 in eu-west" in str(e.value)


def test_vast_offer_vanishes_then_next_offer(vast, sleeps):
    vast.vanish(102)
    state = vast_adapter(vast, sleeps).create(request())
    assert vast.instances[int(state.lease_id)]["public_ipaddr"] == "203.0.113.101"
    assert [c["path"] for c in vast.calls("PUT")] == ["/api/v0/asks/102/", "/api/v0/asks/101/"]


def test_vast_out_of_capacity(vast, sleeps):
    vast.capacity = False
    with pytest.raises(OutOfCapacity) as e:
        vast_adapter(vast, sleeps).create(request())
    assert len(e.value.failover_history) == 2 and e.value.retryable
    assert all(h.status == 410 for h in e.value.failover_history)


@pytest.mark.parametrize("forbidden", [False, True])
def test_vast_auth_failure(vast, sleeps, forbidden):
    vast.forbidden = forbidden
    a = vast_adapter(vast, sleeps, key=KEY if forbidden else "wrong")
    with pytest.raises(AuthFailed) as e:
        a.search(request())
    assert e.value.status == (403 if forbidden else 401) and not e.value.failover and not e.value.retryable
    assert len(vast.requests) == 1 and sleeps == []          # never retried


def test_vast_429_without_retry_after_backs_off_then_succeeds(vast, sleeps):
    vast.rate_limit(2)                                     # Vast: plain text, no Retry-After
    offers = vast_adapter(vast, sleeps).search(request())
    assert offers and len(vast.requests) == 3
    # Exponential backoff with full jitter: within [0, 0.5] then [0, 1.0].
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0


def test_vast_429_gives_up_after_n(vast, sleeps):
    vast.rate_limit(10)
    with pytest.raises(RateLimited) as e:
        vast_adapter(vast, sleeps, attempts=3).search(request())
    assert "gave up after 3 tries" in str(e.value) and "too frequent" in str(e.value)
    assert len(vast.requests) == 3 and len(sleeps) == 2


def test_vast_create_not_retried_after_500(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    offers = a.search(request())
    vast.fail(1, status=500)
    with pytest.raises(ProviderError) as e:
        a._launch(request(), offers[0])
    assert e.value.status == 500 and len(vast.calls("PUT")) == 1   # a PUT that may have rented is not resent


def test_vast_5xx_on_reads_retried(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    state = a.create(request())
    vast.fail(2, status=502)
    assert a.status(state.lease_id).lease_id == state.lease_id and len(sleeps) == 2


def test_vast_dead_lease_detected(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    state = a.create(request())
    vast.kill(state.lease_id, "exited")
    with pytest.raises(LeaseDied) as e:
        a.wait_running(state.lease_id)
    assert e.value.raw_status == "exited" and e.value.lease_id == state.lease_id and "code 137" in str(e.value)


def test_vast_fake_rejects_wrong_shape(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    with pytest.raises(ProviderError) as e:
        a.http.request("PUT", "/asks/101/", json_body={"client_id": "me", "image": IMAGE, "ports": [8000]})
    assert e.value.status == 400 and "unknown fields ['ports']" in str(e.value)


def test_vast_ssh_lease(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    state = a.wait_running(a.create(request(ssh=True, ports=())).lease_id)
    [put] = vast.calls("PUT")
    assert put["body"]["runtype"] == "ssh_direct" and "args" not in put["body"]
    assert state.ssh is not None and state.ssh.host == "203.0.113.102" and state.ssh.port == 40022


# ==== RunPod (REST v2) ===================================================================================

def test_runpod_happy_path(runpod, sleeps):
    a = adapter(RunPod, runpod, sleeps)
    req = request(label="qwen-eu-runpod-0", cap=1.0, ports=(Port(8000, "http"), Port(22, "tcp")))
    [offer] = a.search(req)
    assert offer.offer_id == "NVIDIA GeForce RTX 4090" and offer.price_per_hour == pytest.approx(0.69)
    state = a.create(req)
    assert state.status == "pending"
    [post] = runpod.calls("POST", r"/v2/pods$")
    body = post["body"]
    assert body["gpu"] == {"id": "NVIDIA GeForce RTX 4090", "count": 1} and body["cloud"] == "SECURE"
    assert body["ports"] == ["8000/http", "22/tcp"] and body["dataCenterIds"] == ["EU-NL-1"]
    assert body["args"] == "--model Qwen/Qwen2.5-7B-Instruct --port 8000" and body["name"] == "qwen-eu-runpod-0"
    running = a.wait_running(state.lease_id)
    assert running.status == "running" and running.raw_status == "RUNNING"
    assert running.endpoint(22).port == 30022 and running.endpoint(22).host == "195.26.233.3"
    http = running.endpoint(8000)
    assert http.host == f"{state.lease_id}-8000.proxy.runpod.net" and http.scheme == "https"
    assert running.ssh.host == "195.26.233.3" and running.ssh_user == "root"
    a.destroy(state.lease_id)
    assert runpod.pods == {}
    a.destroy(state.lease_id)


def test_runpod_catalog_query(runpod, sleeps):
    adapter(RunPod, runpod, sleeps).search(request(cap=1.0, count=2))
    [call] = runpod.calls("GET", r"/v2/catalog/gpus$")
    assert call["query"] == {"include": "AVAILABILITY", "product": "POD", "count": "2", "cloud": "SECURE",
                             "countryCodes": "NL,DE"}


def test_runpod_create_is_idempotent(runpod, sleeps):
    a = adapter(RunPod, runpod, sleeps)
    first = a.create(request(cap=1.0))
    assert a.create(request(cap=1.0)).lease_id == first.lease_id and len(runpod.pods) == 1


def test_runpod_price_cap_refused(runpod, sleeps):
    with pytest.raises(PriceAboveCap, match=r"0.6900/GPU-hour, above the cap 0.5000"):
        adapter(RunPod, runpod, sleeps).create(request(cap=0.5))
    assert runpod.calls("POST") == []


def test_runpod_billed_above_cap_is_terminated(runpod, sleeps):
    runpod.billed_markup = 0.5           # the catalog said 0.69, the pod bills 1.19
    with pytest.raises(PriceAboveCap, match="billed 1.1900/h"):
        adapter(RunPod, runpod, sleeps).create(request(cap=1.0))
    assert runpod.pods == {} and len(runpod.calls("DELETE")) == 1


def test_runpod_no_offers(runpod, sleeps):
    runpod.gpus = []
    with pytest.raises(NoOffers, match="not in the catalog"):
        adapter(RunPod, runpod, sleeps).search(request(cap=1.0))


def test_runpod_out_of_capacity_in_catalog(runpod, sleeps):
    runpod.capacity = False
    with pytest.raises(OutOfCapacity, match="no NVIDIA GeForce RTX 4090 available"):
        adapter(RunPod, runpod, sleeps).create(request(cap=1.0))
    assert runpod.calls("POST") == []


def test_runpod_capacity_gone_at_create(runpod, sleeps):
    runpod.vanish_on_create = True
    with pytest.raises(OutOfCapacity) as e:
        adapter(RunPod, runpod, sleeps).create(request(cap=1.0))
    assert "no longer any instances available" in str(e.value.failover_history[0])


@pytest.mark.parametrize("forbidden", [False, True])
def test_runpod_auth_failure(runpod, sleeps, forbidden):
    runpod.forbidden = forbidden
    with pytest.raises(AuthFailed) as e:
        adapter(RunPod, runpod, sleeps, key=KEY if forbidden else "nope").search(request(cap=1.0))
    assert e.value.status == (403 if forbidden else 401)
    assert ("missing bearer token" in str(e.value)) != forbidden


def test_runpod_429_honours_retry_after(runpod, sleeps):
    runpod.rate_limit(2, retry_after="3")
    assert adapter(RunPod, runpod, sleeps).search(request(cap=1.0))
    assert sleeps == [3.0, 3.0]


def test_runpod_create_retried_on_429(runpod, sleeps):
    runpod.rate_limit(1, retry_after="2")          # a 429 did nothing: safe to resend a POST
    state = adapter(RunPod, runpod, sleeps).create(request(cap=1.0))
    assert state.lease_id in runpod.pods and len(runpod.pods) == 1 and 2.0 in sleeps


def test_runpod_retry_after_too_long_is_not_waited(runpod, sleeps):
    runpod.rate_limit(1, retry_after="3600")
    with pytest.raises(RateLimited) as e:
        adapter(RunPod, runpod, sleeps).search(request(cap=1.0))
    assert e.value.retry_after == 3600 and sleeps == []


def test_runpod_dead_lease_detected(runpod, sleeps):
    a = adapter(RunPod, runpod, sleeps)
    state = a.create(request(cap=1.0))
    runpod.kill(state.lease_id, "ERROR")
    with pytest.raises(LeaseDied) as e:
        a.wait_running(state.lease_id)
    assert e.value.raw_status == "ERROR" and a.status(state.lease_id).status == "dead"


def test_runpod_fake_rejects_v1_shape(runpod, sleeps):
    a = adapter(RunPod, runpod, sleeps)
    v1 = {"name": "x", "imageName": IMAGE, "gpuTypeIds": ["NVIDIA GeForce RTX 4090"], "gpuCount": 1}
    with pytest.raises(ProviderError) as e:
        a.http.request("POST", "/v2/pods", json_body=v1)
    assert e.value.status == 422 and "Request validation failed" in str(e.value)


# ==== Akash (Console API) ================================================================================

def akash_adapter(fake, sleeps, **kw):
    a = adapter(Akash, fake, sleeps, **kw)
    a.bid_wait_s = 10
    return a


def test_akash_sdl_from_pool():
    req = request(label="qwen-eu-akash-0", cap=0.6, ports=(Port(51820, "udp"),))
    doc = yaml.safe_load(__import__("fleet.marketplaces.akash", fromlist=["sdl"]).sdl(req))
    assert doc["version"] == "2.0"
    svc = doc["services"]["worker"]
    assert svc["image"] == IMAGE and svc["args"] == ["--model", "Qwen/Qwen2.5-7B-Instruct", "--port", "8000"]
    # Only the mesh's UDP port is exposed; vLLM's 8000 is reached over the mesh, never published.
    assert svc["expose"] == [{"port": 51820, "as": 51820, "proto": "udp", "to": [{"global": True}]}]
    gpu = doc["profiles"]["compute"]["worker"]["resources"]["gpu"]
    assert gpu == {"units": 1, "attributes": {"vendor": {"nvidia": [{"model": "rtx4090", "ram": "24Gi"}]}}}
    placement = doc["profiles"]["placement"]["qwen-eu-akash-0"]
    # 0.60 USD/h = 1000 uact per block at 600 blocks an hour.
    assert placement["pricing"]["worker"] == {"denom": "uact", "amount": 1000}
    assert placement["attributes"] == {"location-region": "eu-west"}
    assert doc["deployment"] == {"worker": {"qwen-eu-akash-0": {"profile": "worker", "count": 1}}}
    FakeAkash.validate_sdl(doc)           # the fake's validator accepts it


def test_akash_happy_path_with_delayed_bids(akash, sleeps):
    akash.bids_after_polls = 3            # bids arrive only on the 4th poll
    a = akash_adapter(akash, sleeps)
    req = request(label="qwen-eu-akash-0", cap=0.6, ports=(Port(51820, "udp"),))
    state = a.create(req)
    assert len(akash.calls("GET", r"/v1/bids$")) == 4 and sleeps.count(1.0) >= 3
    # The cheapest USD bid (500 uact/block = 0.30/h) won; the uakt bid was not priced.
    [lease_call] = akash.calls("POST", r"/v1/leases$")
    assert lease_call["body"]["leases"] == [{"dseq": state.lease_id, "gseq": 1, "oseq": 1,
                                             "provider": "akash1providerbbb"}]
    assert lease_call["headers"]["x-api-key"] == KEY
    running = a.wait_running(state.lease_id)
    assert running.status == "running" and running.price_per_hour == pytest.approx(0.30)
    ep = running.endpoint(51820, "udp")
    # UDP comes from the lease's IP entry (forwarded ports are TCP only and carry no protocol).
    assert ep is not None and ep.host == "198.51.100.77" and ep.port == 31820 and ep.scheme == "udp"
    a.destroy(state.lease_id)
    assert a.status(state.lease_id).status == "dead"


def test_akash_create_is_idempotent(akash, sleeps):
    a = akash_adapter(akash, sleeps)
    first = a.create(request(label="qwen-eu-akash-0", cap=0.6))
    again = a.create(request(label="qwen-eu-akash-0", cap=0.6))
    assert again.lease_id == first.lease_id and len(akash.calls("POST", r"/v1/deployments$")) == 1
    other = a.create(request(label="qwen-eu-akash-1", cap=0.6))
    assert other.lease_id != first.lease_id


def test_akash_market_price_above_cap_refused_before_deposit(akash, sleeps):
    with pytest.raises(PriceAboveCap, match="above the cap 0.2000"):
        akash_adapter(akash, sleeps).create(request(cap=0.2))
    assert akash.calls("POST") == []


def test_akash_bids_above_cap_refused_and_deployment_closed(akash, sleeps):
    akash.honour_max_price = False       # a provider that bids above the SDL's price
    akash.bid_prices = [("akash1dear", "uact", "2000")]        # 1.20 USD/h
    with pytest.raises(PriceAboveCap, match="1.2000/GPU-hour, above the cap 0.6000"):
        akash_adapter(akash, sleeps).create(request(cap=0.6))
    assert akash.calls("POST", r"/v1/leases$") == []
    [dep] = akash.deployments.values()
    assert dep["deployment"]["state"] == "closed"          # the deposit comes back


def test_akash_no_bids(akash, sleeps):
    akash.bid_prices = []
    with pytest.raises(NoOffers, match="no bids .* within 10s"):
        akash_adapter(akash, sleeps).create(request(cap=0.6))
    [dep] = akash.deployments.values()
    assert dep["deployment"]["state"] == "closed"


def test_akash_out_of_capacity_in_market(akash, sleeps):
    with pytest.raises(OutOfCapacity, match="0 nvidia l40s available"):
        akash_adapter(akash, sleeps).create(request(gpu="L40S", cap=1.0))


def test_akash_bid_closed_before_lease_takes_next(akash, sleeps):
    akash.close_bids_on_lease = {"akash1providerbbb"}
    state = akash_adapter(akash, sleeps).create(request(cap=0.6))
    [lease] = akash.deployments[state.lease_id]["leases"]
    assert lease["id"]["provider"] == "akash1provideraaa"


@pytest.mark.parametrize("forbidden", [False, True])
def test_akash_auth_failure(akash, sleeps, forbidden):
    akash.forbidden = forbidden
    with pytest.raises(AuthFailed) as e:
        akash_adapter(akash, sleeps, key=KEY if forbidden else "nope").create(request(cap=0.6))
    assert e.value.status == (403 if forbidden else 401)


def test_akash_rate_limit_then_success(akash, sleeps):
    akash.rate_limit(1, retry_after="1")
    assert akash_adapter(akash, sleeps).find("nothing") is None and sleeps == [1.0]


def test_akash_dead_lease_detected(akash, sleeps):
    a = akash_adapter(akash, sleeps)
    state = a.create(request(cap=0.6))
    akash.kill(state.lease_id)
    with pytest.raises(LeaseDied, match="lease closed"):
        a.wait_running(state.lease_id)


def test_akash_fake_rejects_quickstart_lease_shape(akash, sleeps):
    a = akash_adapter(akash, sleeps)
    with pytest.raises(ProviderError) as e:
        a.http.request("POST", "/v1/leases", json_body={"dseq": "1", "bidId": "x"})
    assert e.value.status == 400 and "Validation error" in str(e.value)


# ==== OpenAI-compatible upstream ==========================================================================

def test_upstream_check(upstream, sleeps):
    u = OpenAIUpstream(KEY, upstream.url + "/v1", sleep=sleeps)
    assert u.check("Qwen/Qwen3-32B-FP8") == "qwen/qwen3-32b-fp8"     # case-insensitive, upstream's own id
    with pytest.raises(ModelUnavailable, match="does not list 'llama-9'"):
        u.check("llama-9")


def test_upstream_auth_and_rate_limit(upstream, sleeps):
    with pytest.raises(AuthFailed, match="unauthorized"):
        OpenAIUpstream("bad", upstream.url + "/v1", sleep=sleeps).models()
    upstream.rate_limit(2, retry_after="2")
    assert OpenAIUpstream(KEY, upstream.url + "/v1", sleep=sleeps).models() and sleeps == [2.0, 2.0]


# ==== plumbing ===========================================================================================

def test_connection_refused_is_retried_then_clear_error(sleeps):
    fake = FakeVastAi(KEY).start()
    url = fake.url
    fake.stop()                     # nothing listens there any more
    client = HttpClient(url, provider="vastai", headers={}, retry=RetryPolicy(attempts=3), sleep=sleeps)
    with pytest.raises(ProviderError) as e:
        client.request("GET", "/api/v0/instances/")
    assert "cannot connect" in str(e.value) and "gave up after 3 tries" in str(e.value) and len(sleeps) == 2


def test_retry_after_http_date():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_registry_and_secret_free_repr():
    assert adapter_class("vastai") is VastAi and adapter_class("openai") is OpenAIUpstream
    with pytest.raises(ValueError, match="known"):
        adapter_class("tensordock")
    assert "sekrit" not in repr(VastAi("sekrit")) and "sekrit" not in repr(OpenAIUpstream("sekrit"))


# ==== no lease outside state (every marketplace) ==========================================================

from infermesh_cli.commands import leases as leases_cmd  # noqa: E402
from fleet.components.lease import lease_label  # noqa: E402
from fleet.marketplaces import LeaseAbandoned  # noqa: E402

KINDS = ["vastai", "runpod", "akash"]
FAKES = {"vastai": FakeVastAi, "runpod": FakeRunPod, "akash": FakeAkash}
ADAPTERS = {"vastai": VastAi, "runpod": RunPod, "akash": Akash}
# The paths of each marketplace's "read one lease" call (a GET by id).
STATUS_PATH = {"vastai": r"/instances/\d+/$", "runpod": r"/v2/pods/pod\d+$", "akash": r"/v1/deployments/\d+$"}
CREATE_CALL = {"vastai": ("PUT", r"/asks/\d+/$"), "runpod": ("POST", r"/v2/pods$"),
               "akash": ("POST", r"/v1/deployments$")}


@pytest.fixture(params=KINDS)
def market(request):
    fake = FAKES[request.param](KEY).start()
    if request.param == "vastai":
        fake.keep_offers = True
    yield request.param, fake
    fake.stop()


def market_adapter(kind, fake, sleeps, **kw):
    a = adapter(ADAPTERS[kind], fake, sleeps, suffix="/api/v0" if kind == "vastai" else "", **kw)
    if kind == "akash":
        a.bid_wait_s = 10
    return a


def stack_request(stack="prod", name="qwen-eu-0", project="infermesh", cap=1.0, **kw) -> LeaseRequest:
    props = {"project": project, "stack": stack, "name": name, "provider_kind": "x", "gpu_type": "RTX4090",
             "gpu_count": 1, "region": "eu-west", "image": IMAGE}
    return request(label=lease_label(props), cap=cap, ports=(), **kw)


def audit_of(kind, fake, sleeps, stack="prod", known=frozenset()):
    return leases_cmd.audit("infermesh", stack, set(known), set(),
                            {kind: lambda: market_adapter(kind, fake, sleeps)})


def test_two_stacks_with_the_same_pool_names_see_only_their_own(market, sleeps):
    kind, fake = market
    a = market_adapter(kind, fake, sleeps)
    prod = a.create(stack_request("prod"))
    staging = a.create(stack_request("staging"))
    assert prod.lease_id != staging.lease_id and len(fake.live()) == 2      # staging did not adopt prod's lease
    assert a.find(stack_request("prod").label).lease_id == prod.lease_id
    assert a.find(stack_request("staging").label).lease_id == staging.lease_id
    # Another project's stack of the same name is someone else's too.
    other = a.create(stack_request("prod", project="other"))
    assert other.lease_id not in (prod.lease_id, staging.lease_id)
    # Each stack's audit lists its own lease only (as unknown: the empty state knows none).
    for stack, lease in (("prod", prod), ("staging", staging)):
        report = audit_of(kind, fake, sleeps, stack)
        assert [x.lease_id for x in report.unknown[kind]] == [lease.lease_id]
        assert audit_of(kind, fake, sleeps, stack, {lease.lease_id}).count == 0
    a.destroy(staging.lease_id)                     # destroying staging's leaves prod's
    assert prod.lease_id in fake.live() and staging.lease_id not in fake.live()


def test_a_retried_create_adopts_its_own_lease(market, sleeps):
    """A crash between rent and wait: the next process finds the lease by its label."""
    kind, fake = market
    first = market_adapter(kind, fake, sleeps).create(stack_request())
    forget_listings()                               # a new provider process
    again = market_adapter(kind, fake, sleeps).create(stack_request())
    assert again.lease_id == first.lease_id and list(fake.live()) == [first.lease_id]


@pytest.mark.parametrize("fault", ["timeout", "status 5xx", "price above cap"])
def test_failure_after_renting_leaves_no_lease_behind(market, sleeps, fault):
    kind, fake = market
    cap = 1.0
    if fault == "timeout":
        fake.boot_polls = 10_000
    elif fault == "status 5xx":
        fake.fail_on("GET", STATUS_PATH[kind], n=50, status=503)
    elif kind == "akash":
        fake.honour_max_price = False               # a provider bids above the SDL's price
        fake.bid_prices = [("akash1dear", "uact", "2000")]
    else:
        fake.billed_markup = 1.0                    # the lease bills more than the offer said
    a = market_adapter(kind, fake, sleeps)
    with pytest.raises((LeaseAbandoned, PriceAboveCap)) as e:
        a.rent(stack_request(cap=cap), wait_s=3)
    if isinstance(e.value, LeaseAbandoned):
        assert e.value.terminated and "terminated it, nothing of it bills" in str(e.value)
    assert any(ev == "rented" for _, ev, _, _ in fake.timeline)     # something was rented...
    assert fake.live() == {}                                       # ...and nothing is left
    assert audit_of(kind, fake, sleeps).count == 0


def test_failure_after_renting_that_cannot_terminate_says_so(sleeps):
    fake = FakeVastAi(KEY).start()
    try:
        fake.fail_on("GET", STATUS_PATH["vastai"], n=50, status=503)
        fake.fail_on("DELETE", r"/instances/\d+/$", n=50, status=503)
        a = market_adapter("vastai", fake, sleeps)
        with pytest.raises(LeaseAbandoned) as e:
            a.rent(stack_request(), wait_s=3)
        assert not e.value.terminated and "terminating it ALSO failed" in str(e.value)
        assert "next `pulumi up` adopts it" in e.value.fix and "--terminate" in e.value.fix
        [(lease_id, label)] = fake.live().items()
        assert label == stack_request().label                      # adoptable: it carries our label
        report = audit_of("vastai", fake, sleeps)
        assert [x.lease_id for x in report.unknown["vastai"]] == [lease_id]
        assert report.unknown["vastai"][0].price_per_hour == pytest.approx(0.38)
    finally:
        fake.stop()


@pytest.mark.parametrize("how", ["500 after renting", "no answer after renting"])
def test_a_create_call_that_may_have_rented_is_checked_and_undone(market, sleeps, how):
    kind, fake = market
    method, path = CREATE_CALL[kind]
    if how.startswith("500"):
        fake.fail_on(method, path, n=1, status=500, after=True)
    else:
        fake.drop_after(1, method, path)
    with pytest.raises(ProviderError) as e:
        market_adapter(kind, fake, sleeps).create(stack_request())
    assert "was terminated" in str(e.value)
    assert len(fake.calls(method, path)) == 1 and fake.live() == {}    # never resent, nothing left


def test_vast_gone_instance_is_not_found_not_an_error(vast, sleeps):
    a = vast_adapter(vast, sleeps)
    state = a.create(request())
    a.destroy(state.lease_id)
    with pytest.raises(NotFound):
        a.status(state.lease_id)                   # 200 {"instances": null}: gone


def test_audit_command_lists_terminates_and_skips_missing_credentials(tmp_path, capsys, sleeps):
    fake = FakeVastAi(KEY).start()
    fake.keep_offers = True
    try:
        a = market_adapter("vastai", fake, sleeps)
        kept = a.create(stack_request(name="qwen-vast-0"))
        stray = a.create(stack_request(name="qwen-vast-9"))
        state = {"deployment": {"resources": [{"type": leases_cmd.LEASE_TYPE, "id": kept.lease_id,
                                               "outputs": {"lease_id": kept.lease_id}}]}}
        (tmp_path / "state.json").write_text(__import__("json").dumps(state))
        args = __import__("argparse").Namespace(stack="staging", stacks_dir=None, project="infermesh",
                                                state=tmp_path / "state.json", terminate=False, yes=False, json=False)
        adapters = {"vastai": lambda: market_adapter("vastai", fake, sleeps), "runpod": "no credentials (set X)"}
        a.create(stack_request(stack="staging", name="qwen-vast-0"))      # staging's own, in no state
        rc = leases_cmd.run(args, adapters)
        out = capsys.readouterr().out
        assert rc == 1 and "vastai: 1 unknown" in out and "runpod: skipped: no credentials (set X)" in out
        assert "against the stack's state" in out and "$0.3800/h" in out
        # Without a state, the plan is the reference: staging's plan has a qwen-vast-0, so it is known.
        args.state = None
        assert leases_cmd.run(args, adapters) == 0 and "against the plan" in capsys.readouterr().out
        # prod: stray is not in the state; terminate after a "no", then after a "yes".
        args.stack, args.state, args.terminate = "prod", tmp_path / "state.json", True
        assert leases_cmd.run(args, adapters, ask=lambda _: "n") == 1 and stray.lease_id in fake.live()
        assert leases_cmd.run(args, adapters, ask=lambda _: "y") == 0 and stray.lease_id not in fake.live()
        assert kept.lease_id in fake.live()
        args.yes = True
        assert leases_cmd.run(args, adapters, ask=lambda _: pytest.fail("--yes asks nothing")) == 0
    finally:
        fake.stop()


def test_audit_cli_names_each_marketplace_without_credentials(monkeypatch, capsys):
    import argparse

    from infermesh_cli import main as cli

    assert "leases" in cli.COMMANDS                      # `infermesh leases ...` (the other commands not imported here)
    parser = argparse.ArgumentParser(prog="infermesh")
    leases_cmd.register(parser.add_subparsers(dest="command", required=True))
    for env in ("VASTAI_API_KEY", "RUNPOD_API_KEY", "AKASH_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(leases_cmd.pulumi_cli, "available", lambda: False)   # no Pulumi CLI: the plan is the reference
    args = parser.parse_args(["leases", "audit", "--stack", "staging"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for kind, env in (("vastai", "VASTAI_API_KEY"), ("runpod", "RUNPOD_API_KEY"), ("akash", "AKASH_API_KEY")):
        assert f"{kind}: skipped: no credentials (set {env})" in out
    assert "total: 0 unknown" in out


# ==== adapter items against the published APIs ============================================================

def test_vast_cuda_filter_and_private_registry(vast, sleeps):
    vast.offers.append(__import__("tests.fakes.marketplaces", fromlist=["vast_offer"]).vast_offer(
        105, dph_total=0.10, cuda_max_good=12.2))              # cheapest, but its driver cannot run CUDA 12.9
    a = vast_adapter(vast, sleeps)
    req = request(min_cuda="12.9", registry="-u bot -p s3cret registry.example")
    assert [o.offer_id for o in a.search(req)] == ["102", "101"]
    assert [o.offer_id for o in a.search(request())][0] == "105"      # without the filter it would be rented
    a.create(req)
    [call, *_] = vast.calls("POST", r"/bundles/$")
    assert call["body"]["cuda_max_good"] == {"gte": 12.9}
    [put] = vast.calls("PUT")
    assert put["body"]["image_login"] == "-u bot -p s3cret registry.example"
    assert "s3cret" not in repr(req)


def test_runpod_capacity_400_tries_each_data_center(runpod, sleeps):
    runpod.full_centers = {"EU-NL-1"}
    state = adapter(RunPod, runpod, sleeps).create(request(cap=1.0))
    posts = runpod.calls("POST", r"/v2/pods$")
    assert [p["body"]["dataCenterIds"] for p in posts] == [["EU-NL-1"], ["EU-SE-1"]]
    assert runpod.pods[state.lease_id]["dataCenterId"] == "EU-SE-1" and len(runpod.pods) == 1


def test_runpod_capacity_400_everywhere_is_out_of_capacity(runpod, sleeps):
    runpod.full_centers = {"EU-NL-1", "EU-SE-1"}
    with pytest.raises(OutOfCapacity) as e:
        adapter(RunPod, runpod, sleeps).create(request(cap=1.0))
    assert len(e.value.failover_history) == 1 and "EU-NL-1, EU-SE-1" in str(e.value.failover_history[0])
    assert len(e.value.failover_history[0].failover_history) == 2 and runpod.pods == {}


def test_runpod_402_and_403_say_what_to_do(runpod, sleeps):
    runpod.balance_low = True
    with pytest.raises(ProviderError) as e:
        adapter(RunPod, runpod, sleeps).create(request(cap=1.0))
    assert e.value.status == 402 and "add funds" in e.value.fix and len(runpod.calls("POST")) == 1
    runpod.balance_low, runpod.forbidden = False, True
    with pytest.raises(AuthFailed) as e:
        adapter(RunPod, runpod, sleeps).search(request(cap=1.0))
    assert e.value.status == 403 and "scope" in e.value.fix and "set a valid key" not in e.value.fix


def test_runpod_only_published_gpu_ids_and_cuda_and_registry(runpod, sleeps):
    from fleet.marketplaces import UnknownGpuType

    with pytest.raises(UnknownGpuType, match="no 'A100-40G'"):
        adapter(RunPod, runpod, sleeps).search(request(gpu="A100-40G", cap=3.0))
    runpod.gpus[0]["cudaVersions"] = ["12.4"]
    with pytest.raises(NoOffers, match="not in the catalog"):
        adapter(RunPod, runpod, sleeps).search(request(cap=1.0, min_cuda="12.9"))
    runpod.gpus[0]["cudaVersions"] = ["12.9"]
    adapter(RunPod, runpod, sleeps).create(request(cap=1.0, min_cuda="12.9", registry="cred-123"))
    assert runpod.calls("GET", r"/v2/catalog/gpus$")[-1]["query"]["minCudaVersion"] == "12.9"
    [post] = runpod.calls("POST", r"/v2/pods$")
    assert post["body"]["gpu"]["minCudaVersion"] == "12.9" and post["body"]["registry"] == "cred-123"


def test_akash_sdl_audited_no_deposit_and_label_from_stored_sdl(akash, sleeps):
    a = akash_adapter(akash, sleeps)
    state = a.create(request(label="infermesh--prod--qwen-eu-akash-0--0123abcd", cap=0.6))
    [post] = akash.calls("POST", r"/v1/deployments$")
    assert set(post["body"]["data"]) == {"sdl"}                               # no deposit
    doc = yaml.safe_load(post["body"]["data"]["sdl"])
    assert doc["profiles"]["placement"]["infermesh--prod--qwen-eu-akash-0--0123abcd"]["signedBy"] == \
        {"anyOf": ["akash1365yvmc4s7awdyj3n2sav7xfx76adc6dnmlx63"]}
    # The list carries no groups: the label comes from the SDL the Console stored.
    listed = akash.route("GET", "/v1/deployments", {}, None)[1]["data"]["deployments"]
    assert listed and all(set(d) == {"deployment", "leases", "escrow_account"} for d in listed)
    assert [s.label for s in a.leases()] == ["infermesh--prod--qwen-eu-akash-0--0123abcd"]
    assert [s.lease_id for s in a.leases_labelled("infermesh--prod--")] == [state.lease_id]


def test_akash_forwarded_port_without_host(akash, sleeps):
    a = akash_adapter(akash, sleeps)
    state = a.wait_running(a.create(request(cap=0.6, ports=(Port(22, "tcp"),))).lease_id)
    assert state.endpoint(22).host == "provider.fake-akash.invalid"
    for lease in akash.deployments[state.lease_id]["leases"]:
        for fp in lease["status"]["forwarded_ports"]["worker"]:
            del fp["host"]                                            # host is optional in the schema
    again = a.status(state.lease_id)
    assert again.status == "running" and again.endpoint(22) is None


def test_vast_waiters_share_one_listing_per_round(vast, sleeps):
    vast.keep_offers = True
    a = vast_adapter(vast, sleeps)
    first, second = a.create(request(label="a")), a.create(request(label="b"))
    before = len(vast.requests)
    seen_a, seen_b = [0], [0]
    for _round in range(3):                      # two leases waiting, three rounds
        a.poll(first.lease_id, seen_a)
        a.poll(second.lease_id, seen_b)
    waiting = vast.requests[before:]
    assert [r["path"] for r in waiting] == ["/api/v0/instances/"] * 3           # one list a round, no reads by id
    # And wait_running itself goes through it.
    vast.boot_polls = 10
    third = a.create(request(label="c"))
    before = len(vast.requests)
    assert a.wait_running(third.lease_id).status == "running"
    assert {r["path"] for r in vast.requests[before:]} == {"/api/v0/instances/"}


# ==== RunPod: the operator's SSH keys on the account (GET/PUT /v2/account/ssh-keys) ======================

def openssh_key(comment: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                 serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"


def test_runpod_ssh_keys_are_added_to_the_account_never_removed(runpod, sleeps):
    """PUT replaces the account's whole set: the adapter reads it, adds what is missing, keeps every key
    there (the operator's others, a teammate's), and writes nothing when nothing is missing."""
    theirs, ours, again = openssh_key("teammate@box"), openssh_key("op@laptop"), openssh_key("op@desk")
    runpod.ssh_keys = [theirs]
    a = adapter(RunPod, runpod, sleeps)
    assert a.register_ssh_keys([ours, again]) == [ours, again]
    [put] = runpod.calls("PUT", r"/v2/account/ssh-keys$")
    assert put["body"] == {"keys": [theirs, ours, again]} and runpod.ssh_keys == [theirs, ours, again]
    # idempotent: a second run (and a key whose comment differs) reads, and writes nothing
    renamed = " ".join(ours.split()[:2]) + " op@other-name"
    assert a.register_ssh_keys([ours, renamed, again]) == [] and len(runpod.calls("PUT")) == 1
    # a key removed by hand meanwhile comes back; the others stay
    runpod.ssh_keys = [again, theirs]
    assert a.register_ssh_keys([ours, again]) == [ours]
    assert runpod.ssh_keys == [again, theirs, ours]
    # an SSH pod gets the account's keys
    state = a.create(request(label="infermesh--prod--ssh-0--0123abcd", cap=1.0, ssh=True, ports=()))
    assert set(runpod.pods[state.lease_id]["env"]["PUBLIC_KEY"].splitlines()) == {again, theirs, ours}


def test_runpod_ssh_keys_unreadable_answer_writes_nothing(runpod, sleeps):
    runpod.ssh_keys = [openssh_key("teammate@box")]
    runpod.route = _keys_answer_as(runpod, {"data": []})                  # a 200 without {"keys": [...]}
    with pytest.raises(ProviderError, match=r"left as they are"):
        adapter(RunPod, runpod, sleeps).register_ssh_keys([openssh_key("op@laptop")])
    assert runpod.calls("PUT") == [] and len(runpod.ssh_keys) == 1


def _keys_answer_as(fake, body):
    route = fake.route

    def answer(method, path, query, req_body):
        if method == "GET" and path == "/v2/account/ssh-keys":
            return 200, body, {}
        return route(method, path, query, req_body)

    return answer


def test_runpod_refused_key_is_not_out_of_capacity(runpod, sleeps):
    with pytest.raises(ProviderError, match=r"refused the keys") as e:
        adapter(RunPod, runpod, sleeps).register_ssh_keys(["ssh-ed25519 AAAAnot-a-key op@laptop"])
    assert not isinstance(e.value, OutOfCapacity) and "ssh_public_keys" in e.value.fix and runpod.ssh_keys == []


def test_other_marketplaces_register_no_account_keys(vast, akash, sleeps):
    assert vast_adapter(vast, sleeps).register_ssh_keys([openssh_key("op@laptop")]) == []
    assert akash_adapter(akash, sleeps).register_ssh_keys([openssh_key("op@laptop")]) == []
    assert not vast.calls("POST", "/ssh/") and not vast.calls("PUT")


# ==== `infermesh leases audit` against `pulumi stack export` (a FAKE pulumi first on PATH) ================

def recorded_export(lease_id: str) -> dict:
    """A `pulumi stack export` document (format v3) as the Pulumi CLI prints it, with one GpuLease; secret
    outputs as the CLI writes them (a signature key and ciphertext)."""
    secret = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270", "ciphertext": "v1:AAAA"}
    lease_urn = ("urn:pulumi:prod::infermesh::infermesh:fleet:WorkerFleet$infermesh:fleet:GpuLease$"
                 "pulumi-python:dynamic/infermesh:GpuLease::qwen-vast-0-lease")
    return {"version": 3, "deployment": {
        "manifest": {"time": "2026-12-01T10:00:00.000000+00:00", "magic": "0" * 64, "version": "v3.140.0"},
        "secrets_providers": {"type": "passphrase", "state": {"salt": "v1:c2FsdA==:v1:AAAA:BBBB"}},
        "resources": [
            {"urn": "urn:pulumi:prod::infermesh::pulumi:pulumi:Stack::infermesh-prod", "custom": False,
             "type": "pulumi:pulumi:Stack", "outputs": {"endpoint": "https://api.example/v1"}},
            {"urn": "urn:pulumi:prod::infermesh::pulumi:providers:pulumi-python::default", "custom": True,
             "id": "5f1c9a7e-0000-4000-8000-000000000000", "type": "pulumi:providers:pulumi-python"},
            {"urn": lease_urn, "custom": True, "id": lease_id, "type": "pulumi-python:dynamic/infermesh:GpuLease",
             "inputs": {"name": "qwen-vast-0", "env": secret}, "outputs": {"lease_id": lease_id, "env": secret,
                                                                         "status": "running"},
             "parent": "urn:pulumi:prod::infermesh::infermesh:fleet:WorkerFleet$infermesh:fleet:GpuLease::qwen-vast-0"},
        ]}}



def test_audit_reads_the_state_from_pulumi_stack_export(vast, sleeps, tmp_path, monkeypatch, capsys, fake_pulumi):
    import json

    from infermesh_cli.main import main

    vast.keep_offers = True
    a = market_adapter("vastai", vast, sleeps)
    kept = a.create(stack_request(name="qwen-vast-0"))
    stray = a.create(stack_request(name="qwen-vast-9"))
    export = tmp_path / "export.json"
    export.write_text(json.dumps(recorded_export(kept.lease_id), indent=4))
    calls = fake_pulumi(f'cat "{export}"')
    for env in ("RUNPOD_API_KEY", "AKASH_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("VASTAI_API_KEY", KEY)
    monkeypatch.setenv("INFERMESH_VASTAI_BASE_URL", vast.url + "/api/v0")
    assert main(["leases", "audit", "--stack", "prod"]) == 1
    out = capsys.readouterr().out
    assert calls.read_text().splitlines() == ["stack export --stack prod"]
    assert "against the stack's state:" in out and "vastai: 1 unknown" in out
    assert f"  {stray.lease_id}  {stray.label}  " in out and f"  {kept.lease_id}  " not in out
    assert "runpod: skipped: no credentials (set RUNPOD_API_KEY)" in out


@pytest.mark.parametrize("scenario, body, said", [
    ("no such stack", "echo \"error: no stack named 'prod' found\" >&2; exit 255",
     "failed (exit status 255: error: no stack named 'prod' found); pass --state FILE instead"),
    ("not logged in", "echo 'error: PULUMI_ACCESS_TOKEN must be set for login during non-interactive CLI sessions'"
                      " >&2; exit 1",
     "failed (exit status 1: error: PULUMI_ACCESS_TOKEN must be set for login during non-interactive CLI sessions)"),
    ("silent failure", "exit 3", "failed (exit status 3); pass --state FILE instead"),
    ("not an export", "echo 'Current stack is prod'", "printed no JSON (Expecting value at line 1"),
    ("JSON, not an export", "echo '[1, 2]'", "printed no export document (AttributeError: "),
])
def test_audit_says_in_one_line_when_pulumi_stack_export_fails(scenario, body, said, monkeypatch, capsys,
                                                               fake_pulumi):
    from infermesh_cli.main import main

    for env in ("VASTAI_API_KEY", "RUNPOD_API_KEY", "AKASH_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    fake_pulumi(body)
    assert main(["leases", "audit", "--stack", "prod"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and captured.out == "", scenario
    assert err.startswith("infermesh leases: `pulumi stack export --stack prod` ") and said in err, err


def test_audit_without_the_pulumi_cli_says_it_uses_the_plan(monkeypatch, capsys, tmp_path):
    from infermesh_cli.main import main

    for env in ("VASTAI_API_KEY", "RUNPOD_API_KEY", "AKASH_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))            # no pulumi anywhere on PATH
    assert main(["leases", "audit", "--stack", "prod"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("leases labelled with stack prod, against the plan (no state: pass --state FILE, or install "
                     "the Pulumi CLI, for an exact audit):")
