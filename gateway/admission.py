"""Admission: who asks, and may this request cost an upstream call?

``Admission.identify`` finds the key (a failure there is answered and never metered: there is
nobody to bill); ``Admission.admit`` does the rest, in this order, each failure an ApiError in
OpenAI's shape that the meter records against the key: the tier, the tenant's own concurrency
(gateway/door.py), the body (size, time, JSON), the model (tier and key scope, the latency
breaker's fallback or shedding), the route's parameter checks and prompt estimate, the output
caps (the SLO-risk and breaker degradations), the gateway-wide in-flight count and shedding, the
key's spend hold, and the rate limits. What it takes (concurrency slots: ``Held``; the limiter's
charge and the spend hold: ``Admitted``) the meter gives back at the request's end (gateway/meter.py).
Unknown fields pass through untouched: only what is checked here is interpreted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from fleet.spec import Spec, Tier
from gateway.backends import Keys, Limiter
from gateway.door import FailureLimiter, InFlight
from gateway.errors import ApiError, bad_request
from gateway.keys import Principal
from gateway.ledger import UsageRecord
from gateway.metrics import Metrics
from gateway.money import Money, month_now
from gateway.overload import InFlightCount, LoopLag
from gateway.risk import Breaker, RiskWindow
from gateway.router import Router
from gateway.wire import Incoming

DRAIN_LIMIT = 16 * 1024 * 1024  # bodies above the limit but below this are read before the 413


@dataclass(slots=True)
class Held:
    """What a request holds from its authentication on; ``Meter.end`` gives it back."""

    principal: Principal
    address: str                # the client's, for the failure count per address (door.FailureLimiter)
    door: bool = False          # a slot of its tenant's and key's concurrency (door.InFlight)
    counted: bool = False       # a slot of the gateway-wide in-flight count (overload.InFlightCount)


@dataclass(slots=True)
class Admitted:
    """An admitted request: what the upstream call needs, and what the meter settles (the limiter's
    up-front charge of prompt estimate plus max_output, in the buckets named by ``scope``)."""

    principal: Principal
    held: Held                  # its concurrency slots (a started stream's relay gives them back at its end)
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


_CHECKS = {"chat": check_chat, "completions": check_completion, "responses": check_responses}
_PROMPT_PARAM = {"chat": "messages", "completions": "prompt", "responses": "input"}


def embedding_tier(tier: Tier) -> Tier:
    """The limits /v1/embeddings requests are charged against: the tier's `embeddings` block,
    or without one the tier's own rpm and tpm (in buckets apart from chat's)."""
    e = tier.embeddings
    if e is None:
        return tier
    return tier.model_copy(update={"rpm": e.rpm, "tpm": e.tpm, "key_rpm": None, "key_tpm": None})


class Admission:
    """The checks in front of every upstream call (see the module's text), with what they read:
    the tiers and the `gateway:` settings (``configure``: replaced live with the gateway config),
    the key store, the limiter, the router's catalogue, the overload signals and the breakers."""

    def __init__(self, spec: Spec, keys: Keys, limiter: Limiter, router: Router, metrics: Metrics,
                 in_flight: InFlightCount, lag: LoopLag, door: InFlight, failures: FailureLimiter,
                 risk: RiskWindow, breaker: Breaker, money: Money,
                 spent_since: Callable[[str, int], Awaitable[int]]) -> None:
        self.keys, self.limiter, self.router, self.metrics = keys, limiter, router, metrics
        self.in_flight, self.lag, self.door, self.failures = in_flight, lag, door, failures
        self.risk, self.breaker, self.money = risk, breaker, money
        self.spent_since = spent_since      # a key's spend in the ledger since a time: seeds a month
        self.configure(spec)

    def configure(self, spec: Spec) -> None:
        """Tiers (limits, SLOs, priorities) and the `gateway:` settings read per request."""
        self.spec = spec
        self.tiers: dict[str, Tier] = {t.name: t for t in spec.tiers}
        # /v1/embeddings: limits of their own per tier, in buckets apart from chat's (Admitted.scope)
        self.embedding_tiers: dict[str, Tier] = {t.name: embedding_tier(t) for t in spec.tiers}
        self.max_priority = max((t.priority for t in spec.tiers), default=0)

    # ---- who asks -----------------------------------------------------------------------------
    def identify(self, request: Incoming) -> Held:
        """The key in the Authorization header, unless the client's address failed too often;
        401s are counted against the address."""
        address = self.failures.address(request.client, request.headers.get("x-forwarded-for"))
        try:
            if self.failures.blocked(address):
                raise self.failures.refusal()
            principal = self.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            if e.status == 401:
                self.failures.failed(address)
            raise
        return Held(principal, address)

    def authenticate(self, authorization: str | None) -> Principal:
        token = bearer(authorization)
        if token is None:
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="missing_api_key")
        principal = self.keys.authenticate(token)
        if principal is None:
            if not self.keys.ready:    # no key set loaded yet (PostgreSQL down at start, no cache): never a 401
                raise ApiError(503, "The service is starting. Please retry shortly.", code="keys_unavailable",
                               headers={"retry-after": "1"})
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return principal

    def tier_of(self, principal: Principal) -> Tier:
        tier = self.tiers.get(principal.tier)
        if tier is None:
            raise ApiError(403, "Your plan is not available on this service. Contact support.", code="unknown_tier")
        return tier

    def check_model(self, tier: Tier, model: Any) -> str:
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required.", param="model")
        if not self.router.has_model(model):
            raise ApiError(404, f"The model '{model[:200]}' does not exist.", code="model_not_found", param="model")
        if model not in tier.models:
            raise ApiError(403, f"Your plan does not include the model '{model}'.", code="model_not_allowed",
                           param="model")
        return model

    # ---- may it cost an upstream call ---------------------------------------------------------
    async def admit(self, request: Incoming, route: str, held: Held, rec: UsageRecord,
                    headers: dict[str, str]) -> Admitted:
        """Every check after the key, in order; ``rec`` (the ledger row) and ``headers`` (the
        reply's) get what was decided. Raises ApiError; ``held`` says what to give back either way."""
        principal = held.principal
        tier = self.tier_of(principal)
        self.door.enter(principal, tier)          # this tenant's own concurrency, before the body
        held.door = True
        body = await self.read_body(request)
        payload = parse_json(body, self.spec.gateway.max_json_depth)
        model = payload.get("model")
        rec.requested_model = model[:200] if isinstance(model, str) else ""
        sizes = measure(payload, self.spec.gateway.max_json_depth)
        try:
            model = self.check_model(tier, payload.get("model"))
        except ApiError as e:
            if e.code == "model_not_found":       # guessing at model names counts like guessing at keys
                self.failures.failed(held.address)
            raise
        if principal.models is not None and model not in principal.models:      # the key's own scope
            raise ApiError(403, f"This API key may not use the model '{model}'.", code="model_not_allowed",
                           param="model")
        model = self.breaker.route(self, tier, model, rec, headers)      # lower tiers: fallback or shed
        model_route = self.router.models[model]
        kind = model_route.kind
        scope, limits = "", tier
        if route == "embeddings":
            if kind != "embedding":
                raise bad_request(f"The model '{model}' does not create embeddings.", param="model",
                                  code="model_not_supported")
            limits, scope = self.embedding_tiers[tier.name], "/embeddings"
            est = check_embeddings(payload, tier.embeddings.max_inputs if tier.embeddings else 2048)
            stream, include_usage, max_output, affinity = False, False, 0, None
        else:
            if kind != "chat":
                raise bad_request(f"The model '{model}' is an embedding model: call /v1/embeddings.",
                                  param="model", code="model_not_supported")
            est, affinity = _CHECKS[route](payload, sizes)
            if est > tier.max_prompt_tokens:
                raise bad_request(f"The prompt is about {est} tokens; your plan allows {tier.max_prompt_tokens}.",
                                  param=_PROMPT_PARAM[route], code="context_length_exceeded")
            context = model_route.context_length
            stream, include_usage, max_output = check_common(payload, tier, route == "responses",
                                                             context - est if context else None)
            if tier.degraded_max_output_tokens and self.risk.at_risk(model, tier):
                max_output = self.degrade(payload, tier, model, max_output, headers)
            max_output = self.breaker.limit(self, tier, rec.requested_model, est, payload, max_output, headers)
            if stream and route != "responses":     # a response stream's usage is in response.completed
                payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        rec.stream = stream
        self.in_flight.enter()                    # gateway-wide: admitted, well-formed requests only
        held.counted = True
        self.shed(tier)
        if principal.spend_limit is not None:     # held before dispatch, settled from the real usage
            await self.hold_spend(principal, principal.spend_limit, tier, rec, est + max_output)
        decision = await self.limiter.admit(principal.tenant + scope, principal.key_id + scope, limits,
                                            est + max_output)
        headers.update(decision.headers)
        if decision.unavailable:
            raise ApiError(503, "Rate limits for your plan are briefly unavailable. Please retry shortly.",
                           code="limits_unavailable", headers=decision.headers)
        if not decision.allowed:
            self.metrics.rate_limited.labels(tier.name).inc()
            raise ApiError(429, f"Rate limit reached for {decision.reason} on your plan. "
                                f"Please retry after {decision.headers['retry-after']}s.",
                           code="rate_limit_exceeded", headers=decision.headers)
        return Admitted(principal, held, tier, payload, model, stream, include_usage, est, max_output, affinity,
                        scope)

    async def read_body(self, request: Incoming) -> bytes:
        """The body, within the stack's body_timeout_s (else 408, and the connection closes: the
        rest of a dribbled body is never read) and up to its size limit."""
        try:
            async with asyncio.timeout(self.spec.gateway.body_timeout_s):
                return await self._read_body(request)
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {self.spec.gateway.body_timeout_s:g} s.",
                           code="request_timeout", headers={"connection": "close"}) from None

    async def _read_body(self, request: Incoming) -> bytes:
        """The body, up to the stack's limit. A larger body is read to its end (up to
        DRAIN_LIMIT) before the 413, so that the client reads the error instead of a broken pipe."""
        limit = self.spec.gateway.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) <= limit:
            return await request.body()        # the common case: one read, the server enforces the length
        too_large = ApiError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > DRAIN_LIMIT:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.chunks():
            size += len(chunk)
            if size > DRAIN_LIMIT:
                raise too_large
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise too_large
        return b"".join(chunks)

    def degrade(self, payload: dict[str, Any], tier: Tier, model: str, max_output: int,
                headers: dict[str, str]) -> int:
        """Cap max_tokens at the tier's degraded limit while its SLO is at risk (gateway/risk.py)."""
        field = next((f for f in ("max_output_tokens", "max_completion_tokens") if f in payload), "max_tokens")
        cap = tier.degraded_max_output_tokens
        if cap is None or payload[field] <= cap:
            return max_output
        payload[field] = cap
        headers["x-infermesh-degraded"] = "max_tokens"
        self.metrics.degraded.labels(model, tier.name).inc()
        return cap * (payload.get("n") or 1)

    def shed(self, tier: Tier) -> None:
        """Under overload the lowest tiers are refused first: each priority level gets a
        larger share of the in-flight budget and of the event loop's lateness budget
        (gateway/overload.py), the top tier all of it."""
        g = self.spec.gateway
        share = 0.7 + 0.3 * (tier.priority / self.max_priority if self.max_priority else 1.0)
        if self.in_flight.n >= g.max_in_flight * share or (
                g.max_loop_lag_ms and self.lag.level() * 1000 >= g.max_loop_lag_ms * share):
            self.metrics.shed.labels(tier.name).inc()
            raise ApiError(429, "The service is under heavy load. Please retry shortly.", code="overloaded",
                           headers={"retry-after": "2"})

    async def hold_spend(self, principal: Principal, limit: int, tier: Tier, rec: UsageRecord, tokens: int) -> None:
        """Hold the most this request can cost against the key's monthly spend ``limit`` (all replicas
        share the count on Redis), or refuse it: 429 insufficient_quota, as OpenAI does."""
        month, since = month_now()
        amount = self.money.reserve(tier.name, tokens)

        async def seed() -> int:              # the ledger's sum, when no store knows the key's month yet
            return await self.spent_since(principal.key_id, since)
        got = await self.limiter.reserve_spend(principal.key_id, month, limit, amount, tier, seed)
        if got is None:
            raise ApiError(503, "Spend limits for your key are briefly unavailable. Please retry shortly.",
                           code="limits_unavailable", headers={"retry-after": "1"})
        if not got:
            raise ApiError(429, f"This API key has reached its monthly spend limit of "
                                f"${limit / 1e6:,.2f}. Raise it or use another key.",
                           code="insufficient_quota", type_="insufficient_quota",
                           headers={"x-should-retry": "false"})     # the openai SDK would retry a 429
        rec.spend_hold = (month, amount)
