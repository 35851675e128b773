"""An external OpenAI-compatible upstream (GonkaGate on the Gonka network, marketplace-apis.md section 9).

Nothing is rented: the gateway calls the upstream per request and pays per token. What the
fleet can check before routing overflow there is that the key works and the upstream lists the
model: ``GET /v1/models`` (OpenAI's list shape ``{"object": "list", "data": [{"id", ...}]}``).
Model ids are compared case-insensitively (GonkaGate's pages use both ``qwen/qwen3-32b-fp8``
and ``Qwen/Qwen3-32B-FP8``); ``check`` returns the id exactly as the upstream lists it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import ClassVar

from fleet.marketplaces.base import AuthFailed, HttpClient, ModelUnavailable, ProviderError, RetryPolicy


class OpenAIUpstream:
    kind: ClassVar[str] = "openai"
    default_base_url: ClassVar[str] = "https://api.gonkagate.com/v1"

    def __init__(self, api_key: str, base_url: str | None = None, *, retry: RetryPolicy | None = None,
                 timeout_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        if not api_key:
            raise AuthFailed("openai: no API key", provider=self.kind)
        # base_url is the OpenAI-style base including /v1, as the stack's provider declares it.
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.http = HttpClient(self.base_url, provider=self.kind, headers={"Authorization": f"Bearer {api_key}"},
                               retry=retry, timeout_s=timeout_s, sleep=sleep, rng=rng)

    def __repr__(self) -> str:
        return f"OpenAIUpstream(base_url={self.base_url!r})"

    def models(self) -> list[str]:
        resp = self.http.request("GET", "/models")
        body = resp.body
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise ProviderError(f"openai: GET /models: expected {{'data': [...]}}, got {str(body)[:200]}",
                                provider=self.kind)
        return [str(m["id"]) for m in body["data"] if isinstance(m, dict) and "id" in m]

    def check(self, model: str) -> str:
        """The upstream's own id for ``model``; ModelUnavailable when it does not serve it."""
        listed = self.models()
        for m in listed:
            if m.lower() == model.lower():
                return m
        raise ModelUnavailable(f"openai: {self.base_url} does not list {model!r} "
                               f"({len(listed)} models listed{': ' + ', '.join(listed[:5]) if listed else ''})",
                               provider=self.kind)
