"""`infermesh up --stack local`: run the whole service on this machine and print how to call it."""

from __future__ import annotations

import argparse
import json
import signal
import time
import urllib.request
from pathlib import Path

from fleet import spec as spec_mod
from infermesh_cli.errors import UserError
from fleet.local import LocalStack, LocalStackError
from fleet.local_apply import StackWatcher
from fleet.paths import state_dir
from gateway.state import key_admin

DEMO_TENANT = "demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run a local stack (gateway + simulated workers) in the foreground")
    p.add_argument("--stack", default="local")
    p.add_argument("--port", type=int, help="gateway port (default: the stack's gateway.port)")
    p.add_argument("--port-base", type=int,
                   help="first port of the local workers (default: the stack's local_port_base)")
    p.add_argument("--tier", default="pro", help="tier of the demo tenant's key")
    p.add_argument("--stacks-dir", type=Path, default=None, help=argparse.SUPPRESS)
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
print(c.chat.completions.create(model="{model}", \
messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'

Workers are the `sim` engine (a simulator, not a model). Ctrl-C stops everything.
"""


def wait_key_live(stack: LocalStack, key: str, timeout: float = 5.0) -> None:
    """Until every gateway replica accepts the new key (they refresh keys from PostgreSQL)."""
    deadline = time.monotonic() + timeout
    for i in range(stack.replicas):
        req = urllib.request.Request(stack.replica_url(i) + "/models", headers={"Authorization": f"Bearer {key}"})
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(req, timeout=2):
                    break
            except OSError:
                time.sleep(0.1)


def run(args: argparse.Namespace) -> int:
    def load() -> spec_mod.Spec:
        s = spec_mod.load(args.stack, args.stacks_dir)
        return s.model_copy(update={"local_port_base": args.port_base}) if args.port_base else s

    spec = load()
    if args.tier not in {t.name for t in spec.tiers}:
        raise UserError(f"--tier {args.tier!r} is not a tier of stack {args.stack}")
    stack = LocalStack(spec, state_dir(args.stack), gateway_port=args.port, stacks_dir=args.stacks_dir)
    replicas = "" if stack.replicas == 1 else (
        f"  ({stack.replicas} gateway replicas on ports "
        f"{', '.join(str(stack.replica_port(i)) for i in range(stack.replicas))})")
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
        key, _ = key_admin(spec, stack.state).create(DEMO_TENANT, args.tier)
        if stack.replicas > 1:
            wait_key_live(stack, key)      # replicas load keys from PostgreSQL within ~1 s
        model = spec.tier(args.tier).models[0]
        print(banner(stack.base_url, key, model) + replicas, flush=True)
        print(json.dumps({"base_url": stack.base_url, "key": key, "model": model, "state_dir": str(stack.state)}),
              flush=True)
        # Follow the stack file as `pulumi up` would (a canary start, promote or rollback; new pools).
        watcher = StackWatcher(stack, spec_mod.stack_path(args.stack, args.stacks_dir), load,
                               log=lambda line: print(line, flush=True))
        while not stopping:
            watcher.poll()
            for name in stack.supervise():     # a dead gateway replica is started again, with backoff
                print(f"infermesh up: {name} had exited; started it again (restart {stack.restarts[name]})",
                      flush=True)
            dead = stack.dead()
            gateways = [n for n, _ in stack.procs if n.startswith("gateway")]
            if gateways and all(n in dead for n in gateways):
                print("infermesh up: the gateway exited; stopping", flush=True)
                return 1
            time.sleep(0.5)
        print("infermesh up: stopping", flush=True)
        return 0
    finally:
        stack.stop()
