"""`infermesh up --stack local`: run the whole service on this machine and print how to call it."""

from __future__ import annotations

import argparse
import json
import signal
import time

from fleet import spec as spec_mod
from fleet.cli import UserError
from fleet.local import LocalStack, LocalStackError
from fleet.paths import state_dir
from gateway.keys import KeyAdmin

DEMO_TENANT = "demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run a local stack (gateway + simulated workers) in the foreground")
    p.add_argument("--stack", default="local")
    p.add_argument("--port", type=int, help="gateway port (default: the stack's gateway.port)")
    p.add_argument("--port-base", type=int, help="first port of the local workers (default: the stack's local_port_base)")
    p.add_argument("--tier", default="pro", help="tier of the demo tenant's key")
    p.set_defaults(func=run)


def banner(base_url: str, key: str, model: str) -> str:
    return f"""
infermesh local stack is up.

  base URL : {base_url}
  API key  : {key}
  model    : {model}

  curl {base_url}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{base_url}", api_key="{key}")
print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

Workers are the `sim` engine (a simulator, not a model). Ctrl-C stops everything.
"""


def run(args: argparse.Namespace) -> int:
    spec = spec_mod.load(args.stack)
    if args.port_base:
        spec = spec.model_copy(update={"local_port_base": args.port_base})
    if args.tier not in {t.name for t in spec.tiers}:
        raise UserError(f"--tier {args.tier!r} is not a tier of stack {args.stack}")
    stack = LocalStack(spec, state_dir(args.stack), gateway_port=args.port)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
    except LocalStackError as e:
        raise UserError(str(e)) from None
    try:
        key, _ = KeyAdmin(stack.state / "keys.db").create(DEMO_TENANT, args.tier)
        model = spec.tier(args.tier).models[0]
        print(banner(stack.base_url, key, model), flush=True)
        print(json.dumps({"base_url": stack.base_url, "key": key, "model": model, "state_dir": str(stack.state)}),
              flush=True)
        while not stopping:
            dead = stack.dead()
            if "gateway" in dead:
                print("infermesh up: the gateway exited; stopping", flush=True)
                return 1
            time.sleep(0.5)
        print("infermesh up: stopping", flush=True)
        return 0
    finally:
        stack.stop()
