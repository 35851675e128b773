"""uvicorn's server, with a listener that takes every waiting connection each time it looks.

libuv (under uvloop) accepts one connection per turn of the event loop since libuv 1.45
(libuv/libuv#3696: "don't accept() connections in a loop"), relying on the listening socket
staying readable. On an idle loop a turn takes microseconds and nobody notices. On a busy
gateway a turn takes tens of milliseconds (every ready stream is relayed in it), so it accepts
a few dozen connections a second: in bench/ S3, 1,000 clients connecting at once waited up to
22 s for their first token, and a health check on a new connection timed out, while requests
on open connections were served in 0.2 s. (`strace -e accept4,epoll_pwait` on the gateway
shows exactly one accept4 per epoll_pwait.)

So the gateway listens itself: when a listening socket is readable it accepts up to
ACCEPT_BURST waiting connections at once (as Python's own event loop does, and nginx with
``multi_accept on``), and hands each to uvicorn's HTTP protocol through
``loop.connect_accepted_socket``. Everything else is uvicorn's: the protocol, keep-alive,
lifespan, signals and the graceful shutdown, which first stops this listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence

import uvicorn

log = logging.getLogger("infermesh.gateway")


class BurstListener:
    """Accepts every waiting connection (up to BURST) each time the listening socket is
    readable, and hands each to ``loop.connect_accepted_socket`` with ``protocol_factory``.
    Also used by the benchmark's fake upstream and relay (bench/), which have the same need."""

    BURST = 512
    RETRY_S = 1.0                  # after EMFILE and the like: listen again this much later

    def __init__(self, sock: socket.socket, protocol_factory) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.accepted = 0
        self.closed = False
        self.started = False
        self._connecting: set[asyncio.Task] = set()   # the loop keeps only weak references to tasks

    def start(self) -> None:
        self.started = True
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if not self.closed:
            if self.started and self.sock.fileno() >= 0:
                # connections already in the kernel's queue would be reset with the socket: take them
                # (a draining server answers each request on them with Connection: close)
                self._accept()
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.BURST):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:                # out of file descriptors or buffers: let them free up
                log.warning("accept failed (%s); listening again in %.0f s", type(e).__name__, self.RETRY_S)
                loop.remove_reader(self.sock.fileno())
                loop.call_later(self.RETRY_S, self._listen_again)
                return
            self.accepted += 1
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._connect(loop, conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(self.protocol_factory, conn)
        except OSError:                         # the client left before the handshake finished
            conn.close()

    def _listen_again(self) -> None:
        if not self.closed:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)


class Server(uvicorn.Server):
    """uvicorn's server on BurstListeners instead of its own listener.

    ``gated`` sockets (bound, not yet listening) listen only once ``ready()`` is true: a replica
    joins the SO_REUSEPORT group of the shared port only when it can serve, so the kernel sends
    a replica that has no key set (gateway/state/pg_keys.py) no connection at all."""

    GATE_POLL_S = 0.1

    def __init__(self, config: uvicorn.Config, listeners: list[socket.socket],
                 gated: Sequence[socket.socket] = (), ready: Callable[[], bool] | None = None) -> None:
        super().__init__(config)
        self.listeners = [BurstListener(sock, self._protocol) for sock in listeners]
        self.gated = [BurstListener(sock, self._protocol) for sock in gated]
        self.ready = ready or (lambda: True)
        self._gate: asyncio.Task | None = None

    @property
    def accepted(self) -> int:
        return sum(li.accepted for li in self.listeners)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])      # lifespan and state; no listener of uvicorn's own
        for li in self.listeners:
            li.start()
        if self.gated:
            self._gate = asyncio.create_task(self._open_gated())

    async def _open_gated(self) -> None:
        if not self.ready():
            log.warning("not ready: the shared port is joined once a key set is loaded")
            while not self.ready():
                await asyncio.sleep(self.GATE_POLL_S)
            log.warning("ready: joining the shared port")
        for li in self.gated:
            if not li.closed:
                li.sock.listen(2048)
                li.start()
                self.listeners.append(li)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.server_state.draining = True  # type: ignore[attr-defined]  # ours: gateway/door.py drains on it
        if self._gate is not None:
            self._gate.cancel()
        for li in [*self.listeners, *self.gated]:     # stop accepting first, as uvicorn does
            li.close()
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:
        config = self.config
        make: Callable[..., asyncio.Protocol] = config.http_protocol_class     # uvicorn's types say no arguments
        return make(config=config, server_state=self.server_state, app_state=self.lifespan.state)
