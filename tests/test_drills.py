"""Reliability drills on the local stack: real sim workers and a real gateway as processes,
driven by the official openai SDK (AsyncOpenAI, max_retries=0: every failure the gateway lets
through is seen). The seven drills of the reliability issue, plus shedding and degrading.

Each drill starts its own stack from a mutated copy of stacks/Pulumi.local.yaml (demo-chat on
demo-chat-east (2 workers, weight 2) and demo-chat-west (1, weight 1), demo-chat-reserve as
standby, fallback demo-mini on demo-mini-east). Faults are switched on the sim workers at run
time (POST /sim/faults) or by killing them. Timing assertions are the drills' own, with wide
margins: the machine running them may have two busy cores.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import AsyncOpenAI

from gateway import ledger
from gateway.router import EJECT_BASE_S

BIG = {"rpm": 1_000_000, "tpm": 1_000_000_000}


# ---- helpers ---------------------------------------------------------------------------------
def _http(url: str, body: Any = None, token: str | None = None, method: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def fault(stack, pool: str, replica: int = 0, **knobs: Any) -> None:
    status, _ = _http(stack.worker_url(pool, replica) + "/sim/faults", knobs)
    assert status == 200


def pools(stack) -> dict[str, dict]:
    status, body = _http(stack.root_url + "/admin/endpoints", token=stack.admin_token())
    assert status == 200
    return {p["pool"]: p for p in body["pools"]}


def metric(stack, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    _, text = _http(stack.root_url + "/metrics", None, stack.admin_token())
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        if head.split("{", 1)[0] not in (name, name + "_total"):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def kill9(stack, *names: str) -> None:
    procs = dict(stack.stack.procs)
    for n in names:
        procs[n].send_signal(signal.SIGKILL)
    for n in names:
        procs[n].wait(5)


def rows(stack, since: float | None = None) -> list[dict]:
    return ledger.query(stack.state / "ledger.db", since=since)


def wait_rows(stack, ids: set[str], timeout: float = 10.0) -> dict[str, list[dict]]:
    deadline = time.monotonic() + timeout
    while True:
        by: dict[str, list[dict]] = {}
        for r in rows(stack):
            if r["request_id"] in ids:
                by.setdefault(r["request_id"], []).append(r)
        if set(by) >= ids or time.monotonic() > deadline:
            return by
        time.sleep(0.2)


def wait_for(predicate, timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until predicate() held, or None after timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval)
    return None


async def athread(fn, *args, **kw):
    return await asyncio.to_thread(fn, *args, **kw)


def nearest_rank(values: list[float], p: float) -> float:
    """The client's own percentile (nearest rank, the SLO engine's definition, computed here)."""
    s = sorted(values)
    return s[max(1, math.ceil(p / 100 * len(s))) - 1]


def client(stack, tenant: str = "acme", tier: str = "pro", timeout: float = 60.0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.base_url, api_key=stack.key(tenant, tier), max_retries=0, timeout=timeout)


@dataclass
class Outcome:
    rid: str
    sent: float = 0.0
    ttft: float | None = None        # seconds to the first chunk, client side
    ttlt: float | None = None
    started: bool = False            # at least one chunk arrived
    done: bool = False               # the stream ended normally (SDK: finish_reason and usage seen)
    error: BaseException | None = None
    status: int | None = None        # HTTP status of a refused request
    headers: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    text: str = ""
    completion_tokens: int | None = None

    @property
    def server_error(self) -> bool:
        return (self.status or 0) >= 500 or (self.error is not None and self.status is None)


async def stream_chat(c: AsyncOpenAI, rid: str, model: str = "demo-chat", max_tokens: int = 24,
                      o: Outcome | None = None) -> Outcome:
    """One streamed chat completion through the SDK's parser: an error event mid-stream raises
    openai.APIError, a refusal raises openai.APIStatusError. ``o``: an Outcome to fill as it goes."""
    o = o or Outcome(rid)
    o.sent = time.perf_counter()
    try:
        raw = await c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"drill request {rid}"}], max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True}, extra_headers={"x-request-id": rid})
        o.headers = dict(raw.headers)
        finished = False
        async for chunk in raw.parse():
            if not o.started:
                o.started, o.ttft = True, time.perf_counter() - o.sent
            o.model = chunk.model
            for ch in chunk.choices:
                o.text += ch.delta.content or ""
                finished = finished or ch.finish_reason is not None
            if chunk.usage is not None:
                o.completion_tokens = chunk.usage.completion_tokens
        o.ttlt = time.perf_counter() - o.sent
        o.done = finished and o.completion_tokens is not None
    except openai.APIStatusError as e:
        o.status, o.error, o.headers = e.status_code, e, dict(e.response.headers)
    except openai.APIError as e:        # an error event in a started stream, or a connection failure
        o.error = e
    return o


async def stream_raw(c: AsyncOpenAI, rid: str, max_tokens: int = 24) -> Outcome:
    """A streamed chat completion read line by line (still the SDK), to see the literal [DONE]."""
    o = Outcome(rid, sent=time.perf_counter())
    try:
        async with c.chat.completions.with_streaming_response.create(
                model="demo-chat", messages=[{"role": "user", "content": f"drain {rid}"}], max_tokens=max_tokens,
                stream=True, extra_headers={"x-request-id": rid}) as resp:
            async for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                if not o.started:
                    o.started, o.ttft = True, time.perf_counter() - o.sent
                if line == "data: [DONE]":
                    o.done = True
                elif '"error"' in line[:12]:
                    o.error = RuntimeError(line)
    except openai.APIStatusError as e:
        o.status, o.error = e.status_code, e
    except Exception as e:              # connection refused / cut: recorded, judged by the drill
        o.error = e
    return o


async def run_load(n: int, concurrency: int, make) -> list[Outcome]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Outcome:
        async with sem:
            return await make(i)
    return await asyncio.gather(*(one(i) for i in range(n)))


def mutate_with(*fns):
    def mutate(cfg: dict) -> None:
        for t in cfg["tiers"]:
            t.update(BIG)
        for fn in fns:
            fn(cfg)
    return mutate


def pool_cfg(cfg: dict, name: str) -> dict:
    return next(p for p in cfg["pools"] if p["name"] == name)


def tier_cfg(cfg: dict, name: str) -> dict:
    return next(t for t in cfg["tiers"] if t["name"] == name)


# ---- drill 1 (+ drill 7): a whole pool killed under load; the SLO report matches the client ----
async def test_drill1_kill_pool_under_load_and_drill7_slo_report_matches_client(stack_factory):
    def slow_east(cfg):
        pool_cfg(cfg, "demo-chat-east")["sim"].update(itl_ms=150)    # ~3.6 s streams: many are mid-flight
    stack = stack_factory(mutate_with(slow_east))
    c = client(stack, timeout=30)

    async def staggered(i: int) -> Outcome:
        await asyncio.sleep(i * 0.01)            # 200 requests sent over 2 s, all concurrent
        return await stream_chat(c, f"d1-{i}")

    tasks = [asyncio.create_task(staggered(i)) for i in range(200)]

    def east_streams() -> int:
        return sum(e["outstanding"] for e in pools(stack)["demo-chat-east"]["endpoints"])
    # kill while streams run on east (their first tokens out) and requests are still arriving
    assert await athread(wait_for, lambda: east_streams() >= 20, 20.0, 0.05) is not None
    await asyncio.sleep(0.8)
    await athread(kill9, stack, "demo-chat-east-0", "demo-chat-east-1")
    unsent = sum(not t.done() for t in tasks)
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 60)      # none hangs
    await c.close()

    broken = [o for o in outcomes if o.error is not None]
    not_started = [o for o in broken if not o.started]
    assert not not_started, f"{len(not_started)} requests failed before streaming: {not_started[0].error!r}"
    # started streams that broke ended with an error event, which the SDK raised as APIError
    for o in broken:
        assert isinstance(o.error, openai.APIError) and not isinstance(o.error, openai.APIStatusError)
        assert "interrupted" in str(o.error)
    ok = [o for o in outcomes if o.done]
    assert len(ok) + len(broken) == 200
    retries = await athread(metric, stack, "infermesh_retries")
    print(f"\ndrill 1: {len(ok)} completed, {len(broken)} streams broken mid-way by the kill, "
          f"{retries:.0f} retries of unstarted requests, {unsent} requests unfinished at the kill")
    assert broken, "the kill hit no stream in flight; the drill did not exercise the error event"
    assert retries > 0, "no unstarted request met the dead pool; the drill did not exercise failover"

    # the ledger has exactly one row per request, with the outcome the client saw
    by = await athread(wait_rows, stack, {o.rid for o in outcomes})
    assert set(by) == {o.rid for o in outcomes}
    assert all(len(v) == 1 for v in by.values())
    for o in outcomes:
        r = by[o.rid][0]
        assert (r["status"] == 200) == o.done, (o, r)
        if o.error is not None:
            assert r["status"] == 502 and r["error"] == "stream_interrupted"

    # everything the issue lists is on /metrics
    _, text = await athread(_http, stack.root_url + "/metrics", None, stack.admin_token())
    for family in ("requests", "ttft_seconds", "ttlt_seconds", "tokens", "upstream_errors", "retries",
                   "ejections", "fallbacks", "shed", "pool_healthy_endpoints", "in_flight", "probes",
                   "probe_pass_rate", "degraded"):
        assert f"# TYPE infermesh_{family} " in text or f"# TYPE infermesh_{family}_total " in text, family
    assert await athread(metric, stack, "infermesh_upstream_errors", pool="demo-chat-east",
                         error_class="stream_reset") == len(broken)
    assert await athread(metric, stack, "infermesh_requests", status_class="5xx", tier="pro") == len(broken)

    # ---- drill 7: the SLO report vs the client's own count ----------------------------------
    # A second, steadier drill on what is left (west, and the standby): west now breaks every
    # stream after 5 chunks, so it is ejected, serves again after its ejection time, breaks again;
    # business-tier requests at concurrency 4, so the client's own timings are not dominated by
    # its event loop (as they are with 200 SDK streams in one process on a small machine).
    await athread(fault, stack, "demo-chat-west", 0, mode="reset", reset_after=5)
    biz = client(stack, "steady", "business")
    steady = await run_load(80, 4, lambda i: stream_chat(biz, f"d7-{i}"))
    await biz.close()
    assert all(o.done or (o.started and o.error is not None) for o in steady)
    await athread(wait_rows, stack, {o.rid for o in steady})

    status, report = await athread(_http, stack.root_url + "/admin/slo?hours=1", None, stack.admin_token())
    assert status == 200
    customers = {(c["tenant"], c["tier"]): c for c in report["customers"]}
    print(f"drill 7: customers in the report: {sorted(customers)}; period {report['period']}")
    for key, mine in ((("acme", "pro"), outcomes), (("steady", "business"), steady)):
        c = customers[key]
        errors = sum(1 for o in mine if o.server_error)
        print(f"drill 7: {key}: report {c['requests']} requests, {c['service_errors']} failed by the service, "
              f"{c['bad_minutes']} bad minutes; client {len(mine)}, {errors}")
        assert c["requests"] == len(mine)
        assert c["service_errors"] == errors
        assert (c["bad_minutes"] > 0) == (errors > 0)                   # a 5xx makes its minute bad
    assert sum(1 for o in steady if o.server_error) > 0
    c = customers[("steady", "business")]
    client_ttft = [o.ttft * 1000 for o in steady if o.done]
    # Server TTFT runs from the gateway reading the request to it relaying the first event; the
    # client's from the SDK call to the parsed first chunk, so it contains the server's interval:
    # server <= client for every request, hence for every nearest-rank percentile. The report
    # shows the bucket (gt, le] that holds the server's percentile (gateway/sla.py), so
    # gt < server <= client. The difference is the client's own overhead, bounded here by 100 ms
    # + 25% of the client's value (a loaded 2-core machine runs the client, the gateway and five
    # workers): le >= server >= 0.75 client - 100.
    for p in (50, 95, 99):
        bucket, mine = c["ttft_ms"][f"p{p}"], nearest_rank(client_ttft, p)
        print(f"drill 7: business TTFT p{p}: report ({bucket['gt']}, {bucket['le']}] ms, client {mine:.1f} ms")
        assert bucket["gt"] < mine + 1.0
        assert bucket["le"] is None or bucket["le"] >= 0.75 * mine - 100


# ---- drill 2: a pool that accepts connections and never answers --------------------------------
async def test_drill2_hung_pool_times_out_and_fails_over(stack_factory):
    def ttft_1s(cfg):
        tier_cfg(cfg, "pro")["timeouts"] = {"ttft_s": 1.0}
    stack = stack_factory(mutate_with(ttft_1s))
    await athread(fault, stack, "demo-chat-west", 0, mode="hang")
    c = client(stack, timeout=30)
    outcomes = await run_load(150, 10, lambda i: stream_chat(c, f"d2-{i}"))
    await c.close()
    assert all(o.done for o in outcomes), [o.error for o in outcomes if not o.done][:3]

    by = await athread(wait_rows, stack, {o.rid for o in outcomes})
    retried = [o for o in outcomes if by[o.rid][0]["retries"]]
    healthy = [o.ttft for o in outcomes if not by[o.rid][0]["retries"]]
    assert retried, "no request met the hung pool"
    assert all(by[o.rid][0]["pool"] != "demo-chat-west" for o in outcomes)
    p99, healthy_p99 = nearest_rank([o.ttft for o in outcomes], 99), nearest_rank(healthy, 99)
    print(f"\ndrill 2: {len(retried)} failed over; p99 TTFT {p99 * 1000:.0f} ms, healthy p99 "
          f"{healthy_p99 * 1000:.0f} ms, max {max(o.ttft for o in outcomes) * 1000:.0f} ms")
    # the bound: TTFT timeout + a healthy pool's TTFT (its p99, measured in this run), plus 0.5 s
    # for a noisy machine; without the timeout a request would wait for the client's 30 s
    assert p99 <= 1.0 + healthy_p99 + 0.5
    # passive outlier detection took the hung endpoint out: a missed first-token deadline ejects at once
    # (issue 17; it took three timeouts in a row before)
    west = (await athread(pools, stack))["demo-chat-west"]["endpoints"][0]
    assert west["ejections"] >= 1
    assert await athread(metric, stack, "infermesh_upstream_errors", pool="demo-chat-west",
                         error_class="timeout") >= 1


# ---- drill 3: a pool whose TTFT degrades --------------------------------------------------------
async def test_drill3_slow_pool_is_ejected_and_readmitted(stack_factory):
    def fast_checks(cfg):
        cfg["gateway"].update(probe_interval_s=1, health_interval_s=1)
    stack = stack_factory(mutate_with(fast_checks))
    # demo-chat's slow limit: the strictest TTFT SLO of its tiers (business, 1000 ms)
    await athread(fault, stack, "demo-chat-west", 0, mode="slow", ttft_ms=1500)
    c = client(stack, timeout=30)
    stop = asyncio.Event()
    outcomes: list[Outcome] = []

    async def background() -> None:
        i = 0
        while not stop.is_set():
            outcomes.append(await stream_chat(c, f"d3-{i}-{id(asyncio.current_task())}"))
            i += 1
    workers = [asyncio.create_task(background()) for _ in range(3)]

    def west() -> dict:
        return pools(stack)["demo-chat-west"]["endpoints"][0]
    try:
        # the configured window: three failures (slow answers or failed probes, one probe a second)
        # at 1.5 s each, plus a probe interval and a health interval: 6.5 s; asserted with 2x margin
        took = await athread(wait_for, lambda: not west()["available"], 13.0)
        assert took is not None, f"not ejected: {west()}"
        w = await athread(west)
        assert w["healthy"] and w["ejected_for_s"] > 0 and w["ejections"] == 1 and w["slow_answers"] >= 1
        print(f"\ndrill 3: ejected after {took:.1f} s ({w['slow_answers']} slow answers)")
        await athread(fault, stack, "demo-chat-west", 0, mode="none", ttft_ms=None)
        t_fixed = time.time()
        # back after its ejection time (5 s) and a passing check (1 s), with margin
        back = await athread(wait_for, lambda: west()["available"], EJECT_BASE_S + 8.0)
        assert back is not None, f"not readmitted: {west()}"
        print(f"drill 3: readmitted {back:.1f} s after recovery")
        t_back = time.time()
        assert await athread(wait_for, lambda: any(r["pool"] == "demo-chat-west" and r["created_at"] > t_back
                                                   for r in rows(stack, t_back)), 10.0) is not None
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await c.close()
    assert all(o.done for o in outcomes)                # slow answers were still served
    p = (await athread(pools, stack))["demo-chat-west"]
    assert p["probes"]["probes"] > 0 and p["probes"]["pass_rate"] < 1.0
    assert await athread(metric, stack, "infermesh_probes", pool="demo-chat-west", result="ttft") >= 1
    assert await athread(metric, stack, "infermesh_ejections", pool="demo-chat-west") >= 1
    assert t_back > t_fixed


# ---- drill 4: every primary down, then every pool of the model down ----------------------------
async def test_drill4_standby_then_fallback_or_503(stack_factory):
    def basic_tier(cfg):
        cfg["tiers"].append({**tier_cfg(cfg, "pro"), "name": "basic", "models": ["demo-chat"],
                             "allow_fallback": False, "monthly_fee": 0})
    stack = stack_factory(mutate_with(basic_tier))
    pro, basic = client(stack), client(stack, "plain", "basic")
    await athread(kill9, stack, "demo-chat-east-0", "demo-chat-east-1", "demo-chat-west-0")
    # at once, before any health check noticed: retried onto the standby, none fails
    first = await run_load(20, 5, lambda i: stream_chat(pro, f"d4a-{i}"))
    assert all(o.done for o in first)
    await athread(wait_for, lambda: not any(e["available"] for name in ("demo-chat-east", "demo-chat-west")
                                            for e in pools(stack)[name]["endpoints"]), 10.0)
    second = await run_load(10, 5, lambda i: stream_chat(pro, f"d4b-{i}"))
    assert all(o.done and o.model == "demo-chat" for o in second)
    by = await athread(wait_rows, stack, {o.rid for o in first + second})
    assert {by[o.rid][0]["pool"] for o in first + second} == {"demo-chat-reserve"}

    await athread(kill9, stack, "demo-chat-reserve-0")
    for phase in ("at once", "after the health checks"):
        fb = await run_load(6, 3, lambda i, phase=phase: stream_chat(pro, f"d4c-{phase[:2]}-{i}"))
        assert all(o.done for o in fb)
        assert all(o.model == "demo-mini" and o.headers.get("x-infermesh-fallback") == "demo-mini" for o in fb)
        raw = await pro.chat.completions.with_raw_response.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert raw.parse().model == "demo-mini" and raw.headers["x-infermesh-fallback"] == "demo-mini"
        refused = await run_load(4, 2, lambda i, phase=phase: stream_chat(basic, f"d4d-{phase[:2]}-{i}"))
        for o in refused:
            assert o.status == 503 and int(o.headers["retry-after"]) > 0
            assert o.error.code == "no_capacity"
        await athread(wait_for, lambda: not any(e["available"] for e in
                                                pools(stack)["demo-chat-reserve"]["endpoints"]), 10.0)
    await pro.close()
    await basic.close()
    assert await athread(metric, stack, "infermesh_fallbacks", model="demo-chat", fallback="demo-mini") >= 12


# ---- drill 5: SIGTERM to the gateway with streams in flight ------------------------------------
async def test_drill5_sigterm_drains_in_flight_streams(stack_factory):
    def long_streams(cfg):
        cfg["gateway"]["drain_timeout_s"] = 20
        for name in ("demo-chat-east", "demo-chat-west"):
            pool_cfg(cfg, name)["sim"].update(itl_ms=100)         # 24 tokens: ~2.4 s streams
    stack = stack_factory(mutate_with(long_streams))
    gw = stack.gateway_proc()
    c = client(stack, timeout=30)
    tasks = [asyncio.create_task(stream_raw(c, f"d5-{i}")) for i in range(30)]
    await asyncio.sleep(0.1)
    assert await athread(wait_for, lambda: metric(stack, "infermesh_in_flight") >= 30, 10.0) is not None
    await asyncio.sleep(0.3)
    t_term = time.monotonic()
    gw.send_signal(signal.SIGTERM)
    # it stops accepting: a new connection is refused while the streams still run
    fresh = client(stack, timeout=5)
    refused = False
    for _ in range(20):
        try:
            await fresh.models.list()
        except openai.APIConnectionError:
            refused = True
            break
        await asyncio.sleep(0.1)
    await fresh.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    await c.close()
    code = await athread(gw.wait, 25)
    took = time.monotonic() - t_term
    started = [o for o in outcomes if o.started]
    dropped = [o for o in started if not o.done or o.error is not None]
    print(f"\ndrill 5: {len(started)} streams in flight at SIGTERM, {len(dropped)} dropped; "
          f"gateway exited {code} after {took:.1f} s")
    assert refused
    assert len(started) == 30 and not dropped
    assert code == 0 and took < 20
    log = (stack.state / "logs" / "gateway.log").read_text()
    assert "Application shutdown complete" in log and "timeout graceful shutdown exceeded" not in log
    by = await athread(wait_rows, stack, {o.rid for o in outcomes})
    assert all(by[o.rid][0]["status"] == 200 for o in outcomes)


# ---- drill 6: routing change under load ------------------------------------------------------
async def test_drill6_routing_change_under_load(stack_factory):
    stack = stack_factory(mutate_with())
    c = client(stack)
    routing = stack.state / "routing.json"
    stop = asyncio.Event()
    outcomes: list[Outcome] = []

    async def background(w: int) -> None:
        i = 0
        while not stop.is_set():
            outcomes.append(await stream_chat(c, f"d6-{w}-{i}", max_tokens=8))
            i += 1

    def rewrite(change) -> None:
        config = json.loads(routing.read_text())
        for m in config["models"]:
            for p in m["pools"]:
                change(p)
        tmp = routing.with_suffix(".new")
        tmp.write_text(json.dumps(config))
        os.replace(tmp, routing)

    def version() -> int:
        return _http(stack.root_url + "/admin/endpoints", token=stack.admin_token())[1]["version"]

    def share(since: float, until: float) -> tuple[int, float]:
        rs = [r for r in rows(stack, since) if r["created_at"] < until and r["requested_model"] == "demo-chat"]
        west = sum(1 for r in rs if r["pool"] == "demo-chat-west")
        return len(rs), west / max(1, len(rs))

    workers = [asyncio.create_task(background(w)) for w in range(8)]
    try:
        await asyncio.sleep(3)
        v0 = await athread(version)
        t1 = time.time()
        before = await athread(share, t1 - 2.5, t1)

        def weights(p):
            p["weight"] = {"demo-chat-east": 1, "demo-chat-west": 3}.get(p["name"], p["weight"])
        await athread(rewrite, weights)
        applied = await athread(wait_for, lambda: version() > v0, 5.0, 0.1)
        assert applied is not None, "the new routing config was not applied within 5 s"
        await asyncio.sleep(5 + 4 - (time.time() - t1))
        n, after = await athread(share, t1 + 5, t1 + 9)
        print(f"\ndrill 6: applied in {applied:.1f} s; west share {before[1]:.2f} of {before[0]} before, "
              f"{after:.2f} of {n} from 5 s after the change (weights 1:3 -> expected 0.75)")
        assert n >= 40
        assert before[1] < 0.5
        assert abs(after - 0.75) <= 0.15

        # the plan drains west: its role becomes drained, weight 0; it gets no new request
        def drain(p):
            if p["name"] == "demo-chat-west":
                p.update(role="drained", weight=0.0)
        v1, t2 = await athread(version), time.time()
        await athread(rewrite, drain)
        assert await athread(wait_for, lambda: version() > v1, 5.0, 0.1) is not None
        await asyncio.sleep(5 + 3 - (time.time() - t2))
        n2, drained_share = await athread(share, t2 + 5, t2 + 8)
        assert n2 >= 20 and drained_share == 0.0
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await c.close()
    failed = [o for o in outcomes if not o.done]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[0].error!r}"
    assert (await athread(pools, stack))["demo-chat-west"]["role"] == "drained"


# ---- shedding and degrading ------------------------------------------------------------------
async def test_overload_sheds_lowest_tier_first_and_caps_max_tokens_under_slo_risk(stack_factory):
    def tight(cfg):
        cfg["gateway"]["max_in_flight"] = 10       # hobby refused from 7 in flight, pro 8.5, business 10
        for name in ("pro", "business"):
            tier_cfg(cfg, name)["slo"]["ttft_p95_ms"] = 250
        tier_cfg(cfg, "pro")["degraded_max_output_tokens"] = 4
    stack = stack_factory(mutate_with(tight))
    hobby, pro, biz = client(stack, "small", "hobby"), client(stack, "mid", "pro"), client(stack, "big", "business")
    chat = [("demo-chat-east", 0), ("demo-chat-east", 1), ("demo-chat-west", 0)]
    for pool, i in chat:
        await athread(fault, stack, pool, i, itl_ms=150)                 # ~3.6 s streams hold the slots
    holders = [asyncio.create_task(stream_chat(biz, f"hold-{i}")) for i in range(8)]
    assert await athread(wait_for, lambda: metric(stack, "infermesh_in_flight") >= 8, 10.0) is not None
    shed_h = await stream_chat(hobby, "shed-hobby", model="demo-mini")
    shed_p = await stream_chat(pro, "shed-pro")
    served_b = await stream_chat(biz, "served-business")
    assert shed_h.status == 429 and shed_h.error.code == "overloaded" and int(shed_h.headers["retry-after"]) > 0
    assert shed_p.status == 429 and shed_p.error.code == "overloaded"
    assert served_b.done
    assert all(o.done for o in await asyncio.gather(*holders))
    assert await athread(metric, stack, "infermesh_shed", tier="hobby") == 1
    assert await athread(metric, stack, "infermesh_shed", tier="pro") == 1
    by = await athread(wait_rows, stack, {"shed-hobby", "shed-pro"})
    assert {r[0]["error"] for r in by.values()} == {"overloaded"}

    # every demo-chat worker slows to 400 ms TTFT: the model's p95 TTFT is over pro's SLO (250 ms)
    for pool, i in chat:
        await athread(fault, stack, pool, i, itl_ms=None, ttft_ms=400)
    slow = await run_load(12, 4, lambda i: stream_chat(biz, f"slow-{i}"))
    assert all(o.done and o.completion_tokens == 24 for o in slow)      # business has no degraded cap
    await asyncio.sleep(1.1)                                              # the risk window's refresh
    capped = await stream_chat(pro, "capped")
    assert capped.done and capped.completion_tokens == 4 and capped.headers["x-infermesh-degraded"] == "max_tokens"
    uncapped = await stream_chat(biz, "uncapped")
    assert uncapped.completion_tokens == 24 and "x-infermesh-degraded" not in uncapped.headers
    mini = await stream_chat(pro, "mini", model="demo-mini", max_tokens=8)
    assert mini.completion_tokens == 8                                    # demo-mini is not at risk
    assert await athread(metric, stack, "infermesh_degraded", tier="pro") == 1
    # all of demo-chat slowed at once: an overload, not an outlier; nothing was ejected
    state = await athread(pools, stack)
    assert all(e["available"] for p in state.values() for e in p["endpoints"]), json.dumps(state, indent=1)
    for c in (hobby, pro, biz):
        await c.close()


async def test_a_saturated_event_loop_sheds_new_requests_then_recovers(stack_factory):
    """An in-flight count cannot tell when one core is out of time; the event loop's lateness
    can (gateway/overload.py). The gateway process is stopped for 1.5 s (SIGSTOP): a loop as
    late as a saturated core's. The requests that arrive meanwhile are refused at once with
    429 `overloaded` (and metered), not left to queue; within a second the loop is on time
    and the gateway serves again."""
    stack = stack_factory()
    gw = stack.gateway_proc()
    hobby, biz = client(stack, "small", "hobby"), client(stack, "big", "business")
    assert (await stream_chat(biz, "before")).done
    assert await athread(metric, stack, "infermesh_event_loop_lag_seconds") < 0.07
    os.kill(gw.pid, signal.SIGSTOP)
    try:
        waiting = [asyncio.create_task(stream_chat(c, f"stalled-{i}", model=m))
                   for i, (c, m) in enumerate([(hobby, "demo-mini"), (biz, "demo-chat")] * 2)]
        await asyncio.sleep(1.5)
    finally:
        os.kill(gw.pid, signal.SIGCONT)
    stalled = await asyncio.gather(*waiting)
    assert [o.status for o in stalled] == [429] * 4, [(o.status, o.error) for o in stalled]
    assert {o.error.code for o in stalled} == {"overloaded"}
    assert await athread(metric, stack, "infermesh_shed", tier="hobby") == 2
    assert await athread(metric, stack, "infermesh_shed", tier="business") == 2
    after = await athread(wait_for, lambda: metric(stack, "infermesh_event_loop_lag_seconds") < 0.02, 10.0)
    assert after is not None
    assert (await stream_chat(hobby, "after", model="demo-mini")).done
    by = await athread(wait_rows, stack, {f"stalled-{i}" for i in range(4)})
    assert {r[0]["error"] for r in by.values()} == {"overloaded"}
    for c in (hobby, biz):
        await c.close()


async def test_non_stream_request_on_a_worker_that_goes_dark_is_retried(stack_factory):
    """A non-stream answer arrives whole, so no TTFT timeout applies: a request waiting on a
    worker that stops answering (a partition) is moved to another endpoint as soon as an
    active check finds the worker down, instead of waiting out the tier's total timeout."""
    stack = stack_factory(mutate_with(lambda c: tier_cfg(c, "pro").setdefault("timeouts", {}).update(total_s=120)))
    fault(stack, "demo-chat-west", mode="hang")
    c = client(stack, timeout=150)
    started = time.monotonic()
    tasks = [asyncio.create_task(c.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4)) for i in range(30)]
    west = stack.worker_url("demo-chat-west")
    assert await athread(wait_for, lambda: _http(west + "/sim/stats")[1]["hanging"] > 0, 20), \
        "no request reached the hanging worker"
    fault(stack, "demo-chat-west", unhealthy=True)     # the next active check sees it down
    results = await asyncio.gather(*tasks)
    assert all(r.choices[0].message.content for r in results)
    # far below the 120 s total timeout: the health interval (2 s) plus the watch period
    assert time.monotonic() - started < 60
