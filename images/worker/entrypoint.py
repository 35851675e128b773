#!/usr/bin/env python3
"""infermesh worker entrypoint: mesh up, weights verified, vLLM on the mesh address, drain on SIGTERM.

Environment (set by the GpuLease): WG_CONFIG (wg-quick config, secret), INFERMESH_MESH_ADDRESS,
INFERMESH_WEIGHTS_SHA256 (optional: checksum of the weights snapshot), INFERMESH_DRAIN_S,
INFERMESH_RUN_AS (uid for vLLM). Arguments are vLLM's (``--model ... --host ... --port 8000``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def log(msg: str) -> None:
    print(f"infermesh-worker: {msg}", file=sys.stderr, flush=True)


def arg(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else default


def mesh_up() -> None:
    config = os.environ.pop("WG_CONFIG", "")
    if not config:
        log("no WG_CONFIG: not joining the mesh (vLLM will bind where --host says)")
        return
    path = Path("/run/wireguard/wg0.conf")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config)
    env = dict(os.environ)
    if not Path("/sys/module/wireguard").exists():
        env["WG_QUICK_USERSPACE_IMPLEMENTATION"] = "wireguard-go"
    subprocess.run(["wg-quick", "up", str(path)], check=True, env=env)
    log("mesh up")


def snapshot_sha256(root: Path) -> str:
    """sha256 over (relative path, bytes) of every file, sorted: the same as fleet's weights checksum."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def verify_weights(argv: list[str]) -> None:
    want = os.environ.get("INFERMESH_WEIGHTS_SHA256")
    if not want:
        return
    from huggingface_hub import snapshot_download    # shipped in the vLLM image

    model, revision = arg(argv, "--model"), arg(argv, "--revision", "main")
    local = Path(snapshot_download(model, revision=revision))
    got = snapshot_sha256(local)
    if got != want:
        log(f"weights checksum mismatch for {model}@{revision}: want {want}, got {got}; refusing to serve")
        sys.exit(3)
    log(f"weights verified ({got[:12]})")


def healthcheck() -> int:
    host = os.environ.get("INFERMESH_MESH_ADDRESS", "127.0.0.1")
    try:
        urllib.request.urlopen(f"http://{host}:8000/health", timeout=4)
        return 0
    except Exception:  # noqa: BLE001 - any failure is unhealthy
        return 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["--healthcheck"]:
        return healthcheck()
    mesh_up()
    verify_weights(argv)
    uid = int(os.environ.get("INFERMESH_RUN_AS", "0"))
    child = subprocess.Popen(["python3", "-m", "vllm.entrypoints.openai.api_server", *argv],
                             user=uid if uid and os.geteuid() == 0 else None)
    draining = {"at": None}

    def on_term(signum, _frame):
        if draining["at"] is None:
            draining["at"] = time.monotonic()
            log(f"SIGTERM: draining for {os.environ.get('INFERMESH_DRAIN_S', '30')}s before stopping vLLM")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    drain_s = float(os.environ.get("INFERMESH_DRAIN_S", "30"))
    while child.poll() is None:
        if draining["at"] is not None and time.monotonic() - draining["at"] >= drain_s:
            child.send_signal(signal.SIGTERM)
            try:
                return child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                return child.wait()
        time.sleep(0.5)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
