"""Request-path cost of shared state: one gateway on the embedded state (SQLite ledger,
in-process limits) vs the same gateway on Redis limits + PostgreSQL ledger (the SQLite spool
shipped in the background), in one run, on this machine's PostgreSQL and a redis-server of our own.

    .venv/bin/python bench/shared_state.py [--requests 2000] [--concurrency 32] [--rounds 3]

Both stacks run side by side (one sim worker each: ttft 0, itl 0, 8 tokens) and are measured in
alternating rounds: sequential requests (latency p50/p99, concurrency 1) and a concurrent burst
(requests/s). Prints a table and the shared/embedded ratios. Creates database im_bench_<random>
(dropped at the end); stops every process it started by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import psycopg  # noqa: E402
import yaml  # noqa: E402

from fleet import spec as spec_mod  # noqa: E402
from fleet.local import LocalStack  # noqa: E402
from gateway.state import key_admin  # noqa: E402
from tests.conftest import free_port, free_port_range  # noqa: E402
from tests.test_shared_state import PG_ADMIN, RedisServer  # noqa: E402


def make_stack(tmp: Path, name: str, state: dict | None) -> LocalStack:
    config = copy.deepcopy(spec_mod.read_config(spec_mod.stack_path("local")))
    model = config["models"][0]["id"]
    config["models"] = [{**config["models"][0], "fallback": None}]
    config["models"][0].pop("fallback")
    pool = next(p for p in config["pools"] if p["model"] == model)
    config["pools"] = [{**pool, "replicas": 1, "sim": {"ttft_ms": 0, "itl_ms": 0, "output_tokens": 8}}]
    config["providers"] = [p for p in config["providers"] if p["name"] == pool["provider"]]
    for t in config["tiers"]:
        t["models"], t["rpm"], t["tpm"] = [model], 10_000_000, 10_000_000_000
    config["local_port_base"] = free_port_range(3)
    config["gateway"] = {**config.get("gateway", {}), "port": free_port(), **({"state": state} if state else {})}
    stacks = tmp / name / "stacks"
    stacks.mkdir(parents=True)
    (stacks / f"Pulumi.{name}.yaml").write_text(
        yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in config.items()}}))
    spec = spec_mod.load(name, stacks)
    return LocalStack(spec, tmp / name / "state", stacks_dir=stacks)


async def measure(url: str, key: str, model: str, n: int, concurrency: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one() -> float:
            t0 = time.perf_counter()
            async with s.post(url + "/chat/completions", json=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            return time.perf_counter() - t0

        for _ in range(50):                                  # warm-up
            await one()
        lat = sorted([await one() for _ in range(n // 4)])
        left = iter(range(n))

        async def worker():
            for _ in left:
                await one()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rps = n / (time.perf_counter() - t0)
    return {"p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000, "rps": rps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="im-bench-state-"))
    db = f"im_bench_{secrets.token_hex(4)}"
    redis = RedisServer(tmp)
    redis.start()
    stacks: dict[str, LocalStack] = {}
    try:
        stacks["embedded"] = make_stack(tmp, "bench-embedded", None)
        stacks["shared"] = make_stack(tmp, "bench-shared", {
            "limits": "redis", "ledger": "postgres", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
            "postgres_dsn": f"postgresql://postgres@127.0.0.1:5432/{db}"})
        keys = {}
        for name, st in stacks.items():
            st.start()
            keys[name] = key_admin(st.spec, st.state).create("bench", "pro")[0]
        time.sleep(1.5)                                      # the shared gateway loads keys within 1 s
        model = stacks["embedded"].spec.models[0].id
        runs: dict[str, list[dict]] = {n: [] for n in stacks}
        for _ in range(args.rounds):
            for name, st in stacks.items():
                runs[name].append(asyncio.run(measure(st.base_url, keys[name], model, args.requests,
                                                      args.concurrency)))
        med = {n: {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p99_ms", "rps")}
               for n, rs in runs.items()}
        print(f"{'state':<10} {'p50 ms (c=1)':>13} {'p99 ms (c=1)':>13} {f'req/s (c={args.concurrency})':>14}")
        for n, m in med.items():
            print(f"{n:<10} {m['p50_ms']:>13.3f} {m['p99_ms']:>13.3f} {m['rps']:>14.0f}")
        e, s = med["embedded"], med["shared"]
        print(f"ratio shared/embedded: p50 {s['p50_ms'] / e['p50_ms']:.2f}x, p99 {s['p99_ms'] / e['p99_ms']:.2f}x, "
              f"throughput {s['rps'] / e['rps']:.2f}x   (medians of {args.rounds} alternating rounds, "
              f"{args.requests} requests each)")
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}") as c:
            shipped = c.execute("SELECT count(*) FROM usage").fetchone()[0]
        print(f"shared ledger rows in PostgreSQL: {shipped}")
    finally:
        for st in stacks.values():
            st.stop()
        redis.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
