"""The `sim` engine: a SIMULATOR of vLLM's OpenAI-compatible server. It runs no model.

It answers the same HTTP API a vLLM worker does (chat and text completions, streaming with
an optional usage chunk, the stateless Responses API, embeddings with --embedding-dim, tool
calls and JSON answers to a schema, cached prompt tokens with --enable-prompt-tokens-details,
/v1/models, /health, /version, and a /metrics page with vLLM's metric names; the bodies beyond
plain text are built in engines/sim_surface.py), with knobs for time to first token,
inter-token latency, output length and errors, and faults that drills switch on at run time.
It is what the local stack, the drills and the benchmarks run on machines without a GPU, and
it says that it is a simulator wherever it shows:
`owned_by: "infermesh-simulator"` in /v1/models, the start line, `--help`, /version, /metrics.

    python -m engines.sim --host 127.0.0.1 --port 9101 --model demo-chat \
        [--ttft-ms 30] [--itl-ms 5] [--output-tokens 16] [--error-rate 0.0] [--seed N] \
        [--max-concurrency 64] [--max-model-len 8192] [--fault MODE] [--unhealthy]

Output. The text is words from a fixed vocabulary, one word per token, chosen by a generator
seeded with a hash of the prompt: the same prompt gives the same text on every worker (synthetic
probes can assert content). completion_tokens = min(max_tokens or max_completion_tokens,
--output-tokens); finish_reason is "length" when max_tokens cut the output short, else "stop".

Prompt tokens are counted without a tokenizer: the whitespace-separated words of the prompt
(completions; a list of token ids counts one per id), or of every message's text content plus 3
per message (chat; text parts of a content list count, other parts do not).

Timing. TTFT is slept before the first token (the stream's headers go out at once, as vLLM's
do), then ITL between tokens; a non-stream answer comes after ttft + (n - 1) * itl. Requests
beyond --max-concurrency wait in a queue (an asyncio.Semaphore) and count in
vllm:num_requests_waiting; KV-cache usage is simulated as running / max_concurrency.

Faults: GET/POST/DELETE /sim/faults, JSON, partial updates (only keys present change):
    mode        "none" | "hang" | "reset" | "error500" | "slow"
                hang: read the request, never answer (until the client goes away);
                reset: streams send `reset_after` chunks, then the TCP connection is aborted;
                       non-stream requests see the connection closed without a response;
                error500: every generation request gets a 500 (OpenAI-shaped error);
                slow: TTFT is `ttft_ms` if set, else the start TTFT times `slow_factor`.
    error_rate  0..1, share of requests answered 500 (a seeded draw per request: --seed, or
                "seed" in the body to reseed, makes the sequence repeatable); null = the start value
    ttft_ms, itl_ms   run-time latency overrides in any mode; null = the start value
    unhealthy   true: /health answers 503
    slow_factor, reset_after, seed   as above
DELETE restores the faults the worker started with. GET /sim/stats counts answers by outcome.

/metrics is written by hand (a few f-strings): one model per process and a handful of numbers
make a registry, its locks and its generic exposition pure overhead on a fake upstream meant to
cost nothing. The families and labels are those vLLM's prometheus_client registry exposes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from engines import sim_surface as surface

ENGINE = "infermesh-simulator"
FAULT_MODES = ("none", "hang", "reset", "error500", "slow")

# One word per token. 64 entries: a generator draw picks one with its top 6 bits.
VOCAB = (
    "the", "mesh", "routes", "tokens", "through", "a", "simulated", "worker", "and", "every",
    "stream", "arrives", "on", "time", "while", "gateway", "keeps", "its", "promise", "to",
    "customer", "who", "sees", "one", "reliable", "endpoint", "not", "messy", "provider", "layer",
    "behind", "it", "latency", "budget", "holds", "under", "load", "because", "pools", "fail",
    "over", "cleanly", "when", "primary", "goes", "dark", "standby", "takes", "traffic", "as",
    "probes", "verify", "what", "we", "promise", "with", "small", "steady", "steps", "of",
    "quiet", "green", "light", "again",
)
_FIRST = tuple(orjson.dumps(w) for w in VOCAB)         # first token: no leading space
_NEXT = tuple(orjson.dumps(" " + w) for w in VOCAB)    # later tokens: " word"

_LCG_A = 6364136223846793005
_LCG_C = 1442695040888963407
_MASK = (1 << 64) - 1


class Continued(str):
    """A chat's seed text when the request continues its final assistant message (vLLM's
    ``continue_final_message``): the seed of the messages before it, and the words it already
    holds (``offset``), so the answer is the rest of what the whole answer would have been."""

    offset: int = 0


def token_indices(seed_text: str, n: int) -> list[int]:
    """Vocabulary indices of the n tokens generated for a prompt (a 64-bit LCG seeded by crc32)."""
    x = zlib.crc32(seed_text.encode("utf-8", "surrogatepass")) or 1
    skip = getattr(seed_text, "offset", 0)
    out = []
    for _ in range(skip + n):
        x = (x * _LCG_A + _LCG_C) & _MASK
        out.append(x >> 58)
    return out[skip:]


def completion_text(seed_text: str, n: int) -> str:
    """The text the simulator answers for a prompt: `n` words, separated by single spaces.

    `seed_text` is the completion prompt, or for chat the message texts joined by newlines.
    """
    return " ".join(VOCAB[i] for i in token_indices(seed_text, n))


@dataclass
class Fault:
    """Faults of a running simulator; see the module docstring for their meaning."""

    mode: str = "none"
    error_rate: float | None = None    # None: SimConfig.error_rate
    ttft_ms: float | None = None       # None: SimConfig.ttft_ms (times slow_factor in "slow")
    itl_ms: float | None = None        # None: SimConfig.itl_ms
    unhealthy: bool = False
    slow_factor: float = 10.0
    reset_after: int = 2               # chunks a "reset" stream sends before the abort

    def update(self, body: Any) -> int | None:
        """Apply a partial update from a JSON body; returns a new RNG seed if one was given.

        Raises ValueError naming the field; nothing changes when any field is bad.
        """
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        known = {f.name for f in dataclasses.fields(self)} | {"seed"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        new = dataclasses.replace(self)
        for key, value in body.items():
            if key == "seed":
                continue
            setattr(new, key, value)
        new.validate()
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError("seed must be an integer")
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(new, f.name))
        return seed

    def validate(self) -> None:
        if self.mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAULT_MODES)}, got {self.mode!r}")
        if self.error_rate is not None and not (_is_number(self.error_rate) and 0 <= self.error_rate <= 1):
            raise ValueError("error_rate must be a number from 0 to 1, or null")
        for name in ("ttft_ms", "itl_ms"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, or null")
        if not isinstance(self.unhealthy, bool):
            raise ValueError("unhealthy must be true or false")
        if not (_is_number(self.slow_factor) and self.slow_factor >= 1):
            raise ValueError("slow_factor must be a number >= 1")
        if not (isinstance(self.reset_after, int) and not isinstance(self.reset_after, bool) and self.reset_after >= 0):
            raise ValueError("reset_after must be an integer >= 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SimConfig:
    """What a simulator worker serves and how it behaves at start."""

    model: str = "demo-chat"
    host: str = "127.0.0.1"
    port: int = 9101
    ttft_ms: float = 30.0
    itl_ms: float = 5.0
    output_tokens: int = 16
    error_rate: float = 0.0
    seed: int | None = None
    max_concurrency: int = 64
    max_model_len: int = 8192
    embedding_dim: int = 0             # > 0: an embedding model (vLLM --runner pooling): /v1/embeddings only
    prompt_tokens_details: bool = False    # vLLM --enable-prompt-tokens-details: usage reports cached_tokens
    fault: Fault = field(default_factory=Fault)
    # mutual TLS, with vLLM's own option names (--ssl-keyfile ... --ssl-cert-reqs 2); all unset: plain HTTP
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0               # 0 none, 1 optional, 2 required (ssl.CERT_*), as vLLM's


class _Refused(Exception):
    """A request answered with an OpenAI-shaped error before any generation."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_response(status: int, message: str, type_: str, param: str | None, code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Sim:
    """The state of one simulator worker: config, faults, queue, counters."""

    def __init__(self, cfg: SimConfig) -> None:
        cfg.fault.validate()
        if cfg.max_concurrency < 1 or cfg.output_tokens < 1 or cfg.max_model_len < 1:
            raise ValueError("max_concurrency, output_tokens and max_model_len must be >= 1")
        if cfg.ttft_ms < 0 or cfg.itl_ms < 0 or not 0 <= cfg.error_rate <= 1:
            raise ValueError("ttft_ms and itl_ms must be >= 0, error_rate from 0 to 1")
        self.cfg = cfg
        self.start_fault = dataclasses.replace(cfg.fault)
        self.fault = dataclasses.replace(cfg.fault)
        self.rng = random.Random(cfg.seed)
        self.sem = asyncio.Semaphore(cfg.max_concurrency)
        self.running = 0
        self.waiting = 0
        self.hanging = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = {"stop": 0, "length": 0}
        self.outcomes: dict[str, int] = {}
        self.created = int(time.time())
        self._id_prefix = os.urandom(6).hex()
        self._ids = 0
        self._label = f'model_name="{_escape_label(cfg.model)}"'
        self.cache = surface.PrefixCache()
        self.model_json = orjson.dumps(cfg.model)

    # -- helpers -------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._id_prefix}{self._ids:x}"

    def ttft_s(self) -> float:
        f = self.fault
        if f.ttft_ms is not None:
            ms = f.ttft_ms
        elif f.mode == "slow":
            ms = self.cfg.ttft_ms * f.slow_factor
        else:
            ms = self.cfg.ttft_ms
        return ms / 1000.0

    def itl_s(self) -> float:
        ms = self.fault.itl_ms if self.fault.itl_ms is not None else self.cfg.itl_ms
        return ms / 1000.0

    def error_rate(self) -> float:
        return self.fault.error_rate if self.fault.error_rate is not None else self.cfg.error_rate

    def fault_state(self) -> dict[str, Any]:
        state = dataclasses.asdict(self.fault)
        state["effective"] = {
            "ttft_ms": self.ttft_s() * 1000.0,
            "itl_ms": self.itl_s() * 1000.0,
            "error_rate": self.error_rate(),
        }
        state["engine"] = ENGINE
        return state

    # -- request parsing -------------------------------------------------------------------

    def _parse(self, raw: bytes, chat: bool) -> tuple[dict[str, Any], str, int, int, bool]:
        """Check a request; returns (body, seed text, prompt tokens, max_tokens or 0, truncated?)."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Refused(400, f"Request body is not valid JSON: {exc}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise _Refused(400, "Request body must be a JSON object", "invalid_request_error")
        model = body.get("model")
        if model is not None and model != self.cfg.model:
            raise _Refused(404, f"The model `{model}` does not exist.", "invalid_request_error",
                           "model", "model_not_found")
        if chat:
            seed_text, prompt_tokens = _chat_prompt(body.get("messages"))
            msgs = body.get("messages")
            if (body.get("continue_final_message") and len(msgs) > 1 and isinstance(msgs[-1], dict)
                    and msgs[-1].get("role") == "assistant" and isinstance(msgs[-1].get("content"), str)):
                seed_text = Continued(_chat_prompt(msgs[:-1])[0])      # vLLM's continue_final_message
                seed_text.offset = len(msgs[-1]["content"].split())
        else:
            seed_text, prompt_tokens = _completion_prompt(body.get("prompt"))
        max_tokens = body.get("max_completion_tokens") if chat else None
        param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = body.get("max_tokens"), "max_tokens"
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise _Refused(400, f"{param} must be an integer >= 1", "invalid_request_error", param)
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise _Refused(400, "stream must be a boolean", "invalid_request_error", "stream")
        limit = self.cfg.max_model_len
        if prompt_tokens + (max_tokens or 0) > limit:
            raise _Refused(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_tokens + (max_tokens or 0)} tokens ({prompt_tokens} in the messages, "
                           f"{max_tokens or 0} in the completion).", "invalid_request_error", param)
        n = self.cfg.output_tokens
        truncated = max_tokens is not None and max_tokens < n
        if truncated:
            n = max_tokens
        return body, seed_text, prompt_tokens, n, truncated

    # -- handlers ------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool, api: str = "") -> web.StreamResponse:
        """chat and completions (and, with `api`, responses and embeddings): faults, queue, answer."""
        raw = await request.read()
        api = api or ("chat" if chat else "completions")
        try:
            if (api == "embeddings") != (self.cfg.embedding_dim > 0):
                raise _Refused(400, f"The model `{self.cfg.model}` does not support the "
                               f"{'Embeddings' if api == 'embeddings' else 'generation'} API.",
                               "invalid_request_error", "model")
            if api == "responses":
                body, seed_text, prompt_tokens, n, truncated = self._parse_responses(raw)
            elif api == "embeddings":
                body, seed_text, prompt_tokens, n, truncated = self._parse_embeddings(raw)
            else:
                body, seed_text, prompt_tokens, n, truncated = self._parse(raw, chat)
        except _Refused as r:
            self._count(str(r.status))
            return _error_response(r.status, r.message, r.type, r.param, r.code)

        mode = self.fault.mode
        if mode == "hang":
            return await self._hang(request)
        rate = self.error_rate()
        if mode == "error500" or (rate > 0 and self.rng.random() < rate):
            self._count("500")
            return _error_response(500, "Simulated engine failure (infermesh simulator fault injection)",
                                   "server_error", None, "simulated_fault")
        stream = body.get("stream") is True
        if mode == "reset" and not stream:
            self._count("reset")
            return _abort(request)

        self.waiting += 1
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            if api == "embeddings":
                return await self._embed(body, prompt_tokens)
            if api == "responses":
                return await self._respond(request, body, seed_text, prompt_tokens, n, truncated, stream)
            if chat and (surface.wants_tool_call(body, _last_role(body)) or surface.json_schema_of(body)):
                return await self._chat_structured(request, body, seed_text, prompt_tokens, n, stream)
            if stream:
                opts = body.get("stream_options")
                include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
                return await self._stream(request, chat, seed_text, prompt_tokens, n, truncated, include_usage,
                                          self._cached(body, chat))
            return await self._complete(chat, seed_text, prompt_tokens, n, truncated, self._cached(body, chat))
        finally:
            self.running -= 1
            self.sem.release()

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        # Never answers. The handler is cancelled when the client goes away (handler_cancellation
        # in main()); under a runner without it, the poll below notices the closed transport, so
        # nothing outlives the connection.
        self._count("hang")
        self.hanging += 1
        try:
            while True:
                transport = request.transport
                if transport is None or transport.is_closing() or self.fault.mode != "hang":
                    break
                await asyncio.sleep(0.25)
            if self.fault.mode != "hang" and request.transport is not None:
                # The drill switched the fault off: the hung request is dropped, as a restarted
                # engine would drop it.
                return _abort(request)
        finally:
            self.hanging -= 1
        return web.Response(status=499)  # the client is gone; nothing is sent

    async def _complete(self, chat: bool, seed_text: str, prompt_tokens: int, n: int,
                        truncated: bool, cached: int | None = None) -> web.Response:
        delay = self.ttft_s() + max(n - 1, 0) * self.itl_s()
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self._count("disconnected")
                raise
        text = completion_text(seed_text, n)
        finish = "length" if truncated else "stop"
        usage = self._usage(prompt_tokens, n, cached)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish}
            obj, prefix = "chat.completion", "chatcmpl"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj, prefix = "text_completion", "cmpl"
        body = {"id": self._next_id(prefix), "object": obj, "created": int(time.time()),
                "model": self.cfg.model, "choices": [choice], "usage": usage}
        self._finished(prompt_tokens, n, finish)
        self._count("200")
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(self, request: web.Request, chat: bool, seed_text: str, prompt_tokens: int, n: int,
                      truncated: bool, include_usage: bool, cached: int | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        reset_after = self.fault.reset_after if self.fault.mode == "reset" else -1
        sent_tokens = 0
        try:
            await resp.prepare(request)
            ttft, itl = self.ttft_s(), self.itl_s()
            if ttft > 0:
                await asyncio.sleep(ttft)
            # Every chunk is a fixed head, a JSON-encoded piece and a fixed tail: no dict, no dumps.
            cid = self._next_id("chatcmpl" if chat else "cmpl").encode()
            created = str(int(time.time())).encode()
            obj = b"chat.completion.chunk" if chat else b"text_completion"
            head = (b'data: {"id":"' + cid + b'","object":"' + obj + b'","created":' + created
                    + b',"model":' + self.model_json + b',"choices":[{"index":0,')
            if chat:
                tok_head, tok_tail = head + b'"delta":{"content":', b'},"logprobs":null,"finish_reason":null}]}\n\n'
            else:
                tok_head, tok_tail = head + b'"text":', b',"logprobs":null,"finish_reason":null}]}\n\n'
            chunks: list[bytes] = []
            if chat:
                chunks.append(head + b'"delta":{"role":"assistant","content":""},"logprobs":null,'
                                     b'"finish_reason":null}]}\n\n')
            for i, idx in enumerate(token_indices(seed_text, n)):
                chunks.append(tok_head + (_NEXT[idx] if i or getattr(seed_text, "offset", 0) else _FIRST[idx])
                              + tok_tail)
            finish = b'"length"' if truncated else b'"stop"'
            if chat:
                chunks.append(head + b'"delta":{},"logprobs":null,"finish_reason":' + finish + b'}]}\n\n')
            else:
                chunks.append(head + b'"text":"","logprobs":null,"finish_reason":' + finish + b'}]}\n\n')
            if include_usage:
                chunks.append(
                    b'data: {"id":"' + cid + b'","object":"' + obj + b'","created":' + created
                    + b',"model":' + self.model_json + b',"choices":[],"usage":'
                    + orjson.dumps(self._usage(prompt_tokens, n, cached)) + b"}\n\n")
            chunks.append(b"data: [DONE]\n\n")
            first_token = 1 if chat else 0  # chunks[first_token:first_token + n] are the tokens

            if reset_after >= 0:
                for i, chunk in enumerate(chunks[:reset_after]):
                    if i and itl > 0:
                        await asyncio.sleep(itl)
                    await resp.write(chunk)
                    if first_token <= i < first_token + n:
                        sent_tokens += 1
                self.generation_tokens += sent_tokens
                self._count("reset")
                transport = request.transport
                if transport is not None:
                    transport.abort()
                return resp
            if itl <= 0:
                await resp.write(b"".join(chunks))
                sent_tokens = n
            else:
                # the role chunk and the first token leave together, at TTFT
                start = first_token + 1
                await resp.write(b"".join(chunks[:start]))
                sent_tokens = 1
                for i in range(start, len(chunks)):
                    if i < first_token + n:
                        await asyncio.sleep(itl)
                        sent_tokens += 1
                    await resp.write(chunks[i])
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            self.generation_tokens += sent_tokens
            self._count("disconnected")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return resp
        self._finished(prompt_tokens, n, "length" if truncated else "stop")
        self._count("200")
        return resp

    # -- responses, tool calls, JSON, embeddings (engines/sim_surface.py builds the bodies) -------

    def _usage(self, prompt_tokens: int, n: int, cached: int | None) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                 "total_tokens": prompt_tokens + n}
        if cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    def _cached(self, body: dict[str, Any], chat: bool) -> int | None:
        """Prompt tokens served from the prefix cache; None unless --enable-prompt-tokens-details
        (vLLM reports no details without it). Chat: earlier messages seen before."""
        if not self.cfg.prompt_tokens_details:
            return None
        if not chat:
            return 0
        msgs = body["messages"]
        return self.cache.lookup(msgs, [_chat_prompt([m])[1] for m in msgs])

    def _parse_responses(self, raw: bytes) -> tuple[dict[str, Any], str, int, int, bool]:
        body = self._json(raw)
        self._check_model(body)
        if body.get("previous_response_id") is not None:
            raise _Refused(400, "previous_response_id is not supported by this simulator (it stores nothing)",
                           "invalid_request_error", "previous_response_id")
        items, texts, _ = surface.responses_prompt(body)
        if not items:
            raise _Refused(400, "`input` must be a string or a non-empty list of items", "invalid_request_error",
                           "input")
        prompt_tokens = sum(len(t.split()) + 3 for t in texts)
        max_tokens = body.get("max_output_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise _Refused(400, "max_output_tokens must be an integer >= 1", "invalid_request_error",
                           "max_output_tokens")
        n = min(self.cfg.output_tokens, max_tokens or self.cfg.output_tokens)
        return body, "\n".join(texts), prompt_tokens, n, n < self.cfg.output_tokens

    def _parse_embeddings(self, raw: bytes) -> tuple[dict[str, Any], str, int, int, bool]:
        body = self._json(raw)
        self._check_model(body)
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else inp if isinstance(inp, list) else None
        if not texts:
            raise _Refused(400, "`input` must be a string or a non-empty list", "invalid_request_error", "input")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in texts):
            texts = [" ".join(map(str, texts))]
        texts = [" ".join(map(str, t)) if isinstance(t, list) else t for t in texts]
        if not all(isinstance(t, str) for t in texts):
            raise _Refused(400, "`input` items must be strings or token id lists", "invalid_request_error", "input")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)
                                 or not 1 <= dims <= self.cfg.embedding_dim):
            raise _Refused(400, f"dimensions must be an integer from 1 to {self.cfg.embedding_dim}",
                           "invalid_request_error", "dimensions")
        if body.get("encoding_format", "float") not in ("float", "base64", None):
            raise _Refused(400, "encoding_format must be float or base64", "invalid_request_error",
                           "encoding_format")
        tokens = sum(max(1, len(t.split())) for t in texts)
        if any(len(t.split()) > self.cfg.max_model_len for t in texts):
            raise _Refused(400, f"This model's maximum context length is {self.cfg.max_model_len} tokens.",
                           "invalid_request_error", "input")
        body["input"] = texts
        return body, "", tokens, 0, False

    def _json(self, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Refused(400, f"Request body is not valid JSON: {exc}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise _Refused(400, "Request body must be a JSON object", "invalid_request_error")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.cfg.model:
            raise _Refused(404, f"The model `{model}` does not exist.", "invalid_request_error",
                           "model", "model_not_found")

    async def _embed(self, body: dict[str, Any], prompt_tokens: int) -> web.Response:
        delay = self.ttft_s()
        if delay > 0:
            await asyncio.sleep(delay)
        dims = body.get("dimensions")
        base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(body["input"]):
            v = surface.embedding(text, self.cfg.embedding_dim)
            if dims:
                v = surface.truncate(v, dims)
            data.append({"object": "embedding", "index": i, "embedding": surface.encode_base64(v) if base64 else v})
        out = {"object": "list", "model": self.cfg.model, "data": data,
               "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
        self.prompt_tokens += prompt_tokens
        self.success["stop"] += 1
        self._count("200")
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    def _structured(self, body: dict[str, Any], seed_text: str, n: int,
                    last_role: str | None) -> tuple[dict[str, Any] | None, str, list[str]]:
        """(the function called or None, the answer text, its pieces as streamed) of a request with
        tools or a JSON schema; a plain request gets its usual words."""
        call = surface.wants_tool_call(body, last_role)
        rng = surface.seeded(seed_text)
        if call is not None:
            text = orjson.dumps(surface.value_for(call["parameters"], rng)).decode()
            return call, text, surface.split_pieces(text, n)
        schema = surface.json_schema_of(body)
        if schema is not None:
            text = orjson.dumps(surface.value_for(schema, rng)).decode()
            return None, text, surface.split_pieces(text, n)
        words = completion_text(seed_text, n).split(" ")
        return None, " ".join(words), [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def _chat_structured(self, request: web.Request, body: dict[str, Any], seed_text: str,
                               prompt_tokens: int, n: int, stream: bool) -> web.StreamResponse:
        """Chat with tools or a response_format: a tool call (finish_reason tool_calls) or JSON text."""
        call, text, pieces = self._structured(body, seed_text, n, _last_role(body))
        cached = self._cached(body, True)
        n = len(pieces)
        finish = "tool_calls" if call else "stop"
        cid, created = self._next_id("chatcmpl"), int(time.time())
        tool_id = "call_" + hashlib_hex(seed_text)
        if not stream:
            await asyncio.sleep(self.ttft_s() + max(n - 1, 0) * self.itl_s())
            msg: dict[str, Any] = {"role": "assistant", "content": None if call else text, "refusal": None}
            if call:
                msg["tool_calls"] = [{"id": tool_id, "type": "function",
                                      "function": {"name": call["name"], "arguments": text}}]
            out = {"id": cid, "object": "chat.completion", "created": created, "model": self.cfg.model,
                   "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
                   "usage": self._usage(prompt_tokens, n, cached)}
            self._finished(prompt_tokens, n, "stop")
            self._count("200")
            return web.Response(body=orjson.dumps(out), content_type="application/json")

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.cfg.model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                   **extra}
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        chunks = [chunk({"role": "assistant", "content": None if call else ""})]
        for i, piece in enumerate(pieces):
            if call:
                tc: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
                if i == 0:
                    tc.update(id=tool_id, type="function")
                    tc["function"]["name"] = call["name"]
                chunks.append(chunk({"tool_calls": [tc]}))
            else:
                chunks.append(chunk({"content": piece}))
        chunks.append(chunk({}, finish))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.cfg.model,
                   "choices": [], "usage": self._usage(prompt_tokens, n, cached)}
            chunks.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return await self._send(request, chunks, 1, n, prompt_tokens)

    async def _respond(self, request: web.Request, body: dict[str, Any], seed_text: str, prompt_tokens: int,
                       n: int, truncated: bool, stream: bool) -> web.StreamResponse:
        """POST /v1/responses, stateless (store: false), as vLLM serves it."""
        items, texts, last_role = surface.responses_prompt(body)
        call, text, pieces = self._structured(body, seed_text, n, last_role)
        n = len(pieces)
        cached = (self.cache.lookup(items, [len(t.split()) + 3 for t in texts])
                  if self.cfg.prompt_tokens_details else 0)
        usage = surface.response_usage(prompt_tokens, cached, n)
        rid, item_id = self._next_id("resp"), self._next_id("fc" if call else "msg")
        call_ref = {"name": call["name"], "call_id": "call_" + hashlib_hex(seed_text)} if call else None
        base = surface.response_object(rid, self.cfg.model, body, "in_progress", [], None, int(time.time()))
        if not stream:
            await asyncio.sleep(self.ttft_s() + max(n - 1, 0) * self.itl_s())
            if call_ref:
                item = surface.call_item(item_id, call_ref["call_id"], call_ref["name"], text, "completed")
            else:
                item = surface.message_item(item_id, text, "completed")
            out = {**base, "status": "completed", "output": [item], "usage": usage,
                   "completed_at": int(time.time())}
            self._finished(prompt_tokens, n, "length" if truncated else "stop")
            self._count("200")
            return web.Response(body=orjson.dumps(out), content_type="application/json")
        events = surface.sse(surface.response_events(base, item_id, pieces, call_ref, usage))
        # created, in_progress, item added (and its content part) go out at once; the first delta at TTFT
        head = 3 if call_ref else 4
        return await self._send(request, events, head, n, prompt_tokens)

    async def _send(self, request: web.Request, chunks: list[bytes], first_token: int, n: int,
                    prompt_tokens: int) -> web.StreamResponse:
        """Stream prepared chunks: chunks[:first_token] at once, chunks[first_token:first_token + n]
        are tokens (the first at TTFT, then one per ITL), the rest after the last. The reset fault
        aborts the connection after `reset_after` chunks."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        reset_after = self.fault.reset_after if self.fault.mode == "reset" else -1
        sent_tokens = 0
        try:
            await resp.prepare(request)
            ttft, itl = self.ttft_s(), self.itl_s()
            for i, chunk in enumerate(chunks):
                if i == reset_after:
                    self.generation_tokens += sent_tokens
                    self._count("reset")
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if i == first_token and ttft > 0:
                    await asyncio.sleep(ttft)
                elif first_token < i < first_token + n and itl > 0:
                    await asyncio.sleep(itl)
                if first_token <= i < first_token + n:
                    sent_tokens += 1
                await resp.write(chunk)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            self.generation_tokens += sent_tokens
            self._count("disconnected")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return resp
        self._finished(prompt_tokens, n, "stop")
        self._count("200")
        return resp

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False, api="responses")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False, api="embeddings")

    def _finished(self, prompt_tokens: int, n: int, finish: str) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += n
        self.success[finish] += 1

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.cfg.model, "object": "model", "created": self.created, "owned_by": ENGINE,
                "root": self.cfg.model, "parent": None, "max_model_len": self.cfg.max_model_len}
        return web.Response(body=orjson.dumps({"object": "list", "data": [card]}), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.fault.unhealthy else 200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": _version(), "engine": ENGINE})

    async def metrics(self, request: web.Request) -> web.Response:
        lab = self._label
        usage = self.running / self.cfg.max_concurrency
        text = (
            f"# HELP vllm:num_requests_running Number of requests in model execution batches (simulated by {ENGINE}).\n"
            f"# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{lab}}} {self.running}\n"
            f"# HELP vllm:num_requests_waiting Number of requests waiting to be processed (simulated).\n"
            f"# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{lab}}} {self.waiting}\n"
            f"# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage, 1 means 100 percent (simulated: running/max).\n"
            f"# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f"vllm:gpu_cache_usage_perc{{{lab}}} {usage}\n"
            f"# HELP vllm:kv_cache_usage_perc KV-cache usage, 1 means 100 percent (simulated: running/max).\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{lab}}} {usage}\n"
            f"# HELP vllm:prompt_tokens_total Number of prefill tokens processed (simulated).\n"
            f"# TYPE vllm:prompt_tokens_total counter\n"
            f"vllm:prompt_tokens_total{{{lab}}} {float(self.prompt_tokens)}\n"
            f"# HELP vllm:generation_tokens_total Number of generation tokens processed (simulated).\n"
            f"# TYPE vllm:generation_tokens_total counter\n"
            f"vllm:generation_tokens_total{{{lab}}} {float(self.generation_tokens)}\n"
            f"# HELP vllm:request_success_total Count of successfully processed requests (simulated).\n"
            f"# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{finished_reason="stop",{lab}}} {float(self.success["stop"])}\n'
            f'vllm:request_success_total{{finished_reason="length",{lab}}} {float(self.success["length"])}\n'
            f"# HELP infermesh_sim_info This worker is the infermesh simulator, not a model.\n"
            f"# TYPE infermesh_sim_info gauge\n"
            f'infermesh_sim_info{{engine="{ENGINE}",{lab}}} 1.0\n'
        )
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.fault_state()), content_type="application/json")

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _error_response(400, f"Request body is not valid JSON: {exc}", "invalid_request_error", None, None)
        try:
            seed = self.fault.update(body)
        except ValueError as exc:
            return _error_response(400, str(exc), "invalid_request_error", None, None)
        if seed is not None:
            self.rng.seed(seed)
        return await self.get_faults(request)

    async def delete_faults(self, request: web.Request) -> web.Response:
        self.fault = dataclasses.replace(self.start_fault)
        self.rng.seed(self.cfg.seed)
        return await self.get_faults(request)

    async def stats(self, request: web.Request) -> web.Response:
        body = {"engine": ENGINE, "model": self.cfg.model, "requests": sum(self.outcomes.values()),
                "by_status": dict(self.outcomes), "running": self.running, "waiting": self.waiting,
                "hanging": self.hanging, "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens}
        return web.Response(body=orjson.dumps(body), content_type="application/json")


def _last_role(body: dict[str, Any]) -> str | None:
    msgs = body.get("messages")
    return msgs[-1].get("role") if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else None


def hashlib_hex(text: str) -> str:
    return format(zlib.crc32(text.encode("utf-8", "surrogatepass")), "08x")


def _abort(request: web.Request) -> web.Response:
    """Drop the connection without a response (the client sees a reset, not an answer)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response(status=499)  # never sent: aiohttp finds the transport closed


def _chat_prompt(messages: Any) -> tuple[str, int]:
    if not isinstance(messages, list) or not messages:
        raise _Refused(400, "`messages` must be a non-empty list of messages", "invalid_request_error", "messages")
    texts: list[str] = []
    tokens = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _Refused(400, f"messages[{i}] must be an object with a `role`", "invalid_request_error",
                           f"messages[{i}]")
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = " ".join(p["text"] for p in content
                            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        elif content is None:
            text = ""
        else:
            raise _Refused(400, f"messages[{i}].content must be a string, a list of parts or null",
                           "invalid_request_error", f"messages[{i}].content")
        texts.append(text)
        tokens += len(text.split()) + 3
    return "\n".join(texts), tokens


def _completion_prompt(prompt: Any) -> tuple[str, int]:
    # A string; a list of token ids; or a list of strings (taken as one prompt, joined).
    if isinstance(prompt, str):
        return prompt, len(prompt.split())
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return " ".join(map(str, prompt)), len(prompt)
        if all(isinstance(t, str) for t in prompt):
            text = "\n".join(prompt)
            return text, len(text.split())
    raise _Refused(400, "`prompt` must be a string, a list of strings or a list of token ids",
                   "invalid_request_error", "prompt")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("infermesh")
    except Exception:
        return "0.0.0"


def make_app(cfg: SimConfig) -> web.Application:
    """The simulator as an aiohttp application (run it with handler_cancellation=True, as main() does)."""
    sim = _Sim(cfg)
    app = web.Application()
    app["sim"] = sim
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/health", sim.health)
    app.router.add_get("/version", sim.version)
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_get("/sim/faults", sim.get_faults)
    app.router.add_post("/sim/faults", sim.post_faults)
    app.router.add_delete("/sim/faults", sim.delete_faults)
    app.router.add_get("/sim/stats", sim.stats)
    return app


def _ssl_context(cfg: SimConfig):  # noqa: ANN202
    """TLS as vLLM's uvicorn serves it from the same four options (None: plain HTTP)."""
    if not cfg.ssl_certfile:
        return None
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
    if cfg.ssl_ca_certs:
        ctx.load_verify_locations(cafile=cfg.ssl_ca_certs)
    ctx.verify_mode = ssl.VerifyMode(cfg.ssl_cert_reqs)
    return ctx


async def serve(cfg: SimConfig, shutdown_timeout: float = 0.5) -> None:
    """Serve until SIGTERM or SIGINT; in-flight requests get `shutdown_timeout` seconds, then are cut."""
    runner = web.AppRunner(make_app(cfg), access_log=None, handler_cancellation=True,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=_ssl_context(cfg))
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else cfg.port
    scheme = "https" if cfg.ssl_certfile else "http"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sim worker (simulator) serving {cfg.model} on {scheme}://{cfg.host}:{port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> SimConfig:
    p = argparse.ArgumentParser(
        prog="python -m engines.sim",
        description="infermesh `sim` engine: a SIMULATOR speaking vLLM's OpenAI-compatible API. It runs no model: "
                    "answers are deterministic filler words, timed by the knobs below. For demos, drills and "
                    "load tests on machines without a GPU. Faults switch at run time through /sim/faults.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9101, help="0 picks a free port (printed in the start line)")
    p.add_argument("--model", default="demo-chat", help="the model id served (default: %(default)s)")
    p.add_argument("--ttft-ms", type=_non_negative, default=30.0, help="time to first token (default: %(default)s)")
    p.add_argument("--itl-ms", type=_non_negative, default=5.0, help="inter-token latency (default: %(default)s)")
    p.add_argument("--output-tokens", type=_positive_int, default=16,
                   help="tokens per answer unless max_tokens is smaller (default: %(default)s)")
    p.add_argument("--error-rate", type=_share, default=0.0, help="share of requests answered 500 (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the error draws, for repeatable runs")
    p.add_argument("--max-concurrency", type=_positive_int, default=64,
                   help="requests generated at once; more wait in a queue (default: %(default)s)")
    p.add_argument("--max-model-len", type=_positive_int, default=8192, help="context length (default: %(default)s)")
    p.add_argument("--embedding-dim", type=int, default=0,
                   help="serve an embedding model: vectors of this size, /v1/embeddings only (default: chat)")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="report usage.prompt_tokens_details.cached_tokens (as vLLM's flag of that name)")
    p.add_argument("--ssl-keyfile", default=None, help="serve TLS with this key (as vLLM)")
    p.add_argument("--ssl-certfile", default=None, help="serve TLS with this certificate (as vLLM)")
    p.add_argument("--ssl-ca-certs", default=None, help="CA certificates that client certificates must chain to")
    p.add_argument("--ssl-cert-reqs", type=int, choices=(0, 1, 2), default=0,
                   help="client certificate: 0 none, 1 optional, 2 required (as vLLM; default: 0)")
    p.add_argument("--fault", choices=FAULT_MODES, default="none", help="fault mode at start (default: none)")
    p.add_argument("--unhealthy", action="store_true", help="start with /health answering 503")
    p.add_argument("--slow-factor", type=float, default=10.0, help="TTFT multiplier of the slow fault (default: 10)")
    p.add_argument("--reset-after", type=int, default=2,
                   help="chunks a stream sends before the reset fault aborts it (default: 2)")
    a = p.parse_args(argv)
    fault = Fault(mode=a.fault, unhealthy=a.unhealthy, slow_factor=a.slow_factor, reset_after=a.reset_after)
    try:
        fault.validate()
    except ValueError as exc:
        p.error(str(exc))
    if bool(a.ssl_certfile) != bool(a.ssl_keyfile) or (a.ssl_cert_reqs and not a.ssl_ca_certs):
        p.error("TLS needs --ssl-certfile and --ssl-keyfile together, and --ssl-ca-certs with --ssl-cert-reqs")
    return SimConfig(model=a.model, host=a.host, port=a.port, ttft_ms=a.ttft_ms, itl_ms=a.itl_ms,
                     output_tokens=a.output_tokens, error_rate=a.error_rate, seed=a.seed,
                     max_concurrency=a.max_concurrency, max_model_len=a.max_model_len,
                     embedding_dim=max(0, a.embedding_dim), prompt_tokens_details=a.enable_prompt_tokens_details,
                     fault=fault, ssl_keyfile=a.ssl_keyfile, ssl_certfile=a.ssl_certfile,
                     ssl_ca_certs=a.ssl_ca_certs, ssl_cert_reqs=a.ssl_cert_reqs)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))


if __name__ == "__main__":
    main()
