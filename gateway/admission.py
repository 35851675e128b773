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
    scope: str = ""             # limiter bucket suffix: "" (chat's buckets) or "/embeddings"


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


MEDIA_KEYS = frozenset(("image_url", "input_audio", "file_data", "file"))   # base64 media: not text
MEDIA_CHARS = 4000            # what one media part counts toward the prompt estimate (about 1,000 tokens)
MAX_MODEL_CHARS = 256
MAX_METADATA = (16, 64, 512)  # OpenAI's metadata limits: pairs, key and value length


def parse_json(body: bytes, max_depth: int = 32) -> dict[str, Any]:
    """The body as a JSON object, or a 400. orjson refuses nesting beyond 1,024 levels itself;
    ``measure`` refuses anything deeper than the stack's max_json_depth."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if "recursion" in str(e).lower():
            raise bad_request(f"The JSON body is nested deeper than {max_depth} levels.", code="invalid_json") from None
        raise bad_request("We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = payload.get("model")
    if isinstance(model, str) and len(model) > MAX_MODEL_CHARS:
        raise bad_request(f"'model' is longer than {MAX_MODEL_CHARS} characters.", param="model")
    meta = payload.get("metadata")
    if meta is not None:
        pairs, klen, vlen = MAX_METADATA
        if (not isinstance(meta, dict) or len(meta) > pairs
                or any(len(k) > klen or not isinstance(v, str) or len(v) > vlen for k, v in meta.items())):
            raise bad_request(f"'metadata' must be an object of at most {pairs} string values, keys up to {klen} "
                              f"and values up to {vlen} characters.", param="metadata")
    return payload


def measure(payload: dict[str, Any], max_depth: int) -> dict[str, int]:
    """Characters of text under each top-level field (strings and object keys; a media part
    counts MEDIA_CHARS), for the prompt estimate: every token the worker will read, not only
    `content`. Refuses, naming the field, JSON nested deeper than ``max_depth``: the request is
    re-encoded for the worker, and orjson encodes at most 254 levels."""
    sizes: dict[str, int] = {}
    for key, value in payload.items():
        n = 0
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            v, depth = stack.pop()
            if isinstance(v, str):
                n += len(v)
            elif isinstance(v, dict):
                if depth >= max_depth:
                    raise bad_request(f"'{key}' is nested deeper than {max_depth} levels.", param=key,
                                      code="too_deep")
                for k, x in v.items():
                    n += len(k)
                    if k in MEDIA_KEYS and isinstance(x, (str, dict)):
                        n += MEDIA_CHARS
                    else:
                        stack.append((x, depth + 1))
            elif isinstance(v, list):
                if depth >= max_depth:
                    raise bad_request(f"'{key}' is nested deeper than {max_depth} levels.", param=key,
                                      code="too_deep")
                stack.extend((x, depth + 1) for x in v)
            else:
                n += 1
        sizes[key] = n
    return sizes


def estimate_tokens(text_len: int) -> int:
    """A tokenizer-free estimate (about 4 characters a token) for the prompt cap and the up-front
    limit charge. Metering never uses it: the ledger takes the upstream's `usage`."""
    return text_len // 4 + 1


ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))   # OpenAI's, no others


# what the worker reads besides the prompt itself: tools and their schemas, the answer's schema
_CHAT_EXTRA = ("tools", "functions", "tool_choice", "response_format")


def check_chat(payload: dict[str, Any], sizes: dict[str, int]) -> tuple[int, str | None]:
    """The prompt estimate counts every field of every message (names, tool calls and their
    arguments, content parts) and the tools' and response format's schemas."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array.", param="messages")
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
        if m["role"] not in ROLES:
            raise bad_request(f"Invalid value for 'messages[{i}].role': {m['role'][:40]!r}. Supported values are: "
                              f"'system', 'developer', 'user', 'assistant', 'tool' and 'function'.",
                              param=f"messages[{i}].role", code="invalid_value")
        chars += 4
    chars += sizes.get("messages", 0) + sum(sizes.get(f, 0) for f in _CHAT_EXTRA)
    affinity = None
    if len(messages) >= 2:
        # The conversation's opening (system + first user turn) names the conversation.
        first = messages[:2]
        affinity = "|".join(str(m.get("content"))[:512] for m in first)
    return estimate_tokens(chars), affinity


def check_completion(payload: dict[str, Any], sizes: dict[str, int]) -> tuple[int, str | None]:
    prompt = payload.get("prompt")
    extra = estimate_tokens(sizes.get("suffix", 0)) - 1
    if isinstance(prompt, str):
        return estimate_tokens(len(prompt)) + extra, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return estimate_tokens(sum(len(p) for p in prompt)) + extra, None
        if all(isinstance(p, int) for p in prompt):
            return len(prompt) + extra, None
        if all(isinstance(p, list) for p in prompt):
            return sum(len(p) for p in prompt) + extra, None
    raise bad_request("'prompt' must be a string, an array of strings or an array of token ids.", param="prompt")


# Responses API parameters that need state kept between requests; this service keeps none.
STATEFUL = (("previous_response_id", "send the earlier turns in 'input' instead"),
            ("conversation", "send the earlier turns in 'input' instead"),
            ("background", "background responses need stored state"))


def check_responses(payload: dict[str, Any], sizes: dict[str, int]) -> tuple[int, str | None]:
    """POST /v1/responses, stateless: `store` true, `previous_response_id`, `conversation` and
    `background` are refused with the param named; `store: false` is sent to the worker.
    `input` is a string or a list of items; `instructions` counts toward the prompt."""
    for name, why in STATEFUL:
        if payload.get(name) not in (None, False):
            raise bad_request(f"'{name}' is not supported: this service is stateless and stores no "
                              f"responses ({why}).", param=name, code="unsupported_parameter")
    if payload.get("store") is True:
        raise bad_request("'store': true is not supported: this service is stateless and stores no responses. "
                          "Send 'store': false or leave it out.", param="store", code="unsupported_parameter")
    payload["store"] = False
    inp = payload.get("input")
    if isinstance(inp, str):
        chars, items = len(inp), [inp]
    elif isinstance(inp, list) and inp:
        chars, items = 0, inp
        for i, item in enumerate(inp):
            if not isinstance(item, dict):
                raise bad_request(f"input[{i}] must be an object.", param=f"input[{i}]")
            role = item.get("role")
            if role is not None and role not in ROLES:
                raise bad_request(f"Invalid value for 'input[{i}].role': {str(role)[:40]!r}.",
                                  param=f"input[{i}].role", code="invalid_value")
            chars += 4
        chars += sizes.get("input", 0)
    else:
        raise bad_request("'input' must be a string or a non-empty array of input items.", param="input")
    instructions = payload.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("'instructions' must be a string.", param="instructions")
    chars += len(instructions or "") + sizes.get("tools", 0) + sizes.get("tool_choice", 0) + sizes.get("text", 0)
    affinity = None
    if len(items) >= 2:
        affinity = (instructions or "")[:512] + "|" + orjson.dumps(items[0])[:512].decode("utf-8", "replace")
    return estimate_tokens(chars), affinity


def check_embeddings(payload: dict[str, Any], max_inputs: int) -> int:
    """POST /v1/embeddings: `input` as a string, strings, token ids or lists of token ids (as
    OpenAI takes it); `encoding_format` float or base64; `dimensions` a positive integer (the
    worker refuses more than its model has). Returns the token estimate."""
    fmt = payload.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    dims = payload.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise bad_request("'dimensions' must be a positive integer.", param="dimensions")
    inp = payload.get("input")
    if isinstance(inp, str):
        if not inp:
            raise bad_request("'input' cannot be an empty string.", param="input")
        return estimate_tokens(len(inp))
    if not isinstance(inp, list) or not inp:
        raise bad_request("'input' must be a string or a non-empty array of strings or token arrays.",
                          param="input")
    if len(inp) > max_inputs:
        raise bad_request(f"'input' has {len(inp)} items; at most {max_inputs} are allowed per request.",
                          param="input")
    if all(isinstance(t, str) and t for t in inp):
        est = sum(estimate_tokens(len(t)) for t in inp)
    elif all(isinstance(t, int) and not isinstance(t, bool) for t in inp):
        est = len(inp)
    elif all(isinstance(t, list) and t and all(isinstance(x, int) and not isinstance(x, bool) for x in t)
             for t in inp):
        est = sum(len(t) for t in inp)
    else:
        raise bad_request("'input' must be a string or a non-empty array of non-empty strings, of token ids, "
                          "or of token id arrays.", param="input")
    return est


def check_common(payload: dict[str, Any], tier: Tier, responses: bool = False,
                 room: int | None = None) -> tuple[bool, bool, int]:
    """stream flag, include_usage, and the capped output limit (written back into the payload).
    The Responses API names its limit `max_output_tokens` and has no `n`. When the client sets
    no limit, the tier's cap is sent, but never more than `room` (the model's context length less
    the prompt estimate): vLLM refuses a request whose prompt plus limit exceed its context."""
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
    if responses:
        field = "max_output_tokens"
    else:
        field = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    requested = payload.get(field)
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise bad_request(f"'{field}' must be a positive integer.", param=field)
    cap = tier.max_output_tokens
    if requested is None and room is not None:
        cap = max(1, min(cap, room))
    payload[field] = cap if requested is None else min(requested, cap)
    return stream, include_usage, payload[field] * (n or 1)
