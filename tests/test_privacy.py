"""No log line carries a prompt, a completion, a key or a bearer token, and no response names a
provider, a worker address or a traceback."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from openai import OpenAI

from gateway.logsafe import redact


def _all_logs(stack) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (stack.state / "logs").glob("*.log"))


def test_logs_hold_no_prompts_completions_or_keys(stack_factory):
    stack = stack_factory()
    key = stack.key("secretive", "pro")
    prompt = "PURPLE-GIRAFFE-PROMPT-7731"
    c = OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    completions = []
    r = c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": prompt}])
    completions.append(r.choices[0].message.content)
    for ch in c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": prompt}], stream=True):
        if ch.choices and ch.choices[0].delta.content:
            completions.append(ch.choices[0].delta.content)
    # error paths too: a wrong key that looks like a real one, a bad request, a forbidden model
    wrong = key[:-4] + "abcd"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=stack.base_url, api_key=wrong, max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": prompt}], temperature=9)
    # an upstream failure: every worker of the model gone
    for name, proc in stack.stack.procs:
        if name.startswith("demo-mini"):
            proc.kill()
            proc.wait()
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="demo-mini", messages=[{"role": "user", "content": prompt}])
    body = json.dumps(e.value.response.json())
    assert e.value.status_code in (502, 503)
    for leak in ("127.0.0.1", "sim-east", "demo-mini-east", "Traceback", "localhost"):
        assert leak not in body
    logs = _all_logs(stack)
    assert logs, "the gateway wrote no log at all"
    for secret in [prompt, key, wrong, key.split(".")[1], *[t for t in completions if len(t) > 3]]:
        assert secret not in logs


def test_redaction_of_tokens_in_log_text():
    line = "auth failed: Authorization: Bearer im-0123456789ab.S3cr3t_t0ken-x and sk-abcdefghijkl"
    out = redact(line)
    assert "S3cr3t" not in out and "sk-abcdefghijkl" not in out and "[redacted]" in out


def test_admin_endpoints_need_the_admin_token(local_stack):
    req = urllib.request.Request(local_stack.root_url + "/admin/endpoints",
                                 headers={"authorization": f"Bearer {local_stack.key()}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 401
    req = urllib.request.Request(local_stack.root_url + "/admin/endpoints",
                                 headers={"authorization": f"Bearer {local_stack.admin_token()}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        pools = json.loads(r.read())["pools"]
    assert {p["pool"] for p in pools} >= {"demo-chat-east", "demo-chat-west", "demo-chat-reserve"}
