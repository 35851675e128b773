"""Admission: parse and check a request before it costs an upstream call.

Auth (key -> tenant, tier), body size, JSON and parameter checks, tier model access, prompt
and output caps, then limits and load shedding. Each failure is an ApiError in OpenAI's
shape. Unknown fields pass through untouched: only what is checked here is interpreted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from fleet.spec import Tier
from gateway.errors import bad_request
from gateway.keys import Principal


@dataclass(slots=True)
class Admitted:
    principal: Principal
    tier: Tier
    payload: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens_estimate: int
    max_output: int
    affinity: str | None


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return payload


def estimate_tokens(text_len: int) -> int:
    """A tokenizer-free estimate (about 4 characters a token) for the prompt cap and the up-front
    limit charge. Metering never uses it: the ledger takes the upstream's `usage`."""
    return text_len // 4 + 1


def _content_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def check_chat(payload: dict[str, Any]) -> tuple[int, str | None]:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", param="messages")
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
        chars += _content_len(m.get("content")) + 4
    affinity = None
    if len(messages) >= 2:
        # The conversation's opening (system + first user turn) names the conversation.
        first = messages[:2]
        affinity = "|".join(str(m.get("content"))[:512] for m in first)
    return estimate_tokens(chars), affinity


def check_completion(payload: dict[str, Any]) -> tuple[int, str | None]:
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return estimate_tokens(len(prompt)), None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return estimate_tokens(sum(len(p) for p in prompt)), None
        if all(isinstance(p, int) for p in prompt):
            return len(prompt), None
        if all(isinstance(p, list) for p in prompt):
            return sum(len(p) for p in prompt), None
    raise bad_request("'prompt' must be a string, an array of strings or an array of token ids.", param="prompt")


def check_common(payload: dict[str, Any], tier: Tier) -> tuple[bool, bool, int]:
    """stream flag, include_usage, and the capped output limit (written back into the payload)."""
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean.", param="stream")
    opts = payload.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    if opts and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    for name, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1)):
        v = payload.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi):
            raise bad_request(f"'{name}' must be a number between {lo} and {hi}.", param=name)
    n = payload.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > 16):
        raise bad_request("'n' must be an integer between 1 and 16.", param="n")
    field = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    requested = payload.get(field)
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise bad_request(f"'{field}' must be a positive integer.", param=field)
    cap = tier.max_output_tokens
    payload[field] = cap if requested is None else min(requested, cap)
    return stream, include_usage, payload[field] * (n or 1)
