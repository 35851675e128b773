"""A minimal fake OpenAI-compatible upstream for streaming at scale (S3): raw asyncio protocol on uvloop.

    python bench/fakeup.py --port P [--model demo-mini] [--ttft-ms 0] [--itl-ms 20] [--output-tokens 64]

Why not `engines.sim` for S3: the harness shares one core between the upstream and the load
client, and 1,000 streams at 50 tokens/s are 50,000 SSE events a second. The sim (aiohttp,
one task and one `asyncio.sleep` per token) reaches about a fifth of that on a shared core,
so S3 would measure the harness. Here each token is one timer callback and one
`transport.write` (a few microseconds), so the upstream keeps its schedule and the gateway is
what is measured. The wire format is the sim's: chat.completion.chunk events (role chunk, one
event per token, the finish chunk, a usage chunk, ``[DONE]``), chunked transfer encoding,
keep-alive. It serves POST /v1/chat/completions (stream or not), GET /health, GET /v1/models;
anything else is a 404. Not a simulator of vLLM: a benchmark fixture only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.listener import BurstListener  # noqa: E402  (after the path is set)

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

WORDS = [b"the", b"mesh", b"routes", b"tokens", b"through", b"a", b"fake", b"upstream"]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server:
    def __init__(self, model: str, ttft: float, itl: float, tokens: int) -> None:
        self.model = model.encode()
        self.ttft, self.itl, self.tokens = ttft, itl, tokens
        self.seq = 0


class Conn(asyncio.Protocol):
    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.buf = bytearray()
        self.transport = None
        self.busy = False
        self.timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end])
        lower = head.lower()
        length = 0
        i = lower.find(b"content-length:")
        if i >= 0:
            j = lower.find(b"\r\n", i)
            length = int(lower[i + 15:j if j >= 0 else None])
        if len(buf) < end + 4 + length:
            return
        body = bytes(buf[end + 4:end + 4 + length])
        del buf[:end + 4 + length]
        line = head.split(b"\r\n", 1)[0].split()
        method, path = line[0], line[1]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            self._chat(body)
        elif path == b"/health":
            self._plain(200, b'{"status":"ok"}')
        elif path.startswith(b"/v1/models"):
            self._plain(200, b'{"object":"list","data":[{"id":"' + self.srv.model
                        + b'","object":"model","created":0,"owned_by":"bench-fake"}]}')
        else:
            self._plain(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')

    def _plain(self, status: int, body: bytes) -> None:
        reason = b"OK" if status == 200 else b"Not Found"
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, reason, len(body), body))
        if self.buf:
            self._next()

    def _chat(self, body: bytes) -> None:
        srv = self.srv
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._plain(404, b'{"error":{"message":"bad json","type":"invalid_request_error"}}')
            return
        n = srv.tokens
        mt = req.get("max_tokens") or req.get("max_completion_tokens")
        if isinstance(mt, int) and mt > 0:
            n = min(n, mt)
        srv.seq += 1
        cid = b"chatcmpl-fake%d" % srv.seq
        created = b"%d" % int(time.time())
        head = (b'{"id":"' + cid + b'","object":"chat.completion.chunk","created":' + created
                + b',"model":"' + srv.model + b'","choices":[{"index":0,')
        usage = b'{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}' % (n, n + 12)
        if not req.get("stream"):
            text = b" ".join(WORDS[i % len(WORDS)] for i in range(n))
            doc = (b'{"id":"' + cid + b'","object":"chat.completion","created":' + created + b',"model":"'
                   + srv.model + b'","choices":[{"index":0,"message":{"role":"assistant","content":"' + text
                   + b'"},"logprobs":null,"finish_reason":"stop"}],"usage":' + usage + b"}")
            self._plain(200, doc)
            return
        self.busy = True
        events = [b"data: " + head
                  + b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n']
        for i in range(n):
            word = WORDS[i % len(WORDS)]
            events.append(b"data: " + head + b'"delta":{"content":"' + (b" " + word if i else word)
                          + b'"},"logprobs":null,"finish_reason":null}]}\n\n')
        tail = (b"data: " + head + b'"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
                + b'data: {"id":"' + cid + b'","object":"chat.completion.chunk","created":' + created
                + b',"model":"' + srv.model + b'","choices":[],"usage":' + usage + b"}\n\n"
                + b"data: [DONE]\n\n")
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        self.events, self.tail, self.i = events, tail, 0
        loop = asyncio.get_running_loop()
        self.t0 = loop.time() + srv.ttft
        if srv.ttft > 0:
            self.timer = loop.call_at(self.t0, self._tick)
        else:
            self._tick()

    def _tick(self) -> None:
        self.timer = None
        t = self.transport
        if t is None:
            return
        srv = self.srv
        ev = self.events
        if self.i == 0:                       # role chunk and first token leave together
            t.write(chunk(ev[0] + ev[1]))
            self.i = 2
        elif self.i < len(ev):
            t.write(chunk(ev[self.i]))
            self.i += 1
        if self.i >= len(ev):
            t.write(chunk(self.tail) + b"0\r\n\r\n")
            self.busy = False
            self.events = None
            if self.buf:
                self._next()
            return
        if srv.itl <= 0:
            self._tick_all()
            return
        loop = asyncio.get_running_loop()
        # keep the schedule: the k-th token is due at t0 + (k-1) * itl, whatever the loop's lag
        self.timer = loop.call_at(self.t0 + (self.i - 1) * srv.itl, self._tick)

    def _tick_all(self) -> None:
        t = self.transport
        t.write(chunk(b"".join(self.events[self.i:]) + self.tail) + b"0\r\n\r\n")
        self.busy = False
        self.events = None
        if self.buf:
            self._next()


async def serve(args) -> None:
    loop = asyncio.get_running_loop()
    srv = Server(args.model, args.ttft_ms / 1000, args.itl_ms / 1000, args.output_tokens)
    sock = socket.create_server((args.host, args.port), backlog=4096)
    if args.ssl_certfile:    # mutual TLS as a worker serves it (bench/run.py --channel): vLLM's option names
        from fleet.channel import server_context
        ctx = server_context(Path(args.ssl_certfile), Path(args.ssl_keyfile), Path(args.ssl_ca_certs))
        server = await loop.create_server(lambda: Conn(srv), sock=sock, ssl=ctx, backlog=4096)
    else:
        server = BurstListener(sock, lambda: Conn(srv))    # libuv alone accepts one connection per loop turn
        server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench fake upstream on http://{args.host}:{args.port} model={args.model}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="demo-mini")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--ssl-certfile")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--ssl-ca-certs", help="client certificates are required and must chain to these")
    args = p.parse_args(argv)
    if uvloop is not None:
        uvloop.install()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
