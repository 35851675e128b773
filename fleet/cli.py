"""`infermesh`: one CLI for the declared service, the local stack and day-to-day operations.

Each sub-command lives in fleet/commands/<name>.py and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (args -> exit code). Errors an operator can fix (a bad stack
file, a bad flag) print one line on stderr and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fleet.spec import SpecError

# Order is the order of `infermesh --help`.
COMMANDS = [
    "up", "gateway", "keys", "usage", "slo",
    "plan", "check", "failover", "canary", "leases",
    "bootstrap", "ops",
]


class UserError(Exception):
    """A problem with what the operator asked for; the message is shown as is."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infermesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fleet.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"fleet.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SpecError, UserError) as e:
        print(f"infermesh {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Import by name: run as `python -m fleet.cli`, this file is __main__, and the commands'
    # `from fleet.cli import UserError` must be the same class that main() catches.
    from fleet.cli import main as _main

    sys.exit(_main())
