"""Run the gateway: `python -m gateway --stack S --routing FILE [--host H --port P --state-dir DIR]`.

On SIGTERM uvicorn stops accepting, lets in-flight requests and streams finish for up to
the stack's drain timeout, then exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn

from fleet import spec as spec_mod
from fleet.paths import state_dir
from gateway import logsafe
from gateway.app import Settings, create_app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway", description="infermesh OpenAI-compatible gateway")
    p.add_argument("--stack", required=True)
    p.add_argument("--stacks-dir", type=Path, default=None, help="folder holding Pulumi.<stack>.yaml")
    p.add_argument("--routing", type=Path, default=None, help="routing config JSON (default: STATE_DIR/routing.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logsafe.setup(args.log_level.upper())
    try:
        spec = spec_mod.load(args.stack, args.stacks_dir)
    except spec_mod.SpecError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    sdir = args.state_dir or state_dir(args.stack)
    routing = args.routing or sdir / "routing.json"
    if not routing.exists():
        print(f"gateway: no routing config at {routing} (infermesh up writes it)", file=sys.stderr)
        return 2
    app = create_app(Settings(spec=spec, routing_path=routing, state_dir=sdir))
    uvicorn.run(app, host=args.host, port=args.port or spec.gateway.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=int(spec.gateway.drain_timeout_s), loop="uvloop", http="httptools",
                server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
