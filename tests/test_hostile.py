"""Hostile clients against a real gateway process (gateway/door.py): one tenant's slow
requests cannot starve another, request heads and bodies have limits and deadlines, deep
JSON is a 400 naming the field, made-up model names do not become metric series, failures
are limited per client address, no redirect to a client-chosen host, and a bug in the request
path is a metered 500. Figures are printed; timing assertions are loose on purpose.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import orjson
import pytest
from openai import OpenAI

from gateway import ledger

HOST = "127.0.0.1"


def _port(stack) -> int:
    return int(stack.base_url.rsplit(":", 1)[1].split("/")[0])


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _post(stack, path: str, body: bytes, key: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(stack.base_url + path, data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def _read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict]:
    """Status and JSON body of one HTTP answer on a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split(b" ", 2)[1])
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
    return status, orjson.loads(await asyncio.wait_for(reader.readexactly(length), timeout))


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0]
    return next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))


def _chat(key: str, content: str = "hi", **extra) -> bytes:
    return orjson.dumps({"model": "demo-mini", "messages": [{"role": "user", "content": content}], **extra})


@pytest.fixture(scope="module")
def door_stack(tmp_path_factory):
    """The local stack with short deadlines and a small hobby concurrency cap."""
    from tests.conftest import start_stack

    def mutate(cfg):
        # max_loop_lag_ms 0: what these tests hold is per-tenant isolation (caps, deadlines). The
        # loop-lag shedder answers the whole machine's CPU (here shared with the 2,000 connections a
        # test opens itself, and with whatever else runs): on a loaded machine it gave the victim's
        # business requests a 429 (a helper's runs, issue 20). It has its own tests (test_overload.py).
        cfg["gateway"].update(header_timeout_s=1.5, body_timeout_s=2, max_header_bytes=16384, max_headers=50,
                              max_loop_lag_ms=0)
        for t in cfg["tiers"]:
            if t["name"] == "hobby":
                t["max_concurrent_requests"] = 40
    running = start_stack(tmp_path_factory.mktemp("door"), mutate)
    try:
        yield running
    finally:
        running.stack.stop()


# ---- one tenant cannot starve another --------------------------------------------------------


def test_slow_requests_of_one_tenant_leave_other_tenants_untouched(door_stack):
    """2,000 connections of one hobby key send their head and part of a body, then stall.
    The tenant's first 40 hold its cap until their body deadline (408, metered to it); the rest get
    429 naming its own limit at once. Another tenant's requests meanwhile succeed, with p99 about
    unchanged."""
    stack = door_stack
    attacker, victim = stack.key("mallory", "hobby"), stack.key("bigco", "business")
    port = _port(stack)
    victim_body = orjson.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}],
                                "max_tokens": 4})

    def victim_latencies(n: int) -> tuple[list[float], list[int]]:
        out, statuses = [], []
        for _ in range(n):
            t = time.perf_counter()
            status, _ = _post(stack, "/chat/completions", victim_body, victim)
            out.append(time.perf_counter() - t)
            statuses.append(status)
        return sorted(out), statuses

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))]

    before, _ = victim_latencies(40)

    async def attack():
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {attacker}\r\n"
                f"content-type: application/json\r\ncontent-length: 4000\r\n\r\n").encode()
        conns = []
        for i in range(2000):
            r, w = await asyncio.open_connection(HOST, port)
            w.write(head + b'{"model": "demo-mini", "mess')
            conns.append((r, w))
            if i % 200 == 199:
                await asyncio.sleep(0)
        during = await asyncio.to_thread(victim_latencies, 40)
        answers = await asyncio.gather(*(_read_answer(r, 15) for r, _ in conns), return_exceptions=True)
        for _, w in conns:
            w.close()
        return during, answers

    (during, victim_statuses), answers = asyncio.run(attack())
    codes: dict[tuple, int] = {}
    for a in answers:
        key = (a[0], a[1]["error"]["code"]) if isinstance(a, tuple) else (type(a).__name__,)
        codes[key] = codes.get(key, 0) + 1
    print(f"\n[door] victim p99 before {p99(before) * 1000:.1f} ms, during 2,000 stalled attacker connections "
          f"{p99(during) * 1000:.1f} ms; attacker answers {codes}")
    assert set(victim_statuses) == {200}
    # 40 hold the cap until their body deadline; on a slow machine, connections still being opened
    # when those 40 time out take the freed slots and time out in turn: more 408s, never fewer
    timed_out, refused = codes.get((408, "request_timeout"), 0), codes.get((429, "concurrent_requests_exceeded"), 0)
    assert timed_out >= 40 and timed_out + refused == 2000
    assert p99(during) < max(1.0, 5 * p99(before))
    rows = [r for r in ledger.query(stack.state / "ledger.db", tenant="mallory")]
    assert sum(r["status"] == 408 for r in rows) == timed_out   # the stalls are metered to their tenant


# ---- request heads and bodies ----------------------------------------------------------------


def test_huge_header_block_is_refused_without_buffering(door_stack):
    pid = door_stack.gateway_proc().pid
    rss = _rss_kb(pid)

    def send_64_mib() -> tuple[int, tuple[int, dict]]:
        """Send a 64 MiB header as fast as the gateway takes it, stopping when it answers."""
        s = socket.create_connection((HOST, _port(door_stack)), timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent, chunk = 0, b"a" * (1 << 20)
        try:
            while sent < 64 << 20 and not select.select([s], [], [], 0)[0]:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            part = s.recv(65536)
            if not part:
                break
            data += part
        s.close()
        head, body = data.split(b"\r\n\r\n", 1)
        return sent, (int(head.split(b" ", 2)[1]), orjson.loads(body))

    sent, (status, body) = send_64_mib()
    grown = _rss_kb(pid) - rss
    print(f"\n[door] 64 MiB header block: gateway took {sent >> 20} MiB before closing, answered {status}, "
          f"RSS {grown:+d} kB")
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    assert grown < 8 * 1024


def test_too_many_header_fields_is_431(door_stack):
    async def go():
        r, w = await asyncio.open_connection(HOST, _port(door_stack))
        w.write(b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(60)) + b"\r\n")
        answer = await _read_answer(r, 5)
        w.close()
        return answer
    status, body = asyncio.run(go())
    assert status == 431 and body["error"]["code"] == "too_many_headers"


def test_silent_and_dribbling_connections_are_closed_at_the_head_deadline(door_stack):
    async def silent():
        r, w = await asyncio.open_connection(HOST, _port(door_stack))
        t = time.perf_counter()
        answer = await _read_answer(r, 10)
        eof = await asyncio.wait_for(r.read(), 5)
        w.close()
        return answer, time.perf_counter() - t, eof

    async def dribble():
        r, w = await asyncio.open_connection(HOST, _port(door_stack))
        t = time.perf_counter()
        answer = asyncio.ensure_future(_read_answer(r, 10))
        for b in b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: " + b"y" * 100:
            if answer.done():
                break
            w.write(bytes([b]))
            await asyncio.sleep(0.1)
        got = await answer
        w.close()
        return got, time.perf_counter() - t

    ((status, body), took, eof) = asyncio.run(silent())
    assert (status, body["error"]["code"], eof) == (408, "request_timeout", b"") and took < 6
    (status, _), took = asyncio.run(dribble())
    assert status == 408 and took < 6


def test_slow_body_is_408_metered_to_its_tenant(door_stack):
    key = door_stack.key("dribbler", "pro")

    async def go():
        r, w = await asyncio.open_connection(HOST, _port(door_stack))
        w.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
                f"x-request-id: slow-body-1\r\ncontent-length: 200\r\n\r\n{{\"model\"".encode())
        answer = await _read_answer(r, 10)
        w.close()
        return answer
    status, body = asyncio.run(go())
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    (row,) = [r for r in ledger.query(door_stack.state / "ledger.db") if r["request_id"] == "slow-body-1"]
    assert (row["tenant"], row["status"], row["error"]) == ("dribbler", 408, "request_timeout")


# ---- JSON and the prompt cap -----------------------------------------------------------------


@pytest.mark.parametrize("field, depth", [("metadata_like", 300), ("messages", 300), ("model", 1000),
                                          ("x_extra", 10_000)])
def test_deep_json_is_400_naming_the_field_and_metered(door_stack, field, depth):
    key = door_stack.key("deep", "pro")
    deep = "[" * depth + "]" * depth
    if field == "messages":
        body = ('{"model": "demo-chat", "messages": [{"role": "user", "content": %s}]}' % deep).encode()
    elif field == "model":
        body = ('{"model": %s, "messages": [{"role": "user", "content": "x"}]}' % deep).encode()
    else:
        body = ('{"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], "%s": %s}'
                % (field, deep)).encode()
    status, err = _post(door_stack, "/chat/completions", body, key, {"x-request-id": f"deep-{field}"})
    assert status == 400, err
    if depth <= 1000:
        assert err["error"]["param"] == field and err["error"]["code"] in ("too_deep", "invalid_value")
    (row,) = [r for r in ledger.query(door_stack.state / "ledger.db") if r["request_id"] == f"deep-{field}"]
    assert row["status"] == 400


@pytest.mark.parametrize("where", ["name", "tool_description", "tool_call_arguments", "response_format"])
def test_prompt_cap_counts_every_field_the_worker_reads(door_stack, where):
    """hobby allows 2,048 prompt tokens: 200 kB anywhere the worker reads is over it."""
    key = door_stack.key("capper", "hobby")
    big = "word " * 40_000
    msgs = [{"role": "user", "content": "hi"}]
    extra = {}
    if where == "name":
        msgs[0]["name"] = big
    elif where == "tool_description":
        extra["tools"] = [{"type": "function", "function": {"name": "f", "description": big,
                                                            "parameters": {"type": "object"}}}]
    elif where == "tool_call_arguments":
        msgs += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": big}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    else:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "description": big}}}
    status, err = _post(door_stack, "/chat/completions", orjson.dumps(
        {"model": "demo-mini", "messages": msgs, **extra}), key)
    assert (status, err["error"]["code"]) == (400, "context_length_exceeded")
    # a large image is not text: it does not count as its base64 length
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200_000}}
    status, _ = _post(door_stack, "/chat/completions", orjson.dumps(
        {"model": "demo-mini", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}),
        key)
    assert status == 200


# ---- labels, redirects, admin inputs ---------------------------------------------------------


def test_made_up_model_names_are_one_metric_series_and_failures_are_limited_per_address(stack_factory):
    def mutate(cfg):
        cfg["gateway"]["failures_per_minute"] = 30
    stack = stack_factory(mutate)
    c = OpenAI(base_url=stack.base_url, api_key=stack.key("prober", "pro"), max_retries=0)
    statuses = []
    for i in range(40):
        try:
            c.chat.completions.create(model=f"no-such-model-\x1b[31m{i}", messages=[{"role": "user", "content": "x"}])
        except openai.APIStatusError as e:
            statuses.append((e.status_code, e.body["code"]))
    assert statuses[:30] == [(404, "model_not_found")] * 30
    assert set(statuses[30:]) == {(429, "too_many_failed_requests")}
    with pytest.raises(urllib.error.HTTPError) as refused:        # /metrics is the operator's
        urllib.request.urlopen(stack.root_url + "/metrics", timeout=5)
    assert refused.value.code == 401
    req = urllib.request.Request(stack.root_url + "/metrics",
                                 headers={"authorization": f"Bearer {stack.admin_token()}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    models = {line.split('model="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("infermesh_requests_total{")}
    assert models <= {"unknown", "demo-chat", "demo-mini", "demo-embed"} and "unknown" in models
    # the address stays blocked for good keys too until its bucket refills, and bad keys count alike
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}])


def test_trailing_slash_is_the_same_route_and_never_a_redirect(door_stack):
    key = door_stack.key("slash", "pro")
    status, body = _post(door_stack, "/chat/completions/", _chat(key), key, {"host": "evil.example"})
    assert status == 200 and body["object"] == "chat.completion"
    req = urllib.request.Request(door_stack.base_url + "/models/", headers={"authorization": f"Bearer {key}",
                                                                           "host": "evil.example"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["object"] == "list"


def test_admin_slo_bad_hours_is_400(door_stack):
    for bad in ("abc", "inf", "-1", "nan"):
        req = urllib.request.Request(door_stack.root_url + f"/admin/slo?hours={bad}",
                                     headers={"authorization": f"Bearer {door_stack.admin_token()}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "hours"


# ---- a bug is a metered 500 ------------------------------------------------------------------


async def test_an_unexpected_exception_is_a_metered_500(tmp_path, monkeypatch):
    from fleet import spec as spec_mod
    from fleet.routing import local_rule, routing_config
    from gateway.app import Gateway, Settings
    from gateway.keys import KeyAdmin
    from gateway.wire import Incoming

    spec = spec_mod.load("local")
    routing = tmp_path / "routing.json"
    routing.write_bytes(orjson.dumps(routing_config(spec, local_rule(spec))))
    gw = Gateway(Settings(spec=spec, routing_path=routing, state_dir=tmp_path))
    key = KeyAdmin(tmp_path / "keys.db").create("buggy", "pro")[0]

    def boom(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(gw.admission, "check_model", boom)
    body = _chat(key)
    sent = False

    async def receive():
        nonlocal sent
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"headers": [(b"authorization", f"Bearer {key}".encode()), (b"x-request-id", b"bug-1"),
                         (b"content-length", str(len(body)).encode())], "client": ("10.0.0.9", 5)}
    try:
        reply = await gw.handle(Incoming(scope, receive), "chat")
    finally:
        gw.ledger.close()
    assert reply.status == 500 and orjson.loads(reply.body)["error"]["code"] == "internal_error"
    assert b"a bug" not in reply.body and b"Traceback" not in reply.body
    (row,) = [r for r in ledger.query(tmp_path / "ledger.db") if r["request_id"] == "bug-1"]
    assert (row["status"], row["error"], row["tenant"]) == (500, "internal_error", "buggy")
    sample = gw.metrics.registry.get_sample_value(
        "infermesh_requests_total", {"route": "chat", "status_class": "5xx", "model": "demo-mini", "pool": "",
                                     "provider": "", "region": "", "tier": "pro"})
    assert sample == 1.0, [m.samples for m in gw.metrics.registry.collect() if m.name == "infermesh_requests"]
    assert gw.door.tenants == {} and gw.in_flight.n == 0     # nothing held after the failure
