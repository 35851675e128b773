"""The benchmark's load client: closed-loop HTTP/1.1 workers on raw asyncio protocols (uvloop).

    python bench/load.py --url http://127.0.0.1:8080/v1/chat/completions --key KEY \
        --model demo-chat [--stream] --concurrency 16 --duration 10 [--warmup 2] \
        [--rate R] [--ramp S] [--tokens 32] [--watch-pid PID ...] [--rss-every 5]

Why not aiohttp or httpx: the client must not be the bottleneck. A raw protocol costs a few
microseconds per response and per received chunk, and times every stream event as it leaves
the kernel (one `data_received` call), so TTFT and inter-token gaps are the server's, not the
client's parser's. Each worker keeps one keep-alive connection and sends its next request as
soon as the last one ended (closed loop); `--rate` paces the workers instead (open-ish loop,
for the soak). `--ramp` staggers the workers' first requests over S seconds so that 1,000
streams do not all start in the same millisecond.

Measured window: responses that *finish* between warm-up end and the deadline. Requests still
in flight at the deadline get `--grace` seconds to end, then are dropped uncounted.

Streams: the events are counted by their blank-line terminators. For the `sim` engine's chat
stream, event 0 is the role chunk and events 1..N the N tokens; TTFT is the arrival of event
1 (the first token) after the request was written, and the inter-token gaps are the arrival
gaps between token events 2..N. A gap over 1 s is a stall. A stream that ends without
`[DONE]` or with fewer than N tokens is an error ("incomplete").

Prints one JSON object on stdout. `--watch-pid` adds each watched process's CPU (share of one
core over the window, from /proc/PID/stat) and RSS (from /proc/PID/status; with `--rss-every`
also sampled over time, for the soak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from array import array
from urllib.parse import urlsplit

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - the project's venv has it
    uvloop = None

STALL_S = 1.0
perf = time.perf_counter


class Result:
    __slots__ = ("status", "t_end", "t_first", "events", "done", "gaps_max", "error")

    def __init__(self) -> None:
        self.status = 0
        self.t_end = 0.0
        self.t_first = 0.0        # arrival of the first token event (streams)
        self.events = 0
        self.done = False
        self.gaps_max = 0.0
        self.error = ""


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, stream: bool, tokens: int, gaps: array) -> None:
        self.stream = stream
        self.tokens = tokens
        self.gaps = gaps              # shared: every inter-token gap (seconds) of the measured streams
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.fut: asyncio.Future | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.res = Result()
        self.state = 0                # 0 head, 1 content-length body, 2 chunk size, 3 chunk data, 4 trailer
        self.need = 0
        self.chunked = False
        self.close_after = False
        self.evtail = b""
        self.last_tok = 0.0
        self.record_gaps = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.res.error = "connection_lost"
            self.fut.set_result(self.res)

    def data_received(self, data: bytes) -> None:
        now = perf()
        self.buf += data
        try:
            self._parse(now)
        except Exception as e:  # a malformed response ends this connection
            self.res.error = "parse:" + type(e).__name__
            self._finish(now, close=True)

    # ----
    def request(self, raw: bytes, record_gaps: bool) -> asyncio.Future:
        self._reset()
        self.record_gaps = record_gaps
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.fut

    def _finish(self, now: float, close: bool = False) -> None:
        self.res.t_end = now
        fut, self.fut = self.fut, None
        if close or self.close_after:
            self.closed = True
            self.transport.close()
        if fut is not None and not fut.done():
            fut.set_result(self.res)

    def _parse(self, now: float) -> None:
        buf = self.buf
        while True:
            if self.state == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[:end + 4]
                self.res.status = int(head[9:12])
                self.chunked = b"transfer-encoding: chunked" in head
                self.close_after = b"connection: close" in head
                if self.chunked:
                    self.state = 2
                else:
                    i = head.find(b"content-length:")
                    if i < 0:
                        raise ValueError("no length")
                    j = head.find(b"\r\n", i)
                    self.need = int(head[i + 15:j if j >= 0 else None])
                    self.state = 1
            elif self.state == 1:
                if len(buf) < self.need:
                    return
                body = bytes(buf[:self.need])
                del buf[:self.need]
                if self.stream:
                    self._events(body, now)
                self._end_body(now)
                return
            elif self.state == 2:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[:end + 2]
                if size == 0:
                    self.state = 4
                else:
                    self.need = size
                    self.state = 3
            elif self.state == 3:
                if len(buf) < self.need + 2:
                    return
                piece = bytes(buf[:self.need])
                del buf[:self.need + 2]
                if self.stream:
                    self._events(piece, now)
                self.state = 2
            elif self.state == 4:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[:end + 2]
                if not line:            # end of trailers
                    self._end_body(now)
                    return

    def _end_body(self, now: float) -> None:
        res = self.res
        if res.status == 200 and self.stream:
            res.done = b"[DONE]" in self.evtail or res.done
            if not res.done or res.events < self.tokens + 1:
                res.error = "incomplete"
        self.state = 0
        self._finish(now)

    def _events(self, piece: bytes, now: float) -> None:
        data = self.evtail + piece
        n = data.count(b"\n\n")
        if not n:
            self.evtail = data[-8192:]
            return
        res = self.res
        if b"[DONE]" in data:
            res.done = True
        cut = data.rfind(b"\n\n") + 2
        self.evtail = data[cut:]
        first = res.events
        res.events = first + n
        # token events are indices 1..tokens; each token event in this piece arrives at `now`
        lo, hi = max(first, 1), min(first + n - 1, self.tokens)
        if lo > hi:
            return
        if lo == 1:
            res.t_first = now
            self.last_tok = now
            lo = 2
        if lo <= hi:
            gap = now - self.last_tok
            if gap > res.gaps_max:
                res.gaps_max = gap
            if self.record_gaps:
                self.gaps.append(gap)
                if hi > lo:
                    self.gaps.extend([0.0] * (hi - lo))
            self.last_tok = now


def pct(sorted_vals, q: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def cores() -> dict[str, tuple[int, int, int]]:
    """(busy, total, steal) jiffies per core from /proc/stat. Busy excludes idle, iowait and
    steal: steal is time the hypervisor gave this VM's core to someone else (a shared machine),
    reported on its own so that a noisy run shows as one."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]
                out[name] = (sum(v) - v[3] - v[4] - v[7], sum(v), v[7])
    return out


def core_pcts(c0: dict, c1: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Busy % and steal % per core between two cores() readings."""
    busy, steal = {}, {}
    for k in c1:
        if k in c0:
            total = max(1, c1[k][1] - c0[k][1])
            busy[k] = round(100 * (c1[k][0] - c0[k][0]) / total, 1)
            steal[k] = round(100 * (c1[k][2] - c0[k][2]) / total, 1)
    return busy, steal


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def run(args) -> dict:
    u = urlsplit(args.url)
    host, port = u.hostname, u.port or 80
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    payload = orjson.dumps(body)
    head = (f"POST {u.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: {'text/event-stream' if args.stream else 'application/json'}\r\n"
            + (f"Authorization: Bearer {args.key}\r\n" if args.key else "")
            + f"Content-Length: {len(payload)}\r\n\r\n").encode()
    raw = head + payload

    loop = asyncio.get_running_loop()
    t0 = perf()
    warm_end = t0 + args.warmup
    deadline = warm_end + args.duration
    lat = array("d")
    ttft = array("d")
    gaps = array("d")
    max_gaps = array("d")
    errors: dict[str, int] = {}
    counts = {"ok": 0, "stalled": 0, "started": 0}

    async def connect(tokens_gaps: array) -> Conn:
        _, proto = await loop.create_connection(lambda: Conn(args.stream, args.tokens, tokens_gaps), host, port)
        return proto

    async def worker(i: int) -> None:
        if args.ramp:
            await asyncio.sleep(args.ramp * i / args.concurrency)
        conn = None
        interval = args.concurrency / args.rate if args.rate else 0.0
        next_at = perf()
        while True:
            now = perf()
            if now >= deadline:
                break
            if interval:
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                next_at += interval
            if conn is None or conn.closed:
                try:
                    conn = await connect(gaps)
                except OSError:
                    errors["connect"] = errors.get("connect", 0) + 1
                    await asyncio.sleep(0.05)
                    continue
            start = perf()
            counts["started"] += 1
            try:
                res = await asyncio.wait_for(conn.request(raw, start >= warm_end), args.timeout)
            except asyncio.TimeoutError:
                errors["timeout"] = errors.get("timeout", 0) + 1
                conn.transport.close()
                conn = None
                continue
            measured = warm_end <= res.t_end <= deadline
            if res.status != 200 or res.error:
                if measured:
                    k = res.error or f"status_{res.status}"
                    errors[k] = errors.get(k, 0) + 1
                if res.status == 429:          # shed or limited: wait before the next, as the SDK does
                    await asyncio.sleep(args.retry_after_429)
                continue
            if not measured:
                continue
            counts["ok"] += 1
            lat.append(res.t_end - start)
            if args.stream:
                ttft.append(res.t_first - start)
                max_gaps.append(res.gaps_max)
                if res.gaps_max > STALL_S:
                    counts["stalled"] += 1
        if conn is not None and not conn.closed:
            conn.transport.close()

    watch = {pid: {} for pid in args.watch_pid}
    rss_samples: dict[int, list] = {pid: [] for pid in args.watch_pid}

    async def watcher() -> None:
        await asyncio.sleep(max(0.0, warm_end - perf()))
        for pid in watch:
            watch[pid]["cpu0"] = proc_cpu(pid)
            watch[pid]["rss0"] = proc_rss_kb(pid)
        watch_client["cores0"] = cores()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = perf()
        watch_client["cpu0"] = r0.ru_utime + r0.ru_stime
        watch_client["t0"] = c0
        next_sample = perf()
        while perf() < deadline:
            if args.rss_every and perf() >= next_sample:
                for pid in watch:
                    rss_samples[pid].append((round(perf() - warm_end, 1), proc_rss_kb(pid)))
                next_sample += args.rss_every
            await asyncio.sleep(min(0.2, max(0.0, deadline - perf())))
        for pid in watch:
            watch[pid]["cpu1"] = proc_cpu(pid)
            watch[pid]["rss1"] = proc_rss_kb(pid)
            if args.rss_every:
                rss_samples[pid].append((round(perf() - warm_end, 1), watch[pid]["rss1"]))
        watch_client["cores1"] = cores()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        watch_client["cpu1"] = r1.ru_utime + r1.ru_stime
        watch_client["t1"] = perf()

    watch_client: dict[str, float] = {}
    tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
    wt = asyncio.create_task(watcher())
    done, pending = await asyncio.wait(tasks, timeout=args.warmup + args.duration + args.grace + args.ramp)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await wt
    for t in done:
        if t.exception() is not None:
            errors["client:" + type(t.exception()).__name__] = (
                errors.get("client:" + type(t.exception()).__name__, 0) + 1)

    window = args.duration
    lat_s, ttft_s = sorted(lat), sorted(ttft)
    gaps_s = sorted(gaps) if args.stream else []
    out = {
        "url": args.url, "model": args.model, "stream": args.stream, "concurrency": args.concurrency,
        "duration_s": window, "warmup_s": args.warmup, "rate": args.rate,
        "ok": counts["ok"], "errors": errors, "error_count": sum(errors.values()),
        "rps": round(counts["ok"] / window, 1),
        "latency_ms": {"p50": ms(pct(lat_s, 50)), "p90": ms(pct(lat_s, 90)), "p99": ms(pct(lat_s, 99)),
                       "max": ms(lat_s[-1] if lat_s else None),
                       "mean": ms(sum(lat_s) / len(lat_s) if lat_s else None)},
        "client_cpu_pct": round(100 * (watch_client["cpu1"] - watch_client["cpu0"])
                                / (watch_client["t1"] - watch_client["t0"]), 1),
    }
    c0, c1 = watch_client["cores0"], watch_client["cores1"]
    out["core_busy_pct"], out["core_steal_pct"] = core_pcts(c0, c1)
    if args.stream:
        out["ttft_ms"] = {"p50": ms(pct(ttft_s, 50)), "p90": ms(pct(ttft_s, 90)), "p99": ms(pct(ttft_s, 99)),
                          "max": ms(ttft_s[-1] if ttft_s else None)}
        nz = [g for g in gaps_s if g > 0]
        out["gap_ms"] = {"p50": ms(pct(nz, 50)), "p99": ms(pct(nz, 99)), "p999": ms(pct(nz, 99.9)),
                         "max": ms(gaps_s[-1] if gaps_s else None), "count": len(gaps_s)}
        out["stalled"] = counts["stalled"]
        out["tokens_per_s"] = round(len(gaps_s) / window + counts["ok"] / window, 1)
    procs = {}
    for pid, w in watch.items():
        if "cpu1" not in w:
            continue
        procs[str(pid)] = {
            "cpu_pct": round(100 * (w["cpu1"] - w["cpu0"]) / (watch_client["t1"] - watch_client["t0"]), 1),
            "rss_mb_start": round(w["rss0"] / 1024, 1), "rss_mb_end": round(w["rss1"] / 1024, 1),
        }
        if args.rss_every:
            procs[str(pid)]["rss_kb_samples"] = rss_samples[pid]
    out["procs"] = procs
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", default="")
    p.add_argument("--model", default="demo-chat")
    p.add_argument("--prompt", default="Say hello to the benchmark in a few words please.")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--tokens", type=int, default=32, help="token events expected per stream")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--grace", type=float, default=10.0)
    p.add_argument("--retry-after-429", type=float, default=2.0,
                   help="a worker answered 429 waits this long before its next request (the gateway's Retry-After)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=0.0, help="total requests/s (0: closed loop, as fast as answered)")
    p.add_argument("--ramp", type=float, default=0.0)
    p.add_argument("--watch-pid", type=int, action="append", default=[])
    p.add_argument("--rss-every", type=float, default=0.0)
    args = p.parse_args(argv)
    if uvloop is not None:
        uvloop.install()
    out = asyncio.run(run(args))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
