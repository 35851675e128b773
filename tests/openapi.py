"""Validate objects against OpenAI's published OpenAPI spec (the extract in tests/openai_spec/schemas.json:
the schemas the tests use and what they reference, with the spec's version and source; refresh it
with scripts/refresh-openai-schemas.py).

    from tests.openapi import validate
    validate(response_json, "CreateChatCompletionResponse")   # raises jsonschema.ValidationError

The document is read once per process (then cached, with one validator per schema name).
It says `openapi: 3.1.0`, whose schemas are JSON Schema 2020-12, but some of it is still written
in OpenAPI 3.0 terms, which 2020-12 would read wrongly. At load, in every schema:
- `nullable: true` becomes `anyOf: [<the schema without nullable>, {"type": "null"}]` (2020-12
  ignores `nullable`, so `{"type": "string", "nullable": true}` would reject null); `nullable: false`
  is dropped.
- boolean `exclusiveMinimum`/`exclusiveMaximum` (3.0 style, beside `minimum`/`maximum`) become the
  2020-12 numeric form.
Other OpenAPI-only keywords (`discriminator`, `example`, `x-*`) are annotations 2020-12 ignores;
`format` is not asserted.

Added schema, not in the spec: `CreateCompletionStreamResponse`, a copy of CreateCompletionResponse
whose `choices[].finish_reason` may be null. The spec says legacy completion chunks share the
non-stream shape, but its finish_reason is not nullable, while every chunk before the last carries
`finish_reason: null` (OpenAI's and vLLM's streams alike). Validate completion stream chunks
against it; chat chunks have their own schema (CreateChatCompletionStreamResponse).

Refs resolve against the whole document (as one `referencing` resource), so every
`#/components/schemas/...` works, whatever schema it starts from.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent / "openai_spec" / "schemas.json"
_BASE_URI = "urn:infermesh:openai-openapi"


def validate(obj: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless `obj` matches components/schemas/`schema_name`."""
    validator(schema_name).validate(obj)


def is_valid(obj: Any, schema_name: str) -> bool:
    return validator(schema_name).is_valid(obj)


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    """A validator for one named schema (cached)."""
    spec, registry = _loaded()
    if schema_name not in spec["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {SPEC_PATH}")
    return Draft202012Validator({"$ref": f"{_BASE_URI}#/components/schemas/{schema_name}"}, registry=registry)


def schema(schema_name: str) -> dict[str, Any]:
    """The (converted) schema itself, for reading; do not mutate it."""
    return _loaded()[0]["components"]["schemas"][schema_name]


@functools.cache
def _loaded() -> tuple[dict[str, Any], Registry]:
    spec = orjson.loads(SPEC_PATH.read_bytes())
    schemas = spec["components"]["schemas"]
    for name in list(schemas):
        schemas[name] = _to_2020_12(schemas[name])
    schemas["CreateCompletionStreamResponse"] = _completion_stream_schema(schemas["CreateCompletionResponse"])
    registry = Registry().with_resource(_BASE_URI, DRAFT202012.create_resource(spec))
    return spec, registry


def _to_2020_12(node: Any) -> Any:
    if isinstance(node, list):
        return [_to_2020_12(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_2020_12(v) for k, v in node.items()}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), bool):
            if out.pop(bound) and limit in out:
                out[bound] = out.pop(limit)
    nullable = out.get("nullable")
    if isinstance(nullable, bool):
        del out["nullable"]
        if nullable:
            return {"anyOf": [out, {"type": "null"}]}
    return out


def _completion_stream_schema(base: dict[str, Any]) -> dict[str, Any]:
    chunk = copy.deepcopy(base)
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    chunk["description"] = ("infermesh test addition: CreateCompletionResponse as streamed, where "
                            "finish_reason is null until the last chunk.")
    return chunk
