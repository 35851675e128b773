"""The floor for S3: a byte-for-byte TCP relay in Python on uvloop, with no HTTP in it at all.

    python bench/passthru.py --port P --upstream-port U

Each client connection gets one upstream connection; whatever arrives on one side is written
to the other in the same callback (``data_received`` -> ``transport.write``). No parsing, no
auth, no metering, no coroutine per event. It is not a gateway and must never be deployed: it
is what *any* Python relay on this event loop pays per relayed event (the upstream's `recv`,
the client's `send`, the epoll wake-up and one Python call), so S3 can say how much of the
gateway's cost per event is the gateway's own and how much no Python relay avoids.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.listener import BurstListener  # noqa: E402  (after the path is set)


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    upstream_port = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.early: list[bytes] | None = []        # bytes that came before the upstream connected

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.upstream = await loop.create_connection(lambda: Upstream(self), "127.0.0.1",
                                                            self.upstream_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None:                  # the client left while we connected
            self.upstream.transport.close()
            return
        for data in self.early:
            self.upstream.transport.write(data)
        self.early = None

    def data_received(self, data: bytes) -> None:
        if self.early is not None:
            self.early.append(data)
        elif self.upstream.transport is not None:
            self.upstream.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int) -> None:
    server = BurstListener(socket.create_server(("127.0.0.1", port), backlog=4096), Client)   # as the gateway
    server.start()
    await asyncio.Event().wait()               # until SIGTERM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    Client.upstream_port = args.upstream_port
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
