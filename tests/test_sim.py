"""The `sim` engine as a real process, driven by the official openai SDK and by raw aiohttp.

Every response and stream chunk is validated against OpenAI's published OpenAPI schemas.
No assertion is on elapsed time: latency knobs are checked by ordering only (a hang or a slow
TTFT outlasts a client timeout; a queue fills while the TTFT holds requests).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines import llamacpp
from engines.sim import completion_text
from tests.openapi import validate

REPO = Path(__file__).resolve().parents[1]
MODEL = "demo-chat"
OUTPUT_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimProcess:
    """One `python -m engines.sim` subprocess on a free loopback port; stderr goes to a file."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"sim-{self.port}.log"
        cmd = [sys.executable, "-m", "engines.sim", "--host", "127.0.0.1", "--port", str(self.port),
               "--model", MODEL, *args]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        expected = f"sim worker (simulator) serving {MODEL} on {self.url}"
        while time.monotonic() < deadline:
            if expected in self.log.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"sim exited with {self.proc.returncode}: {self.log.read_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"sim did not start in {timeout}s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def assert_quiet_log(self) -> None:
        """No per-request logging, no tracebacks: the start line is all a worker writes."""
        lines = self.log.read_text().splitlines()
        assert lines[:1] == [f"sim worker (simulator) serving {MODEL} on {self.url}"] and len(lines) == 1, lines

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A blocking JSON call, for fixtures."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """A fast, fault-free worker shared by the tests that only read."""
    p = SimProcess(tmp_path_factory.mktemp("sim"), "--ttft-ms", "0", "--itl-ms", "0",
                   "--output-tokens", str(OUTPUT_TOKENS))
    yield p
    p.stop()
    p.assert_quiet_log()


@pytest.fixture(scope="module")
def _fault_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    p = SimProcess(tmp_path_factory.mktemp("fault-sim"), "--ttft-ms", "1", "--itl-ms", "0",
                   "--output-tokens", "8")
    yield p
    p.stop()
    p.assert_quiet_log()


@pytest.fixture
def faulty(_fault_sim: SimProcess) -> Iterator[SimProcess]:
    """A worker for fault tests; its faults are restored to the start state before and after."""
    assert _fault_sim.request("DELETE", "/sim/faults")[0] == 200
    yield _fault_sim
    _fault_sim.request("DELETE", "/sim/faults")


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[Any]:
    """Start extra workers with their own flags; all are stopped at teardown."""
    started: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        p = SimProcess(tmp_path, *args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def sdk(p: SimProcess, timeout: float = 10.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{p.url}/v1", api_key="sim-needs-no-key", max_retries=0, timeout=timeout)


def chat_body(content: str = "Say hello to the mesh", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def read_sse(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streaming request; returns the JSON chunks, checking the SSE framing and [DONE]."""
    async with session.post(url, json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"", "the stream must end with a blank line"
    events = events[:-1]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    return [json.loads(e[len(b"data: "):]) for e in events[:-1]]


async def stats(session: aiohttp.ClientSession, p: SimProcess) -> dict[str, Any]:
    async with session.get(f"{p.url}/sim/stats") as r:
        return await r.json()


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    """Poll an async predicate until it returns something truthy (no timing asserted, only a cap)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.05)


# -- the OpenAI API ------------------------------------------------------------------------


async def test_models_list_names_the_simulator(sim: SimProcess) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{sim.url}/v1/models") as r:
        body = await r.json()
    validate(body, "ListModelsResponse")
    (card,) = body["data"]
    assert card["id"] == MODEL and card["owned_by"] == "infermesh-simulator"
    assert card["root"] == MODEL and card["max_model_len"] > 0
    async with sdk(sim) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]


async def test_chat_non_stream(sim: SimProcess) -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello to the mesh"}]
    async with aiohttp.ClientSession() as s, s.post(f"{sim.url}/v1/chat/completions",
                                                     json={"model": MODEL, "messages": messages}) as r:
        assert r.status == 200
        body = await r.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    # prompt tokens: words of every message + 3 per message
    assert body["usage"] == {"prompt_tokens": (3 + 3) + (5 + 3), "completion_tokens": OUTPUT_TOKENS,
                             "total_tokens": 14 + OUTPUT_TOKENS}
    assert choice["message"]["content"] == completion_text("You are terse.\nSay hello to the mesh", OUTPUT_TOKENS)
    assert len(choice["message"]["content"].split()) == OUTPUT_TOKENS

    async with sdk(sim) as client:
        again = await client.chat.completions.create(model=MODEL, messages=messages)
        other = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "other"}])
    assert again.choices[0].message.content == choice["message"]["content"], "same prompt, same text"
    assert other.choices[0].message.content != choice["message"]["content"]
    assert again.id != body["id"]


async def test_chat_stream_without_usage(sim: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        chunks = await read_sse(s, f"{sim.url}/v1/chat/completions", chat_body(stream=True))
        whole = await (await s.post(f"{sim.url}/v1/chat/completions", json=chat_body())).json()
    for c in chunks:
        validate(c, "CreateChatCompletionStreamResponse")
        assert c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
        assert "usage" not in c or c["usage"] is None
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(tokens) == OUTPUT_TOKENS
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(tokens) == whole["choices"][0]["message"]["content"]


async def test_chat_stream_usage_chunk_only_with_include_usage(sim: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        chunks = await read_sse(s, f"{sim.url}/v1/chat/completions",
                                chat_body(stream=True, stream_options={"include_usage": True}))
        without = await read_sse(s, f"{sim.url}/v1/chat/completions",
                                 chat_body(stream=True, stream_options={"include_usage": False}))
    for c in chunks:
        validate(c, "CreateChatCompletionStreamResponse")
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 8, "completion_tokens": OUTPUT_TOKENS, "total_tokens": 8 + OUTPUT_TOKENS}
    assert all(c.get("usage") is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert len(without) == len(chunks) - 1 and all(c["choices"] for c in without)

    async with sdk(sim) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=chat_body()["messages"], stream=True, stream_options={"include_usage": True})
        got = [c async for c in stream]
        plain = await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], stream=True)
        got_plain = [c async for c in plain]
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == OUTPUT_TOKENS
    assert got[-1].choices == []
    assert all(c.usage is None for c in got_plain)


async def test_completions_stream_and_not(sim: SimProcess) -> None:
    body = {"model": MODEL, "prompt": "one two three"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{sim.url}/v1/completions", json=body) as r:
            whole = await r.json()
        chunks = await read_sse(s, f"{sim.url}/v1/completions",
                                {**body, "stream": True, "stream_options": {"include_usage": True}})
    validate(whole, "CreateCompletionResponse")
    assert whole["object"] == "text_completion"
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": OUTPUT_TOKENS,
                              "total_tokens": 3 + OUTPUT_TOKENS}
    assert whole["choices"][0]["text"] == completion_text("one two three", OUTPUT_TOKENS)
    for c in chunks[:-1]:
        validate(c, "CreateCompletionStreamResponse")
        assert c["object"] == "text_completion"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]

    async with sdk(sim) as client:
        result = await client.completions.create(model=MODEL, prompt="one two three", max_tokens=5)
        stream = await client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], stream=True)
        texts = [c.choices[0].text async for c in stream]
    assert result.usage.completion_tokens == 5 and result.choices[0].finish_reason == "length"
    assert len(texts) == OUTPUT_TOKENS + 1  # one per token, then the finish chunk


async def test_max_tokens_truncates_with_length(sim: SimProcess) -> None:
    async with sdk(sim) as client:
        short = await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], max_tokens=4)
        newer = await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"],
                                                     max_completion_tokens=3)
        roomy = await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], max_tokens=500)
        stream = await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], max_tokens=2,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (4, "length")
    assert len(short.choices[0].message.content.split()) == 4
    assert (newer.usage.completion_tokens, newer.choices[0].finish_reason) == (3, "length")
    assert (roomy.usage.completion_tokens, roomy.choices[0].finish_reason) == (OUTPUT_TOKENS, "stop")
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2


async def test_unknown_fields_are_accepted(sim: SimProcess) -> None:
    body = chat_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                     tool_choice="auto", seed=3, stop=["\n"], logprobs=False, n=1, temperature=0.2, top_p=0.9,
                     response_format={"type": "text"}, user="u", whatever_comes_next={"a": 1})
    async with aiohttp.ClientSession() as s, s.post(f"{sim.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        validate(await r.json(), "CreateChatCompletionResponse")


async def test_unknown_model_is_404(sim: SimProcess) -> None:
    async with sdk(sim) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=chat_body()["messages"])
    async with aiohttp.ClientSession() as s, s.post(f"{sim.url}/v1/completions",
                                                     json={"model": "nope", "prompt": "x"}) as r:
        assert r.status == 404
        body = await r.json()
    validate(body, "ErrorResponse")
    assert body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(("path", "data", "param"), [
    ("/v1/chat/completions", b'{"model": "demo-chat", "messages": [', None),
    ("/v1/chat/completions", b'[1, 2]', None),
    ("/v1/chat/completions", b'{"model": "demo-chat"}', "messages"),
    ("/v1/chat/completions", b'{"model": "demo-chat", "messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999}',
     "max_tokens"),
    ("/v1/completions", b'{"model": "demo-chat"}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "stream"),
])
async def test_bad_requests_are_400(sim: SimProcess, path: str, data: bytes, param: str | None) -> None:
    async with aiohttp.ClientSession() as s, s.post(sim.url + path, data=data,
                                                     headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        body = await r.json()
    validate(body, "ErrorResponse")
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param


async def test_health_version_and_metrics(sim: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sim.url}/health") as r:
            assert r.status == 200 and await r.read() == b""
        async with s.get(f"{sim.url}/version") as r:
            assert (await r.json())["engine"] == "infermesh-simulator"
        await (await s.post(f"{sim.url}/v1/completions", json={"prompt": "count me", "max_tokens": 2})).read()
        async with s.get(f"{sim.url}/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    samples = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
               for fam in text_string_to_metric_families(text) for smp in fam.samples}
    label = (("model_name", MODEL),)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert (name, label) in samples, name
    assert samples[("vllm:prompt_tokens_total", label)] >= 2
    assert samples[("vllm:generation_tokens_total", label)] >= 2
    assert samples[("vllm:request_success_total", (("finished_reason", "length"),) + label)] >= 1


async def test_requests_beyond_max_concurrency_wait(start_sim: Any) -> None:
    p = start_sim("--max-concurrency", "2", "--ttft-ms", "60000", "--itl-ms", "0")

    async def gauges(s: aiohttp.ClientSession) -> dict[str, float]:
        async with s.get(f"{p.url}/metrics") as r:
            text = await r.text()
        return {smp.name: smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
                if smp.name.startswith("vllm:") and "finished_reason" not in smp.labels}

    async with aiohttp.ClientSession() as probe:
        client = aiohttp.ClientSession()
        tasks = [asyncio.create_task(client.post(f"{p.url}/v1/chat/completions", json=chat_body(f"q{i}")))
                 for i in range(6)]
        try:
            g = await eventually(lambda: _when(gauges(probe), lambda g: g["vllm:num_requests_waiting"] == 4))
            assert g["vllm:num_requests_running"] == 2
            assert g["vllm:kv_cache_usage_perc"] == 1.0 and g["vllm:gpu_cache_usage_perc"] == 1.0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()
        # clients gone: the worker drops their requests and the queue empties
        await eventually(lambda: _when(gauges(probe), lambda g: g["vllm:num_requests_running"] == 0
                                       and g["vllm:num_requests_waiting"] == 0))


async def _when(value: Any, predicate: Any) -> Any:
    v = await value
    return v if predicate(v) else None


# -- faults --------------------------------------------------------------------------------


async def post_faults(s: aiohttp.ClientSession, p: SimProcess, body: Any) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{p.url}/sim/faults", json=body) as r:
        return r.status, await r.json()


async def test_faults_api(faulty: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{faulty.url}/sim/faults") as r:
            state = await r.json()
        assert state["mode"] == "none" and state["unhealthy"] is False
        assert state["effective"] == {"ttft_ms": 1.0, "itl_ms": 0.0, "error_rate": 0.0}

        status, state = await post_faults(s, faulty, {"mode": "slow"})
        assert status == 200 and state["mode"] == "slow" and state["effective"]["ttft_ms"] == 10.0
        status, state = await post_faults(s, faulty, {"unhealthy": True, "itl_ms": 2})
        assert state["mode"] == "slow" and state["unhealthy"] is True, "partial update keeps other keys"
        assert state["effective"]["itl_ms"] == 2.0

        for bad in ({"mode": "explode"}, {"error_rate": 2}, {"no_such_knob": 1}, {"ttft_ms": -1}, [1]):
            status, body = await post_faults(s, faulty, bad)
            assert status == 400, bad
            validate(body, "ErrorResponse")
        async with s.get(f"{faulty.url}/sim/faults") as r:
            assert (await r.json())["mode"] == "slow", "a rejected update changes nothing"

        async with s.delete(f"{faulty.url}/sim/faults") as r:
            state = await r.json()
        assert state["mode"] == "none" and state["unhealthy"] is False and state["itl_ms"] is None


async def test_hang_holds_until_the_client_gives_up(faulty: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        await post_faults(s, faulty, {"mode": "hang"})
        async with sdk(faulty, timeout=0.5) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"])
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"], stream=True)
        async with s.get(f"{faulty.url}/health") as r:
            assert r.status == 200, "a hung engine still answers /health unless told to be unhealthy"
        # the clients left: nothing of theirs stays behind in the worker
        st = await eventually(lambda: _when(stats(s, faulty), lambda st: st["hanging"] == 0))
        assert st["by_status"]["hang"] == 2 and st["running"] == 0 and st["waiting"] == 0

        # a client that never gives up is dropped when the drill switches the fault off
        pending = asyncio.create_task(s.post(f"{faulty.url}/v1/chat/completions", json=chat_body()))
        await eventually(lambda: _when(stats(s, faulty), lambda st: st["hanging"] == 1))
        assert not pending.done()
        await post_faults(s, faulty, {"mode": "none"})
        with pytest.raises(aiohttp.ClientError):
            await pending


async def test_reset_breaks_streams_and_requests(faulty: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        await post_faults(s, faulty, {"mode": "reset", "reset_after": 2})
        async with sdk(faulty) as client:
            got: list[Any] = []
            with pytest.raises(openai.APIConnectionError):  # the broken chunked body, not a clean end
                stream = await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"],
                                                              stream=True)
                async for chunk in stream:
                    got.append(chunk)
            assert len(got) == 2 and got[0].choices[0].delta.role == "assistant", "the stream broke mid-way"
            with pytest.raises(openai.APIConnectionError):
                await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"])
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(f"{faulty.url}/v1/completions", json={"prompt": "x", "stream": True}) as r:
                assert r.status == 200
                await r.read()
        assert (await stats(s, faulty))["by_status"]["reset"] >= 3


async def test_error500(faulty: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        await post_faults(s, faulty, {"mode": "error500"})
        async with s.post(f"{faulty.url}/v1/chat/completions", json=chat_body()) as r:
            assert r.status == 500
            body = await r.json()
        validate(body, "ErrorResponse")
        assert body["error"]["type"] == "server_error"
        async with sdk(faulty) as client:
            with pytest.raises(openai.InternalServerError):
                await client.completions.create(model=MODEL, prompt="x")
            await post_faults(s, faulty, {"mode": "none"})
            ok = await client.completions.create(model=MODEL, prompt="x")
        assert ok.choices[0].finish_reason == "stop"


async def test_slow_ttft_outlasts_a_client_timeout(faulty: SimProcess) -> None:
    async with aiohttp.ClientSession() as s, sdk(faulty, timeout=0.5) as client:
        await post_faults(s, faulty, {"mode": "slow", "ttft_ms": 30000})
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"])
        await post_faults(s, faulty, {"mode": "none", "ttft_ms": None})
        ok = await client.chat.completions.create(model=MODEL, messages=chat_body()["messages"])
        assert ok.choices[0].message.content


async def test_unhealthy(faulty: SimProcess) -> None:
    async with aiohttp.ClientSession() as s:
        await post_faults(s, faulty, {"unhealthy": True})
        async with s.get(f"{faulty.url}/health") as r:
            assert r.status == 503
        await post_faults(s, faulty, {"unhealthy": False})
        async with s.get(f"{faulty.url}/health") as r:
            assert r.status == 200


async def test_error_rate_is_deterministic_with_seed(start_sim: Any) -> None:
    args = ("--error-rate", "0.3", "--seed", "7", "--ttft-ms", "0", "--itl-ms", "0", "--output-tokens", "1")
    first, second = start_sim(*args), start_sim(*args)

    async def pattern(s: aiohttp.ClientSession, p: SimProcess) -> list[int]:
        statuses = []
        for i in range(40):
            async with s.post(f"{p.url}/v1/completions", json={"prompt": f"p{i}"}) as r:
                await r.read()
                statuses.append(r.status)
        return statuses

    async with aiohttp.ClientSession() as s:
        a = await pattern(s, first)
        b = await pattern(s, second)
        await post_faults(s, first, {"seed": 7})      # reseeding replays the same draws
        c = await pattern(s, first)
        st = await stats(s, first)
    assert set(a) == {200, 500}
    assert a == b == c
    assert 0 < a.count(500) < 40
    assert st["by_status"]["500"] == 2 * a.count(500)


async def test_fault_flags_at_start(start_sim: Any) -> None:
    p = start_sim("--fault", "error500", "--unhealthy")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/health") as r:
            assert r.status == 503
        async with s.post(f"{p.url}/v1/chat/completions", json=chat_body()) as r:
            assert r.status == 500
        async with s.delete(f"{p.url}/sim/faults") as r:
            state = await r.json()
        assert state["mode"] == "error500" and state["unhealthy"] is True, "DELETE restores the start faults"


async def test_sigterm_exits_cleanly_with_a_stream_in_flight(start_sim: Any) -> None:
    p = start_sim("--ttft-ms", "0", "--itl-ms", "200", "--output-tokens", "200")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", json=chat_body(stream=True)) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")
            p.proc.send_signal(signal.SIGTERM)
            returncode = await asyncio.to_thread(p.proc.wait, 10)
            with pytest.raises(aiohttp.ClientError):
                await r.read()
    assert returncode == 0
    assert "Traceback" not in p.log.read_text()


def test_help_says_simulator() -> None:
    out = subprocess.run([sys.executable, "-m", "engines.sim", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert "SIMULATOR" in out and "--ttft-ms" in out and "--fault" in out


# -- the llama.cpp launcher ----------------------------------------------------------------


def test_llamacpp_command() -> None:
    cmd = llamacpp.command("/models/m.gguf", "demo-chat", "127.0.0.1", 9110, python="/usr/bin/python3")
    assert cmd == ["/usr/bin/python3", "-m", "llama_cpp.server", "--model", "/models/m.gguf",
                   "--model_alias", "demo-chat", "--host", "127.0.0.1", "--port", "9110"]
    assert llamacpp.command("m.gguf", "x", "h", 1, n_ctx=4096)[-2:] == ["--n_ctx", "4096"]


def test_llamacpp_missing_file(tmp_path: Path) -> None:
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="GGUF file not found") as e:
        llamacpp.check_available(str(tmp_path / "absent.gguf"))
    assert "\n" not in str(e.value)


def test_llamacpp_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not importable, even where it is installed
    with pytest.raises(llamacpp.LlamaCppUnavailable, match=r"pip install -e '\.\[llamacpp\]'") as e:
        llamacpp.check_available(str(gguf))
    assert "llama_cpp" in str(e.value) and "\n" not in str(e.value)
