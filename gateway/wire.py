"""The two hot routes on raw ASGI: a request's few headers and body in, a reply out.

`/v1/chat/completions` and `/v1/completions` carry nearly all of the gateway's traffic. They
skip Starlette's Request, Response and StreamingResponse (and FastAPI's middleware): reading
three headers from the ASGI scope and sending two or three ASGI messages directly cost a
fraction of what building those objects did (bench/README.md has the before and after). Every
other route is served by FastAPI as usual.

A streamed reply watches for the client leaving (the ASGI ``http.disconnect`` message) and
then closes the relay, which meters the stream as 499 and releases the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

_WANTED = {b"authorization": "authorization", b"x-request-id": "x-request-id",
           b"content-length": "content-length", b"x-forwarded-for": "x-forwarded-for",
           b"x-infermesh-region": "x-infermesh-region"}    # the request's region (gateway/proxy.request_region)
_JSON_TYPE = (b"content-type", b"application/json")
_SSE_TYPE = (b"content-type", b"text/event-stream; charset=utf-8")


class ClientGone(Exception):
    """The client disconnected before its request body had arrived."""


class Incoming:
    """The parts of a request the hot path reads: a few headers, the peer's address and the body."""

    __slots__ = ("headers", "client", "_receive")

    def __init__(self, scope: dict[str, Any], receive) -> None:
        client = scope.get("client")
        self.client: str = client[0] if client else ""
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = _WANTED.get(name)
            if key is not None:
                headers[key] = value.decode("latin-1")
        self.headers = headers
        self._receive = receive

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone()
            body = msg.get("body", b"")
            if body:
                yield body
            if not msg.get("more_body", False):
                return

    async def body(self) -> bytes:
        msg = await self._receive()        # the common case: the whole body in one message
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        if not msg.get("more_body", False):
            return msg.get("body", b"")
        parts = [msg.get("body", b"")]
        async for chunk in self.chunks():
            parts.append(chunk)
        return b"".join(parts)


@dataclass(slots=True)
class Reply:
    """A whole JSON body, or an SSE stream (``stream`` set)."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None


def _header_list(headers: dict[str, str], content_type: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    out = [content_type]
    for name, value in headers.items():
        if name != "content-type":
            out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out


async def send_reply(reply: Reply, receive, send) -> None:
    if reply.stream is None:
        headers = _header_list(reply.headers, _JSON_TYPE)
        headers.append((b"content-length", b"%d" % len(reply.body)))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        return
    await _send_stream(reply, reply.stream, receive, send)


async def _send_stream(reply: Reply, stream: AsyncGenerator[bytes, None], receive, send) -> None:
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": _header_list(reply.headers, _SSE_TYPE)})
        async for chunk in stream:
            if gone.done():
                return                      # the relay is closed below: metered as 499
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        gone.cancel()
        await stream.aclose()


async def _disconnected(receive) -> None:
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass
