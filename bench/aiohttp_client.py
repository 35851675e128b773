"""The upstream client's own cost per request: aiohttp as the gateway configures it, against
aiohttp's defaults, side by side in one run.

    .venv/bin/python bench/aiohttp_client.py [--requests 12000] [--rounds 4]

Non-stream requests at concurrency 16 to the S3 fake upstream (bench/fakeup.py, 8 tokens) on
core 1; the client runs on core 0 and reports its CPU time per request (process_time), in
alternating rounds so that drift on a shared machine hits both alike.

- defaults: a string URL (parsed by aiohttp on every request), the default cookie jar
  (filtered on every request), a ClientTimeout with a total per request (a timer per request).
- gateway: the endpoint's URL parsed once (`Endpoint.routes`), `DummyCookieJar` (workers set no
  cookies), one cached ClientTimeout without a total: the attempt's own asyncio deadline covers
  the request and its body (gateway/proxy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import uvloop
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import BENCH, PY, REPO, free_port, wait_http  # noqa: E402  (after the path is set)

BODY = json.dumps({"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"content-type": "application/json"}


async def one_round(url_text: str, gateway_way: bool, n: int, concurrency: int = 16) -> float:
    kw: dict = dict(auto_decompress=False, skip_auto_headers=("User-Agent",))
    if gateway_way:
        kw["cookie_jar"] = aiohttp.DummyCookieJar()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), **kw)
    url = URL(url_text) if gateway_way else url_text
    fixed = aiohttp.ClientTimeout(total=None, sock_connect=5)
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            timeout = fixed if gateway_way else aiohttp.ClientTimeout(total=30, sock_connect=5)
            async with asyncio.timeout(30):
                resp = await session.post(url, data=BODY, headers=HEADERS, timeout=timeout)
                await resp.read()

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    spent = time.process_time() - started
    await session.close()
    return spent / n * 1e6


async def run(url: str, requests: int, rounds: int) -> dict[str, list[float]]:
    await one_round(url, True, 2000)            # warm-up
    out: dict[str, list[float]] = {"defaults": [], "gateway": []}
    for _ in range(rounds):
        out["defaults"].append(await one_round(url, False, requests))
        out["gateway"].append(await one_round(url, True, requests))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=12000)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    port = free_port()
    pin = ["taskset", "-c", "1"] if os.cpu_count() and os.cpu_count() > 1 else []
    up = subprocess.Popen(pin + [str(PY), str(BENCH / "fakeup.py"), "--port", str(port), "--itl-ms", "0",
                                 "--output-tokens", "8"], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, up)
        if pin:
            os.sched_setaffinity(0, {0})
        res = uvloop.run(run(f"http://127.0.0.1:{port}/v1/chat/completions", args.requests, args.rounds))
    finally:
        up.terminate()
        up.wait()
    d, g = statistics.median(res["defaults"]), statistics.median(res["gateway"])
    print("| client | CPU µs per request, each round | median |\n|---|---|---|")
    for name, vals in res.items():
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in vals)} | {statistics.median(vals):.1f} |")
    print(f"\ngateway / defaults: {g / d:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
