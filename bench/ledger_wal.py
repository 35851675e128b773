"""The ledger's write-ahead log under sustained writes: with and without the writer's restart.

    .venv/bin/python bench/ledger_wal.py [--seconds 8] [--batch 4] [--gap-ms 1]

Runs gateway.ledger.Ledger as the gateway does (group commits, the checkpoint thread) twice,
side by side in one run: as shipped, and with the restart switched off (RESTART_FRAMES out of
reach), which is how the ledger behaved before. Each commits `--batch` rows, then sleeps
`--gap-ms`, for `--seconds`.

Per variant it reports rows/s, the largest WAL file seen, the worst single commit (the
restart happens inside one), and how many restarts there were.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.ledger import Ledger, UsageRecord  # noqa: E402


async def run(path: Path, restart: bool, seconds: float, batch: int, gap_s: float) -> dict:
    led = Ledger(path)
    if not restart:
        led.RESTART_FRAMES = 1 << 62
    wal = Path(str(path) + "-wal")
    rows, worst, biggest = 0, 0.0, 0
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            recs = [UsageRecord("req_" + secrets.token_hex(12), "bench", "k1", "business", "chat", "demo-chat",
                                "demo-chat", "pool", "prov", "local", False, 10, 32, 200, None, 1.2, 1.3)
                    for _ in range(batch)]
            t0 = time.perf_counter()
            await asyncio.gather(*(led.commit(r) for r in recs))     # one group commit
            worst = max(worst, time.perf_counter() - t0)
            rows += batch
            if wal.exists():
                biggest = max(biggest, wal.stat().st_size)
            await asyncio.sleep(gap_s)
    finally:
        led.close()
    return {"rows_per_s": rows / seconds, "max_wal_mb": biggest / 1e6, "worst_commit_ms": worst * 1000,
            "restarts": led.restarts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--gap-ms", type=float, default=1.0)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="im-bench-wal-"))
    print(f"{'variant':<22} {'rows/s':>8} {'max WAL MB':>11} {'worst commit ms':>16} {'restarts':>9}")
    try:
        for name, restart in (("as shipped (restart)", True), ("no restart (before)", False)):
            r = asyncio.run(run(tmp / f"{restart}.db", restart, a.seconds, a.batch, a.gap_ms / 1000))
            print(f"{name:<22} {r['rows_per_s']:>8.0f} {r['max_wal_mb']:>11.1f} {r['worst_commit_ms']:>16.2f} "
                  f"{r['restarts']:>9}")
    finally:
        for f in tmp.iterdir():
            f.unlink()
        os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
