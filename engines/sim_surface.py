"""What the `sim` engine answers beyond plain text: tool calls, JSON to a schema, the Responses
API's objects and events, embeddings, and a prefix cache for `cached_tokens`. A SIMULATOR: no
model runs; every answer is a deterministic function of the request, shaped as vLLM's OpenAI
server shapes it (and as OpenAI's published schemas require, which tests check).

Pure functions of their inputs; engines/sim.py times and sends what they build.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import time
from collections import OrderedDict
from typing import Any

import orjson

# ---- tool calls and JSON output ---------------------------------------------------------------


def wants_tool_call(body: dict[str, Any], last_role: str | None) -> dict[str, Any] | None:
    """The function the sim calls, or None for a text answer.

    Like a model that has tools: it calls one when tools are offered, `tool_choice` allows it and
    the conversation does not already end with a tool's result (then it answers in text, which
    closes a round trip). A named `tool_choice` picks that function; otherwise the first one."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none" or last_role in ("tool", "function", "function_call_output"):
        return None
    named = None
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name") or choice.get("name")
    for t in tools:
        fn = t.get("function") if isinstance(t.get("function"), dict) else t   # chat nests, responses does not
        if isinstance(fn.get("name"), str) and (named is None or fn["name"] == named):
            return {"name": fn["name"], "parameters": fn.get("parameters") or {"type": "object"}}
    return None


def value_for(schema: Any, rng: random.Random, depth: int = 0) -> Any:
    """A value that matches a JSON schema (the subset structured outputs use: object, array,
    string, number, integer, boolean, null, enum, const, anyOf)."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return value_for(schema[key][0], rng, depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        return {name: value_for(sub, rng, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [value_for(schema.get("items"), rng, depth + 1) for _ in range(max(1, schema.get("minItems") or 1))]
    if kind == "string":
        return rng.choice(("alpha", "bravo", "charlie", "delta"))
    if kind == "integer":
        return rng.randint(schema.get("minimum", 0), max(schema.get("minimum", 0), schema.get("maximum", 100)))
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def json_schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a request asks its answer to follow: chat's response_format (json_schema or
    json_object), or the Responses API's text.format."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}}
    if fmt.get("type") == "json_schema":
        holder = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else fmt
        schema = holder.get("schema")
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


def seeded(text: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big"))


def split_pieces(text: str, n: int) -> list[str]:
    """`text` in n pieces (at least one), the way a stream carries it: their join is the text."""
    n = max(1, min(n, len(text) or 1))
    step = math.ceil(len(text) / n) or 1
    return [text[i:i + step] for i in range(0, len(text), step)] or [""]


# ---- the prefix cache (cached_tokens) -----------------------------------------------------------


class PrefixCache:
    """Which conversation prefixes this worker has seen, as vLLM's automatic prefix caching
    remembers the KV blocks of earlier prompts: a request whose messages before the last one were
    all sent before gets those messages' tokens reported as cached
    (`usage.prompt_tokens_details.cached_tokens`). Bounded, least recently used first out."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def _key(items: list[Any]) -> bytes:
        return hashlib.blake2b(orjson.dumps(items, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()

    def lookup(self, items: list[Any], tokens_of: list[int]) -> int:
        """Cached tokens for `items` (their token counts in `tokens_of`), then remember every prefix."""
        cached = 0
        for end in range(len(items) - 1, 0, -1):        # the longest seen prefix, never the whole prompt
            if self._key(items[:end]) in self._seen:
                cached = sum(tokens_of[:end])
                break
        for end in range(1, len(items) + 1):
            key = self._key(items[:end])
            self._seen[key] = None
            self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return cached


# ---- the Responses API --------------------------------------------------------------------------


def response_object(rid: str, model: str, body: dict[str, Any], status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None, created_at: int) -> dict[str, Any]:
    """A `response` object as OpenAI's schema (components/schemas/Response) requires it."""
    text_fmt = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
    obj = {
        "id": rid, "object": "response", "created_at": created_at, "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None, "incomplete_details": None,
        "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
        "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
        "temperature": body.get("temperature", 1.0), "text": text_fmt,
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [{"strict": True, "parameters": None, **t} if isinstance(t, dict) and t.get("type") == "function"
                  else t for t in body.get("tools") or []],
        "top_p": body.get("top_p", 1.0), "truncation": "disabled", "metadata": {},
    }
    if usage is not None:           # OpenAI's schema has no null usage: absent until known
        obj["usage"] = usage
    return obj


def response_usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "added" else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress" if status == "added"
            else status, "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response_events(base: dict[str, Any], item_id: str, pieces: list[str], call: dict[str, str] | None,
                    usage: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The stream of one answer, in OpenAI's order: created, in_progress, the output item added,
    its deltas, the item done, completed. `call`: a function call (name, call_id) whose
    arguments are the pieces; else a text message."""
    text = "".join(pieces)
    ev: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": {**base, "status": "in_progress"}}),
        ("response.in_progress", {"response": {**base, "status": "in_progress"}}),
    ]
    if call is None:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        ev += [("response.output_item.added", {"output_index": 0, "item": message_item(item_id, "", "added")}),
               ("response.content_part.added", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                                "part": part})]
        ev += [("response.output_text.delta", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                               "delta": p, "logprobs": []}) for p in pieces]
        done_item = message_item(item_id, text, "completed")
        ev += [("response.output_text.done", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                              "text": text, "logprobs": []}),
               ("response.content_part.done", {"item_id": item_id, "output_index": 0, "content_index": 0,
                                               "part": {**part, "text": text}})]
    else:
        ev.append(("response.output_item.added", {"output_index": 0, "item": call_item(
            item_id, call["call_id"], call["name"], "", "in_progress")}))
        ev += [("response.function_call_arguments.delta", {"item_id": item_id, "output_index": 0, "delta": p})
               for p in pieces]
        ev.append(("response.function_call_arguments.done", {"item_id": item_id, "output_index": 0,
                                                             "name": call["name"], "arguments": text}))
        done_item = call_item(item_id, call["call_id"], call["name"], text, "completed")
    ev += [("response.output_item.done", {"output_index": 0, "item": done_item}),
           ("response.completed", {"response": {**base, "status": "completed", "completed_at": int(time.time()),
                                                "output": [done_item], "usage": usage}})]
    return ev


def sse(events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    """Server-sent events as vLLM writes the Responses API's: `event: <type>` then `data: <json>`."""
    out = []
    for seq, (kind, fields) in enumerate(events):
        data = orjson.dumps({"type": kind, **fields, "sequence_number": seq})
        out.append(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
    return out


def responses_prompt(body: dict[str, Any]) -> tuple[list[Any], list[str], str | None]:
    """(input items, their texts, the last item's role) of a Responses API request; `instructions`
    counts as a leading system item."""
    raw = body.get("input")
    items: list[Any] = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list) else []
    if isinstance(body.get("instructions"), str):
        items.insert(0, {"role": "system", "content": body["instructions"]})
    texts, last_role = [], None
    for it in items:
        if isinstance(it, str):
            texts.append(it)
            last_role = "user"
            continue
        if not isinstance(it, dict):
            texts.append("")
            continue
        last_role = it.get("role") or it.get("type")
        content = it.get("content", it.get("output", it.get("arguments", "")))
        if isinstance(content, list):
            content = " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        texts.append(content if isinstance(content, str) else "")
    return items, texts, last_role


# ---- embeddings ---------------------------------------------------------------------------------


def embedding(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for `text` (the same text, the same vector, on every worker)."""
    rng = seeded(text)
    v = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def truncate(v: list[float], dims: int) -> list[float]:
    """`dimensions`: the first dims components, normalised again (as Matryoshka models shorten)."""
    head = v[:dims]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


def encode_base64(v: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
