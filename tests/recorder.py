"""A scripted upstream for tests: records every request body it receives and answers like a
vLLM worker, with streams it can hold between chunks. Runs an aiohttp server in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from aiohttp import web


class Recorder:
    def __init__(self, model: str = "demo-chat") -> None:
        self.model = model
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []        # the Authorization header of each completion request
        self.peers: list[int] = []              # the caller's port for each completion request (its connection)
        self.release = threading.Event()      # streams pause after their first chunk until set
        self.release.set()
        self.together = False                 # streams send everything after the first chunk in one write
        self.tail_s = 0.0                     # streams end their body this long after [DONE]
        self.hold_whole = False               # non-stream answers also wait for `release`
        self.error_event = False              # streams end with an error event after their first chunk
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    @staticmethod
    async def _health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                               "created": 0, "owned_by": "recorder"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("authorization"))
        self.peers.append(request.transport.get_extra_info("peername")[1])
        base = {"id": "chatcmpl-rec", "created": int(time.time()), "model": body["model"]}
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if not body.get("stream"):
            while self.hold_whole and not self.release.is_set():
                await asyncio.sleep(0.01)
            return web.json_response({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok ok"}, "finish_reason": "stop"}]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            c = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(c).encode() + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": "ok"}))
        if self.error_event:
            await resp.write(b'data: {"error": {"message": "CUDA error: an illegal memory access", '
                             b'"type": "server_error", "code": 500}}\n\n')
            return resp
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        rest = [chunk({"content": " ok"}, "stop")]
        if (body.get("stream_options") or {}).get("include_usage"):
            u = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            rest.append(b"data: " + json.dumps(u).encode() + b"\n\n")
        rest.append(b"data: [DONE]\n\n")
        for piece in [b"".join(rest)] if self.together else rest:
            await resp.write(piece)
        if self.tail_s:
            await asyncio.sleep(self.tail_s)    # the chunked terminator comes later (write_eof on return)
        return resp

    def close(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
