"""The OpenAI surface beyond chat: the Responses API (stateless), embeddings, tool calls and
structured outputs, cached prompt tokens, the model list. Driven by the official `openai` SDK
against a real local stack (gateway and sim workers as processes); raw bodies and stream events
are validated against OpenAI's published schemas (tests/openai_spec).
"""

from __future__ import annotations

import base64
import json
import struct
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest
from openai import OpenAI

from gateway import ledger
from tests.openapi import validate

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}
PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "kind": {"enum": ["human", "robot"]}}, "required": ["name", "age", "tags", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(local_stack) -> OpenAI:
    return OpenAI(base_url=local_stack.base_url, api_key=local_stack.key("surface", "pro"), max_retries=0)


def _rows(stack, request_id: str) -> list[dict]:
    return [r for r in ledger.query(stack.state / "ledger.db") if r["request_id"] == request_id]


def _sse(stack, path: str, body: dict, key: str) -> list[tuple[str | None, dict | str]]:
    """(event name, data) of each event of a raw streamed answer."""
    req = urllib.request.Request(stack.base_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=20) as r:
        text = r.read().decode()
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name = next((ln[6:].strip() for ln in block.split("\n") if ln.startswith("event:")), None)
        data = next(ln[5:].strip() for ln in block.split("\n") if ln.startswith("data:"))
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


# ---- the Responses API ------------------------------------------------------------------------


def test_responses_non_stream_matches_schema_and_is_metered(local_stack, client):
    raw = client.responses.with_raw_response.create(model="demo-chat", input="Tell me about meshes",
                                                    max_output_tokens=6, extra_headers={"x-request-id": "resp-1"})
    body = json.loads(raw.text)
    validate(body, "Response")
    assert raw.headers["x-request-id"] == "resp-1"
    resp = raw.parse()
    assert resp.status == "completed" and resp.output_text
    assert resp.usage.output_tokens == 6 and resp.store is False
    (row,) = _rows(local_stack, "resp-1")
    assert (row["route"], row["status"], row["completion_tokens"]) == ("responses", 200, 6)
    assert row["prompt_tokens"] + row["cached_tokens"] == resp.usage.input_tokens


def test_responses_stream_events_pass_through_in_order(local_stack, client):
    key = local_stack.key("surface-raw", "pro")
    events = _sse(local_stack, "/responses", {"model": "demo-chat", "input": "stream it", "stream": True,
                                              "max_output_tokens": 5}, key)
    for name, data in events:
        validate(data, "ResponseStreamEvent")
        assert name == data["type"]                # the `event:` line survives the relay
    types = [d["type"] for _, d in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 5
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    # the SDK reads the same stream: the deltas make the completed response's text
    stream = client.responses.create(model="demo-chat", input="stream it", stream=True, max_output_tokens=5)
    got = list(stream)
    text = "".join(e.delta for e in got if e.type == "response.output_text.delta")
    assert got[-1].type == "response.completed" and got[-1].response.output_text == text
    assert got[-1].response.usage.output_tokens == 5


@pytest.mark.parametrize("kwargs, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_abc"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"input": []}, "input"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_responses_refuses_stateful_and_bad_params_naming_them(client, kwargs, param):
    args = {"model": "demo-chat", "input": "hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**args)
    assert e.value.body["param"] == param


def test_responses_failover_after_response_created(stack_factory):
    """Workers that fail after `response.created` and before any output: the client still gets
    one clean stream, from another worker."""
    stack = stack_factory()
    faulty = [stack.worker_url("demo-chat-east", i) for i in range(2)]      # weight 2 of 3
    for url in faulty:
        req = urllib.request.Request(url + "/sim/faults", data=json.dumps({"mode": "reset", "reset_after": 1}).encode(),
                                     method="POST", headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()
    c = OpenAI(base_url=stack.base_url, api_key=stack.key("fo", "pro"), max_retries=0)
    for i in range(8):
        events = list(c.responses.create(model="demo-chat", input=f"failover {i}", stream=True,
                                         max_output_tokens=4))
        types = [e.type for e in events]
        assert types.count("response.created") == 1 and types[-1] == "response.completed", types
        assert [e.sequence_number for e in events] == list(range(len(events)))
    resets = 0
    for url in faulty:
        with urllib.request.urlopen(url + "/sim/stats", timeout=5) as r:
            resets += json.loads(r.read())["by_status"].get("reset", 0)
    rows = [r for r in ledger.query(stack.state / "ledger.db") if r["route"] == "responses"]
    print(f"responses failover: {resets} resets after response.created, retries in ledger "
          f"{sum(r['retries'] for r in rows)}, {len(rows)} rows all 200: {all(r['status'] == 200 for r in rows)}")
    assert resets >= 1 and 1 <= sum(r["retries"] for r in rows) <= resets   # probes may meet a reset too
    assert len(rows) == 8 and all(r["status"] == 200 for r in rows)


# ---- tools and structured outputs --------------------------------------------------------------


def test_chat_tool_call_round_trip_streamed_and_not(client):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    raw = client.chat.completions.with_raw_response.create(model="demo-chat", messages=messages,
                                                           tools=[WEATHER_TOOL], tool_choice="auto")
    validate(json.loads(raw.text), "CreateChatCompletionResponse")
    msg = raw.parse().choices[0]
    assert msg.finish_reason == "tool_calls"
    call = msg.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    # streamed: the tool-call deltas carry the same call, piece by piece
    chunks = list(client.chat.completions.create(model="demo-chat", messages=messages, tools=[WEATHER_TOOL],
                                                 stream=True, parallel_tool_calls=False))
    for ch in chunks:
        validate(ch.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    deltas = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert len(deltas) > 1 and deltas[0].function.name == "get_weather" and deltas[0].id == call.id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the tool's result goes back: the model answers in text
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 12})}]
    final = client.chat.completions.create(model="demo-chat", messages=messages, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    # tool_choice none: text, no call
    none = client.chat.completions.create(model="demo-chat", messages=messages[:1], tools=[WEATHER_TOOL],
                                          tool_choice="none")
    assert none.choices[0].message.tool_calls is None


def test_chat_json_schema_answer_follows_the_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    resp = client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "a person"}],
                                          response_format=fmt)
    jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON_SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "a person"}], response_format=fmt, stream=True)
        if c.choices)
    assert streamed == resp.choices[0].message.content


def test_responses_function_call_and_json_schema(client):
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    r = client.responses.create(model="demo-chat", input="Weather in Oslo?", tools=[tool])
    validate(json.loads(client.responses.with_raw_response.create(
        model="demo-chat", input="Weather in Oslo?", tools=[tool]).text), "Response")
    (item,) = r.output
    assert item.type == "function_call" and item.name == "get_weather"
    jsonschema.validate(json.loads(item.arguments), tool["parameters"])
    streamed = list(client.responses.create(model="demo-chat", input="Weather in Oslo?", tools=[tool], stream=True))
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert args == item.arguments
    back = client.responses.create(model="demo-chat", tools=[tool], input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": "{\"temp_c\": 3}"}])
    assert back.output[0].type == "message" and back.output_text
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    jsonschema.validate(json.loads(client.responses.create(model="demo-chat", input="a person", text=fmt).output_text),
                        PERSON_SCHEMA)


# ---- embeddings -------------------------------------------------------------------------------


def test_embeddings_float_and_base64_agree_and_are_metered(local_stack, client):
    texts = ["the first text", "a second, longer text about meshes"]
    raw = client.embeddings.with_raw_response.create(model="demo-embed", input=texts, encoding_format="float",
                                                     extra_headers={"x-request-id": "emb-1"})
    body = json.loads(raw.text)
    validate(body, "CreateEmbeddingResponse")
    floats = [d["embedding"] for d in body["data"]]
    assert len(floats) == 2 and all(len(v) == 64 for v in floats)
    raw64 = client.embeddings.create(model="demo-embed", input=texts, encoding_format="base64")
    decoded = [list(struct.unpack("<64f", base64.b64decode(d.embedding))) for d in raw64.data]
    sdk = [d.embedding for d in client.embeddings.create(model="demo-embed", input=texts).data]  # base64, decoded
    for a, b, c in zip(floats, decoded, sdk, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6      # float32 on the wire
        assert b == c
    short = client.embeddings.create(model="demo-embed", input="the first text", dimensions=16)
    assert len(short.data[0].embedding) == 16
    (row,) = _rows(local_stack, "emb-1")
    assert (row["route"], row["status"], row["completion_tokens"]) == ("embeddings", 200, 0)
    assert row["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0


def test_embeddings_have_their_own_limits_and_model_kind(local_stack, client):
    hobby = OpenAI(base_url=local_stack.base_url, api_key=local_stack.key("emb-hobby", "hobby"), max_retries=0)
    e = hobby.embeddings.with_raw_response.create(model="demo-embed", input="x y z")
    c = hobby.chat.completions.with_raw_response.create(model="demo-mini", messages=[{"role": "user", "content": "x"}])
    # hobby: chat 60 rpm, embeddings 120 rpm (tiers[].embeddings), in separate buckets
    assert e.headers["x-ratelimit-limit-requests"] == "120" and c.headers["x-ratelimit-limit-requests"] == "60"
    assert int(c.headers["x-ratelimit-remaining-requests"]) == 59
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="demo-chat", input="x")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="demo-embed", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["param"] == "model"
    for bad, param in (({"input": ""}, "input"), ({"input": [1, "a"]}, "input"),
                       ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
                       ({"input": "x", "dimensions": 0}, "dimensions")):
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="demo-embed", **bad)
        assert err.value.body["param"] == param
    # a refusal from the worker itself comes back with the worker's param (and nothing naming the worker)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="demo-embed", input="x", dimensions=100)    # the model has 64
    assert (err.value.body["param"], err.value.body["code"]) == ("dimensions", "upstream_rejected")
    assert "127.0.0.1" not in err.value.body["message"]


# ---- cached prompt tokens ---------------------------------------------------------------------


def test_cached_tokens_are_relayed_and_metered_apart(local_stack, client):
    system = {"role": "system", "content": "You are a careful assistant who answers in short sentences. " * 8}
    first = [system, {"role": "user", "content": "first question"}]
    a = client.chat.completions.create(model="demo-mini", messages=first, extra_headers={"x-request-id": "cache-a"})
    later = [*first, {"role": "assistant", "content": a.choices[0].message.content},
             {"role": "user", "content": "second question"}]
    b = client.chat.completions.create(model="demo-mini", messages=later, extra_headers={"x-request-id": "cache-b"})
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < cached < b.usage.prompt_tokens
    (ra,), (rb,) = _rows(local_stack, "cache-a"), _rows(local_stack, "cache-b")
    assert (ra["prompt_tokens"], ra["cached_tokens"]) == (a.usage.prompt_tokens, 0)
    assert (rb["prompt_tokens"], rb["cached_tokens"]) == (b.usage.prompt_tokens - cached, cached)
    # streamed, with the Responses API's names
    r = client.responses.create(model="demo-mini", input=later, stream=True, extra_headers={"x-request-id": "cache-c"})
    usage = list(r)[-1].response.usage
    assert usage.input_tokens_details.cached_tokens > 0
    (rc,) = _rows(local_stack, "cache-c")
    assert rc["cached_tokens"] == usage.input_tokens_details.cached_tokens
    assert rc["prompt_tokens"] == usage.input_tokens - usage.input_tokens_details.cached_tokens


def test_usage_report_prices_cached_tokens_at_the_tiers_cached_price(local_stack, client):
    from infermesh_cli.commands.usage import price_micro_usd
    tier = local_stack.spec.tier("pro")
    row = {"tier": "pro", "prompt_tokens": 1_000_000, "cached_tokens": 2_000_000, "completion_tokens": 500_000}
    # pro: $0.60 per 1M tokens, cached input $0.15 per 1M: 0.60 + 2 x 0.15 + 0.5 x 0.60 = $1.20
    assert tier.price_per_1m_cached_tokens == 0.15
    assert price_micro_usd(row, local_stack.spec) == 1_200_000
    hobby = {**row, "tier": "hobby"}     # no cached price: cached input at the tier's price
    assert price_micro_usd(hobby, local_stack.spec) == round((1 + 2 + 0.5) * 0.20 * 1_000_000)


# ---- the model list and conformance ----------------------------------------------------------


def test_models_carry_kind_and_context_length(local_stack, client):
    raw = client.models.with_raw_response.list(extra_headers={"x-request-id": "models-1"})
    assert raw.headers["x-request-id"] == "models-1"
    body = json.loads(raw.text)
    validate(body, "ListModelsResponse")
    got = {m["id"]: (m["kind"], m["max_model_len"]) for m in body["data"]}
    assert got == {"demo-chat": ("chat", 8192), "demo-mini": ("chat", 4096), "demo-embed": ("embedding", 512)}


@pytest.mark.parametrize("path", ["/models", "/models/demo-chat", "/nope"])
def test_request_id_is_echoed_on_every_route(local_stack, path):
    key = local_stack.key("rid", "pro")
    for sent in ("rid-abc.1", None):
        headers = {"authorization": f"Bearer {key}", **({"x-request-id": sent} if sent else {})}
        req = urllib.request.Request(local_stack.base_url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                rid = r.headers["x-request-id"]
        except urllib.error.HTTPError as e:
            rid = e.headers["x-request-id"]
        assert rid == sent if sent else rid.startswith("req_")
    with urllib.request.urlopen(local_stack.root_url + "/health", timeout=5) as r:
        assert r.headers["x-request-id"].startswith("req_")


def test_unknown_message_role_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo-chat", messages=[
            {"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}])
    assert e.value.body["param"] == "messages[1].role"
    ok = client.chat.completions.create(model="demo-chat", messages=[
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content


def test_openai_schemas_live_in_the_repository():
    from tests import openapi
    repo = openapi.SPEC_PATH.resolve().parents[2]
    assert openapi.SPEC_PATH.is_file() and (repo / "Makefile").is_file()
    meta = json.loads(openapi.SPEC_PATH.read_text())["x-infermesh"]
    assert meta["version"] and "MIT" in meta["source"]
    with pytest.raises(jsonschema.ValidationError):
        validate({"object": "list", "data": [{"id": 1}]}, "ListModelsResponse")
