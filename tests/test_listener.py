"""The gateway's own listener (gateway/listener.py): on a busy event loop, connections waiting
to be accepted are taken in bursts, not one per turn of the loop as libuv does since 1.45.
Counted in turns of the loop, not timed: each turn here is made long (5 ms) the way a busy
gateway's are, and 100 clients connect at once."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from gateway.listener import Server


async def _hello(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class BusyServer(Server):
    """Every turn of its loop takes 5 ms; `turns` records (turn, connections accepted so far)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.turns: list[tuple[int, int]] = []

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.turns.append((len(self.turns), self.accepted))
            time.sleep(0.005)
            if not self.should_exit:
                loop.call_soon(tick)            # runs in the next turn of the loop
        loop.call_soon(tick)


def _turns_to_accept_100(burst: int) -> int:
    """Turns of a busy loop between the first and the hundredth accepted connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2048)
    port = listener.getsockname()[1]
    config = uvicorn.Config(_hello, loop="uvloop", http="httptools", lifespan="off", log_config=None,
                            access_log=False)
    server = BusyServer(config, listeners=[listener])
    server.listeners[0].BURST = burst
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while not server.turns and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(100):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            clients.append(c)
        for c in clients:                       # every client is answered
            assert c.recv(1024).startswith(b"HTTP/1.1 200"), "no answer"
        first = next(t for t, n in server.turns if n > 0)
        last = next(t for t, n in server.turns if n >= 100)
    finally:
        for c in clients:
            c.close()
        server.should_exit = True
        thread.join(10)
    assert listener.fileno() == -1, "the listener was not closed at shutdown"
    return last - first


def test_a_busy_loop_accepts_waiting_connections_in_bursts():
    turns = _turns_to_accept_100(burst=512)
    assert turns <= 10, f"100 connections took {turns} turns of the loop to accept"
    # a burst of one is libuv's way since 1.45: a turn per connection
    assert _turns_to_accept_100(burst=1) >= 90
