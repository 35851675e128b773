#!/usr/bin/env python3
"""infermesh worker entrypoint: channel up, weights verified, vLLM serving, drain on SIGTERM.

The channel (the plan's, fleet/kinds.py): INFERMESH_CHANNEL=mtls in marketplace containers, which
may not start WireGuard (no NET_ADMIN, no /dev/net/tun): the worker's certificate, key and the
stack CA arrive as secret environment (INFERMESH_TLS_CERT, INFERMESH_TLS_KEY, INFERMESH_TLS_CA),
are written to /run/infermesh/tls (0400, owned by the vLLM user) and dropped from the environment;
vLLM's own --ssl-* arguments (in the launch) point there and require a client certificate.
Otherwise (SSH hosts run by Ansible, or an image used by hand) the WireGuard mesh as before.

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


TLS_DIR = Path("/run/infermesh/tls")
TLS_ENV = {"INFERMESH_TLS_CERT": "worker.crt", "INFERMESH_TLS_KEY": "worker.key", "INFERMESH_TLS_CA": "ca.crt"}


def tls_up(uid: int) -> None:
    """The mTLS material from the environment into files vLLM reads; the environment forgets it."""
    missing = [k for k in TLS_ENV if not os.environ.get(k)]
    if missing:
        log(f"INFERMESH_CHANNEL=mtls but {', '.join(missing)} not set: refusing to serve without the channel")
        sys.exit(4)
    TLS_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    for env, name in TLS_ENV.items():
        path = TLS_DIR / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(os.environ.pop(env))
        if uid and os.geteuid() == 0:
            os.chown(path, uid, -1)
    if uid and os.geteuid() == 0:
        os.chown(TLS_DIR, uid, -1)
    log("mutual TLS material in place")


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
    if os.environ.get("INFERMESH_CHANNEL") == "mtls":
        # the port requires a client certificate (only gateways hold one): listening is what we can see
        import socket
        try:
            socket.create_connection(("127.0.0.1", 8000), timeout=4).close()
            return 0
        except OSError:
            return 1
    host = os.environ.get("INFERMESH_MESH_ADDRESS", "127.0.0.1")
    try:
        urllib.request.urlopen(f"http://{host}:8000/health", timeout=4)
        return 0
    except Exception:  # noqa: BLE001 - any failure is unhealthy
        return 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["--healthcheck"]:
        return healthcheck()
    uid = int(os.environ.get("INFERMESH_RUN_AS", "0"))
    if os.environ.get("INFERMESH_CHANNEL") == "mtls":
        tls_up(uid)
    else:
        mesh_up()
    verify_weights(argv)
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
