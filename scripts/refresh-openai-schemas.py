#!/usr/bin/env python3
"""Refresh tests/openai_spec/schemas.json: the part of OpenAI's published OpenAPI spec the tests use.

    python3 scripts/refresh-openai-schemas.py PATH_OR_URL_OF_openapi.json

OpenAI publishes its spec (MIT licence) at https://github.com/openai/openai-openapi (and
https://app.stainless.com/api/spec/documented/openai/openapi.documented.yml). A user's clone has
nothing outside the repository, so the tests validate against this extract: the schemas named
in ROOTS and every schema they reference, copied unchanged, with the spec's version and
source beside them. Add a name to ROOTS when a test validates against a new schema.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

ROOTS = [
    "ErrorResponse", "ListModelsResponse", "Model",
    "CreateChatCompletionRequest", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
    "CreateCompletionRequest", "CreateCompletionResponse",
    "CreateEmbeddingRequest", "CreateEmbeddingResponse",
    "CreateResponse", "Response", "ResponseStreamEvent",
]
OUT = Path(__file__).resolve().parents[1] / "tests" / "openai_spec" / "schemas.json"


def refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for v in node.values():
            refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src = argv[0]
    if src.startswith(("http://", "https://")):
        with urllib.request.urlopen(src, timeout=60) as r:       # noqa: S310 - an operator-given URL
            text = r.read()
    else:
        text = Path(src).read_bytes()
    if src.endswith((".yml", ".yaml")):
        import yaml
        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    schemas = spec["components"]["schemas"]
    keep: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        found: set[str] = set()
        refs(schemas[name], found)
        todo += sorted(found - keep)
    out = {
        "x-infermesh": {
            "source": "OpenAI's published OpenAPI spec (https://github.com/openai/openai-openapi), MIT licence",
            "title": spec["info"]["title"], "version": spec["info"]["version"], "openapi": spec["openapi"],
            "extract": f"components/schemas named in scripts/refresh-openai-schemas.py ROOTS and their "
                       f"references: {len(keep)} of {len(schemas)}",
        },
        "openapi": spec["openapi"],
        "info": {k: spec["info"][k] for k in ("title", "version", "license") if k in spec["info"]},
        "components": {"schemas": {k: schemas[k] for k in sorted(keep)}},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(f"{OUT}: {len(keep)} schemas from {spec['info']['title']} {spec['info']['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
