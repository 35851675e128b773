"""Run the gateway: `python -m gateway --stack S --routing FILE [--host H --port P --state-dir DIR]`,
or `python -m gateway --config FILE ...` with the one gateway config the plan emits
(fleet.routing.gateway_config: routing, tiers, limits, SLOs; a ConfigMap on Kubernetes). With
``--config`` no stack file is read: the image carries code only. The routing in that file is
reloaded live, as ``--routing`` is.

On SIGTERM uvicorn stops accepting, lets in-flight requests and streams finish for up to
the stack's drain timeout, runs the app's shutdown, then exits with status 0 (uvicorn re-raises
the signal once drained; the handler installed here turns that into a clean exit).

Replicas on one machine (`infermesh up --stack local-ha`): each runs with its own ``--instance``
and ``--port``, and all also listen on ``--shared-port`` with SO_REUSEPORT, where the kernel
spreads incoming connections over the live replicas (a dead one's socket leaves the group).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn

from fleet import spec as spec_mod
from fleet.paths import state_dir
from gateway import logsafe
from gateway.app import Settings, create_app
from gateway.door import protocol_class
from gateway.listener import Server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway", description="infermesh OpenAI-compatible gateway")
    p.add_argument("--stack", default=None, help="the stack file to serve (or --config)")
    p.add_argument("--config", type=Path, default=None,
                   help="the gateway config the plan emits (fleet.routing.gateway_config), instead of --stack")
    p.add_argument("--stacks-dir", type=Path, default=None, help="folder holding Pulumi.<stack>.yaml")
    p.add_argument("--routing", type=Path, default=None, help="routing config JSON (default: STATE_DIR/routing.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--log-level", default="info")
    p.add_argument("--instance", default=None, help="this replica's name (its ledger spool: STATE_DIR/instances/NAME)")
    p.add_argument("--shared-port", type=int, default=None,
                   help="also listen here with SO_REUSEPORT, shared with the other replicas")
    args = p.parse_args(argv)
    logsafe.setup(args.log_level.upper())
    if (args.stack is None) == (args.config is None):
        print("gateway: give --stack (a stack file) or --config (the plan's gateway config), one of them",
              file=sys.stderr)
        return 2
    try:
        spec = _from_config(args.config) if args.config else spec_mod.load(args.stack, args.stacks_dir)
    except spec_mod.SpecError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    sdir = args.state_dir or state_dir(spec.stack)
    routing = args.config or args.routing or sdir / "routing.json"
    if not routing.exists():
        print(f"gateway: no routing config at {routing} (infermesh up writes it)", file=sys.stderr)
        return 2
    app = create_app(Settings(spec=spec, routing_path=routing, state_dir=sdir, instance=args.instance))
    port = args.port or spec.gateway.port
    _raise_open_files()
    signal.signal(signal.SIGTERM, _drained)     # uvicorn's own handler replaces it while serving
    options: dict[str, Any] = dict(
        log_config=None, access_log=False, timeout_graceful_shutdown=int(spec.gateway.drain_timeout_s),
        loop="uvloop", http=protocol_class(spec.gateway), server_header=False,
        proxy_headers=False)   # no client address is used: skip uvicorn's X-Forwarded-* middleware
    try:
        sockets = [_listen(args.host, port, reuse_port=False)]
        # the shared port is bound now (a taken port fails here) but listened on only once the replica
        # is ready (a key set loaded): until then the kernel gives its connections to the others
        shared = [_listen(args.host, args.shared_port, reuse_port=True, listen=False)] if args.shared_port else []
    except OSError as e:
        print(f"gateway: cannot listen on {e.strerror}", file=sys.stderr)
        return 2
    gw = app.state.gateway
    Server(uvicorn.Config(app, **options), listeners=sockets, gated=shared,     # gateway/listener.py: why its own
           ready=lambda: gw.state.ready).run()
    return 0


def _raise_open_files() -> None:
    """Every connection is a file descriptor: take the hard limit, not the (often 1,024) soft one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def _drained(signum, frame) -> None:
    raise SystemExit(0)


def _from_config(path: Path) -> spec_mod.Spec:
    import json

    from fleet.routing import spec_from_gateway_config
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise spec_mod.SpecError(f"no gateway config at {path} "
                                 "(the ConfigMap infermesh-routing, key gateway.json)") from None
    except (OSError, ValueError) as e:
        raise spec_mod.SpecError(f"{path}: not a readable JSON gateway config ({e})") from None
    return spec_from_gateway_config(config)


def _listen(host: str, port: int, reuse_port: bool, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"{host}:{port}: {e.strerror}") from None
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
