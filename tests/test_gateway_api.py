"""The gateway's OpenAI contract, driven by the official openai SDK against real processes:
a gateway on loopback in front of sim workers. Every response and stream chunk is validated
against OpenAI's published OpenAPI schemas."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from openai import OpenAI

from tests.openapi import validate


@pytest.fixture(scope="module")
def client(local_stack) -> OpenAI:
    return OpenAI(base_url=local_stack.base_url, api_key=local_stack.key("acme", "pro"), max_retries=0)


def _raw(stack, path: str, body: bytes, key: str | None, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(stack.base_url + path, data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_chat_completion_matches_openai_schema(client):
    raw = client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8,
        extra_headers={"x-request-id": "test-req-42"})
    assert raw.headers["x-request-id"] == "test-req-42"
    body = json.loads(raw.text)
    validate(body, "CreateChatCompletionResponse")
    resp = raw.parse()
    assert resp.model == "demo-chat"
    assert resp.usage.completion_tokens == 8 and resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.choices[0].message.content


def test_generated_request_id_is_echoed(client):
    raw = client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-request-id"].startswith("req_")


def test_chat_stream_relays_every_chunk_and_usage_on_request(client):
    chunks = list(client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "Stream please"}], stream=True,
        stream_options={"include_usage": True}, max_tokens=10))
    for c in chunks:
        validate(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert usage_chunks[0].usage.completion_tokens == 10 and text


def test_chat_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "Stream please"}], stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_stream_and_not(client):
    resp = client.completions.with_raw_response.create(model="demo-mini", prompt="Once upon a time", max_tokens=5)
    validate(json.loads(resp.text), "CreateCompletionResponse")
    assert resp.parse().usage.completion_tokens == 5
    chunks = list(client.completions.create(model="demo-mini", prompt="Once", stream=True,
                                            stream_options={"include_usage": True}, max_tokens=4))
    for c in chunks[:-1]:
        validate(c.model_dump(exclude_unset=True), "CreateCompletionStreamResponse")
    assert chunks[-1].usage.completion_tokens == 4


def test_models_list_and_retrieve_follow_the_tier(local_stack, client):
    listed = client.models.with_raw_response.list()
    validate(json.loads(listed.text), "ListModelsResponse")
    assert sorted(m.id for m in listed.parse().data) == ["demo-chat", "demo-embed", "demo-mini"]
    hobby = OpenAI(base_url=local_stack.base_url, api_key=local_stack.key("tiny", "hobby"), max_retries=0)
    assert [m.id for m in hobby.models.list().data] == ["demo-mini", "demo-embed"]
    assert client.models.retrieve("demo-chat").id == "demo-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_wrong_and_missing_key_get_401(local_stack):
    bad = OpenAI(base_url=local_stack.base_url, api_key="im-000000000000.nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}])
    validate(e.value.response.json(), "ErrorResponse")
    status, _, body = _raw(local_stack, "/chat/completions", b"{}", key=None)
    assert status == 401 and body["error"]["code"] == "missing_api_key"


def test_revoked_key_is_refused_at_once(local_stack):
    from gateway.keys import KeyAdmin

    admin = KeyAdmin(local_stack.state / "keys.db")
    key, info = admin.create("revokee", "pro")
    c = OpenAI(base_url=local_stack.base_url, api_key=key, max_retries=0)
    c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    admin.revoke(info.id)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_model_outside_tier_is_403_and_unknown_is_404(local_stack, client):
    hobby = OpenAI(base_url=local_stack.base_url, api_key=local_stack.key("tiny2", "hobby"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        hobby.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "x"}])
    validate(e.value.response.json(), "ErrorResponse")
    assert e.value.code == "model_not_allowed"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 7}, "temperature"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"n": 0}, "n"),
])
def test_bad_parameters_are_400_naming_the_param(client, kwargs, param):
    args = {"model": "demo-chat", "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    validate(e.value.response.json(), "ErrorResponse")
    assert e.value.param == param


def test_bad_json_and_oversized_body(local_stack):
    key = local_stack.key("rawuser", "pro")
    status, headers, body = _raw(local_stack, "/chat/completions", b'{"model": "demo-chat", "messages": [', key)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    validate(body, "ErrorResponse")
    big = json.dumps({"model": "demo-chat", "messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()
    status, _, body = _raw(local_stack, "/chat/completions", big, key)
    assert status == 413 and body["error"]["type"] == "invalid_request_error"


def test_prompt_over_the_tier_cap_is_refused(local_stack):
    hobby = OpenAI(base_url=local_stack.base_url, api_key=local_stack.key("tiny3", "hobby"), max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:   # hobby allows 2048 prompt tokens
        hobby.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": "word " * 3000}])
    assert e.value.code == "context_length_exceeded"


def test_unknown_route_is_openai_shaped_404(local_stack):
    status, _, body = _raw(local_stack, "/embeddings-nope", b"{}", key="x")
    assert status == 404
    validate(body, "ErrorResponse")


def test_wrong_method_on_a_completion_route_is_openai_shaped_405(local_stack):
    import urllib.error
    req = urllib.request.Request(local_stack.base_url + "/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
    body = json.loads(e.value.read())
    validate(body, "ErrorResponse")
    assert "GET /v1/chat/completions" in body["error"]["message"]


def test_caps_limits_and_passthrough(stack_factory):
    """A tier with a small output cap and rpm: max_tokens above the cap is capped (not passed
    through), the request over the rpm gets 429 with Retry-After and x-ratelimit-* headers."""
    def mutate(c):
        hobby = next(t for t in c["tiers"] if t["name"] == "hobby")
        hobby.update(rpm=3, max_output_tokens=6)
        next(p for p in c["pools"] if p["name"] == "demo-mini-east")["sim"]["output_tokens"] = 50
    stack = stack_factory(mutate)
    c = OpenAI(base_url=stack.base_url, api_key=stack.key("capped", "hobby"), max_retries=0)
    r = c.chat.completions.with_raw_response.create(
        model="demo-mini", messages=[{"role": "user", "content": "x"}], max_tokens=1000)
    assert r.parse().usage.completion_tokens == 6 and r.parse().choices[0].finish_reason == "length"
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "2"
    c.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": "x"}])
    c.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": "x"}])
    validate(e.value.response.json(), "ErrorResponse")
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
