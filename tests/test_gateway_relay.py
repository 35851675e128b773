"""What the gateway sends upstream and how it relays: untouched pass-through fields, forced
stream usage, capped max_tokens, chunk-by-chunk streaming, and live routing reloads."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from openai import OpenAI

from tests.recorder import Recorder


@pytest.fixture
def recorder():
    rec = Recorder()
    try:
        yield rec
    finally:
        rec.close()


def admin_post(stack, path: str) -> dict:
    req = urllib.request.Request(stack.root_url + path, data=b"", method="POST",
                                 headers={"authorization": f"Bearer {stack.admin_token()}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def point_model_at(stack, model: str, url: str) -> None:
    routing = json.loads((stack.state / "routing.json").read_text())
    for m in routing["models"]:
        if m["id"] == model:
            m["pools"] = [{"name": "recorder", "provider": "test", "region": "local", "role": "primary",
                           "weight": 1, "endpoints": [{"id": "recorder/0", "url": url}]}]
    (stack.state / "routing.json").write_text(json.dumps(routing))
    admin_post(stack, "/admin/reload")


def test_uninterpreted_fields_pass_through_untouched(stack_factory, recorder):
    stack = stack_factory()
    point_model_at(stack, "demo-chat", recorder.url)
    c = OpenAI(base_url=stack.base_url, api_key=stack.key(), max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "w",
                                               "parameters": {"type": "object", "properties": {}}}}]
    c.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="auto",
        response_format={"type": "json_object"}, logprobs=True, top_logprobs=2, seed=7, n=1, stop=["END"],
        user="u-1", max_tokens=50_000, extra_body={"guided_choice": ["a", "b"], "top_k": 5})
    sent = recorder.bodies[-1]
    assert sent["tools"] == tools and sent["tool_choice"] == "auto"
    assert sent["response_format"] == {"type": "json_object"}
    assert (sent["logprobs"], sent["top_logprobs"], sent["seed"], sent["n"], sent["stop"]) == (True, 2, 7, 1, ["END"])
    assert sent["guided_choice"] == ["a", "b"] and sent["top_k"] == 5 and sent["user"] == "u-1"
    assert sent["max_tokens"] == 1024            # the pro tier's cap, not 50,000


def test_streams_always_ask_upstream_for_usage(stack_factory, recorder):
    stack = stack_factory()
    point_model_at(stack, "demo-chat", recorder.url)
    c = OpenAI(base_url=stack.base_url, api_key=stack.key(), max_retries=0)
    chunks = list(c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                            stream=True))
    assert recorder.bodies[-1]["stream_options"] == {"include_usage": True}
    assert all(ch.usage is None for ch in chunks)   # the client did not ask for it
    rows = _ledger_rows(stack)
    assert rows[-1]["completion_tokens"] == 2 and rows[-1]["prompt_tokens"] == 3


def test_stream_chunks_are_relayed_before_the_upstream_finishes(stack_factory, recorder):
    stack = stack_factory()
    point_model_at(stack, "demo-chat", recorder.url)
    c = OpenAI(base_url=stack.base_url, api_key=stack.key(), max_retries=0)
    recorder.release.clear()                    # the upstream holds its second chunk
    stream = c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}], stream=True)
    got_first = threading.Event()
    first = []

    def read_first():
        first.append(next(iter(stream)))
        got_first.set()
    t = threading.Thread(target=read_first, daemon=True)
    t.start()
    assert got_first.wait(10), "the first chunk was held back until the upstream finished"
    assert first[0].choices[0].delta.content == "ok"
    recorder.release.set()
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "stop"


def _chunked_pieces(host: str, port: int, path: str, key: str, body: dict) -> list[bytes]:
    """POST over a raw socket; the response body's HTTP chunks, as the gateway framed them."""
    import socket
    data = json.dumps(body).encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nhost: %s\r\nauthorization: Bearer %s\r\ncontent-type: application/json"
                     b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (path.encode(), host.encode(), key.encode(), len(data), data))
        raw = b""
        while piece := sock.recv(65536):
            raw += piece
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    pieces = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return pieces
        pieces.append(rest[:size])
        rest = rest[size + 2:]


def test_events_that_arrive_together_leave_in_one_write(stack_factory, recorder):
    """An upstream read that holds several events is relayed as one write (one HTTP chunk), not
    one write per event: a gateway that falls behind catches up instead of doubling its syscalls.
    The usage event the client did not ask for is still dropped from it."""
    from urllib.parse import urlsplit
    stack = stack_factory()
    point_model_at(stack, "demo-chat", recorder.url)
    recorder.together = True
    u = urlsplit(stack.base_url)
    pieces = _chunked_pieces(u.hostname, u.port, u.path + "/chat/completions", stack.key(),
                             {"model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert len(pieces) == 2, pieces
    assert b'"content": "ok"' in pieces[0] and pieces[0].count(b"\n\n") == 1
    assert pieces[1].count(b"\n\n") == 2                      # the finish event and [DONE], together
    assert b'"finish_reason": "stop"' in pieces[1] and pieces[1].endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in pieces[1]
    assert _ledger_rows(stack)[-1]["completion_tokens"] == 2    # ... and still metered


def test_finished_streams_give_their_upstream_connection_back(stack_factory, recorder):
    """After [DONE] the relay reads the upstream body to its end, so aiohttp pools the
    connection: streams one after another reuse one upstream connection instead of paying for
    a new one each (connect, and the worker's accept) and leaving sockets in TIME-WAIT. The
    worker here ends its body 50 ms after [DONE], as servers that flush the terminator later do."""
    from urllib.parse import urlsplit
    stack = stack_factory()
    point_model_at(stack, "demo-chat", recorder.url)
    recorder.tail_s = 0.05
    u = urlsplit(stack.base_url)
    for _ in range(4):
        pieces = _chunked_pieces(u.hostname, u.port, u.path + "/chat/completions", stack.key(),
                                 {"model": "demo-chat", "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]})
        assert pieces[-1].endswith(b"data: [DONE]\n\n")
    assert len(recorder.peers) == 4 and len(set(recorder.peers)) == 1, recorder.peers


def test_a_whole_answer_that_never_comes_ends_at_the_tiers_total_timeout(stack_factory, recorder):
    """A non-stream request whose worker takes the request and stays healthy but never answers
    is ended by the tier's total deadline (one asyncio deadline over the whole attempt, the body
    included; aiohttp has no timer of its own): 504 upstream_timeout, metered, no endless wait."""
    import openai

    def short_total(cfg):
        for t in cfg["tiers"]:
            if t["name"] == "pro":
                t.setdefault("timeouts", {}).update(total_s=1.5)
    stack = stack_factory(short_total)
    point_model_at(stack, "demo-chat", recorder.url)
    recorder.hold_whole = True
    recorder.release.clear()
    c = OpenAI(base_url=stack.base_url, api_key=stack.key(), max_retries=0, timeout=30)
    started = time.monotonic()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                      extra_headers={"x-request-id": "held-1"})
    finally:
        recorder.release.set()
    took = time.monotonic() - started
    assert err.value.status_code == 504 and err.value.code == "upstream_timeout"
    assert 1.4 <= took < 5, took
    row = [r for r in _ledger_rows(stack) if r["request_id"] == "held-1"]
    assert row and (row[0]["status"], row[0]["error"]) == (504, "upstream_timeout")


def test_routing_reload_takes_effect_without_restart(stack_factory, recorder):
    stack = stack_factory()
    c = OpenAI(base_url=stack.base_url, api_key=stack.key(), max_retries=0)
    c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
    assert recorder.bodies == []
    # the file watcher picks up a changed file by itself (no admin call)
    routing = json.loads((stack.state / "routing.json").read_text())
    for m in routing["models"]:
        if m["id"] == "demo-chat":
            m["pools"] = [{"name": "recorder", "provider": "test", "region": "local", "role": "primary",
                           "weight": 1, "endpoints": [{"id": "recorder/0", "url": recorder.url}]}]
    time.sleep(0.01)
    (stack.state / "routing.json").write_text(json.dumps(routing))
    deadline = time.monotonic() + 10
    while not recorder.bodies and time.monotonic() < deadline:
        c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
        time.sleep(0.2)
    assert recorder.bodies, "the changed routing file was not applied"


DEMO_CHAT_WORKERS = (("demo-chat-east", 0), ("demo-chat-east", 1), ("demo-chat-west", 0))


def _ledger_rows(stack) -> list[dict]:
    from gateway import ledger
    return ledger.query(stack.state / "ledger.db")


def test_external_openai_upstream_gets_its_key_and_its_model_name(tmp_path, monkeypatch, recorder):
    """An overflow pool on an OpenAI-compatible upstream (kind `openai`): requests go to its API
    base URL with the key from the stack's secret (INFERMESH_SECRET_<NAME> in the gateway's
    environment) and the model id the upstream knows; its health check is GET /models."""
    from tests.conftest import start_stack

    monkeypatch.setenv("INFERMESH_SECRET_OVERFLOW_KEY", "ext-s3cret-value")
    stack = start_stack(tmp_path)
    try:
        routing = json.loads((stack.state / "routing.json").read_text())
        for m in routing["models"]:
            if m["id"] == "demo-chat":
                m["pools"] = [{"name": "overflow", "provider": "gonka", "region": "local", "role": "primary",
                               "weight": 1, "upstream_model": "Org/Model-X",
                               "endpoints": [{"id": "overflow/0", "url": recorder.url + "/v1",
                                              "credentials": "overflow-key"}]}]
        (stack.state / "routing.json").write_text(json.dumps(routing))
        admin_post(stack, "/admin/reload")
        c = OpenAI(base_url=stack.base_url, api_key=stack.key(), max_retries=0)
        r = c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "ok ok"
        assert recorder.auth[-1] == "Bearer ext-s3cret-value"
        assert recorder.bodies[-1]["model"] == "Org/Model-X"
        logs = "\n".join(p.read_text() for p in (stack.state / "logs").glob("*.log"))
        assert "ext-s3cret-value" not in logs
    finally:
        stack.stack.stop()


def test_client_leaving_mid_stream_is_metered_499_and_frees_the_worker(stack_factory):
    """The hot routes run on raw ASGI (gateway/wire.py): a client that disconnects mid-stream
    closes the relay, which meters what was produced as a 499 and drops the upstream stream."""
    import http.client

    from tests.test_drills import _http, fault, wait_for

    stack = stack_factory()
    for pool, replica in DEMO_CHAT_WORKERS:
        fault(stack, pool, replica, itl_ms=50)
    host, port = stack.base_url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"model": "demo-chat", "stream": True, "max_tokens": 400,
                       "messages": [{"role": "user", "content": "a long one"}]})
    conn.request("POST", "/v1/chat/completions", body=body, headers={
        "authorization": f"Bearer {stack.key('leaver', 'pro')}", "content-type": "application/json",
        "x-request-id": "leaves-early"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")            # the stream has started
    conn.sock.shutdown(2)
    conn.close()
    running = lambda: sum(_http(stack.worker_url(p, r) + "/sim/stats")[1]["running"]  # noqa: E731
                          for p, r in DEMO_CHAT_WORKERS)
    assert wait_for(lambda: running() == 0, 10) is not None, "the worker kept generating for a client that left"
    assert wait_for(lambda: any(r["request_id"] == "leaves-early" for r in _ledger_rows(stack)), 10) is not None
    row = next(r for r in _ledger_rows(stack) if r["request_id"] == "leaves-early")
    assert row["status"] == 499 and row["tenant"] == "leaver"
    assert row["completion_tokens"] < 400


def test_stream_silent_past_the_tiers_idle_timeout_ends_with_an_error_event(stack_factory):
    """A started stream whose worker goes quiet for longer than the tier's idle_s ends with an
    OpenAI-style error event (the SDK raises it), is metered 504 idle_timeout, and the worker's
    stream is dropped."""
    import openai

    from tests.test_drills import _http, fault, mutate_with, tier_cfg, wait_for

    stack = stack_factory(mutate_with(lambda c: tier_cfg(c, "pro").setdefault("timeouts", {}).update(idle_s=1)))
    for pool, replica in DEMO_CHAT_WORKERS:
        fault(stack, pool, replica, ttft_ms=1, itl_ms=4000)
    c = OpenAI(base_url=stack.base_url, api_key=stack.key("quiet", "pro"), max_retries=0, timeout=30)
    got, started = [], time.monotonic()
    with pytest.raises(openai.APIError) as err:
        for chunk in c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                               stream=True, max_tokens=5, extra_headers={"x-request-id": "quiet-1"}):
            got.append(chunk)
    assert got, "the stream had started"
    assert "interrupted" in str(err.value)
    assert time.monotonic() - started < 3.5, "the idle timeout (1 s) did not end the stream"
    assert wait_for(lambda: any(r["request_id"] == "quiet-1" for r in _ledger_rows(stack)), 10) is not None
    row = next(r for r in _ledger_rows(stack) if r["request_id"] == "quiet-1")
    assert (row["status"], row["error"]) == (504, "idle_timeout")
    running = lambda: sum(_http(stack.worker_url(p, r) + "/sim/stats")[1]["running"]  # noqa: E731
                          for p, r in DEMO_CHAT_WORKERS)
    assert wait_for(lambda: running() == 0, 10) is not None


async def test_sse_reader_frames_events_from_any_chunking():
    """Upstream bytes arrive in arbitrary pieces: events split across reads, several in one read,
    CRLF line ends, comments and `event:` lines, `data:` without a space."""
    from gateway.proxy import SSEReader

    class Body:
        def __init__(self, chunks):
            self.chunks = list(chunks)

        async def readany(self):
            return self.chunks.pop(0) if self.chunks else b""

    class Resp:
        def __init__(self, chunks):
            self.content = Body(chunks)

    async def events(chunks):
        r, out = SSEReader(Resp(chunks)), []
        while (e := await r.next()) is not None:
            out.append(e)
        return out

    one = b'data: {"a":1}\n\n'
    assert await events([one]) == [one]
    assert await events([b'data: {"a"', b':1}\n', b'\n']) == [one]
    assert await events([one + b'data: {"b":2}\n\ndata: [DO', b'NE]\n\n']) == [one, b'data: {"b":2}\n\n',
                                                                              b"data: [DONE]\n\n"]
    assert await events([b': ping\r\n\r\nevent: x\r\ndata:{"a":1}\r', b'\n\r\n']) == [one]
    assert await events([b'data: {"a":1}\n\ndata: {"cut']) == [one]     # an unfinished event at EOF is dropped
    two = b'data: {"b":2}\n\n'
    r = SSEReader(Resp([one + two, one, b'data: {"c"', b':3}\n\n']))     # batch(): what one read brought
    assert [await r.batch() for _ in range(4)] == [[one, two], [one], [b'data: {"c":3}\n\n'], None]



def test_a_worker_error_event_mid_stream_is_an_attempt_error_the_canary_counts(stack_factory, recorder):
    """The worker ends a started stream with an error event: the client gets the gateway's own error
    event (nothing of the worker's message), the ledger a 502, /metrics an attempt error of the pool,
    and the canary's fleet-wide SLIs (read from /metrics) count it as one attempt and one error."""
    import openai

    from fleet import canary
    from gateway import ledger
    stack = stack_factory()
    point_model_at(stack, "demo-chat", recorder.url)
    recorder.error_event = True
    c = OpenAI(base_url=stack.base_url, api_key=stack.key(), max_retries=0)
    with pytest.raises(openai.APIError) as e:
        list(c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                       stream=True, extra_headers={"x-request-id": "err-event-1"}))
    assert "CUDA" not in str(e.value) and "The model failed while streaming" in str(e.value)
    rows = []
    for _ in range(100):                 # a broken stream's row is committed without anyone waiting for it
        rows = [r for r in ledger.query(stack.state / "ledger.db") if r["request_id"] == "err-event-1"]
        if rows:
            break
        time.sleep(0.05)
    (row,) = rows
    assert (row["status"], row["error"], row["pool"]) == (502, "upstream_error_event", "recorder")
    req = urllib.request.Request(stack.root_url + "/metrics",
                                 headers={"authorization": f"Bearer {stack.admin_token()}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        samples = canary.parse_metrics(r.read().decode())
    side = canary.side_from_totals("recorder", canary.pool_totals(samples).get("recorder"))
    assert (side.attempts, side.errors) == (1, 1)
