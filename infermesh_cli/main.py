"""`infermesh`: one CLI for the declared service, the local stack and day-to-day operations.

Each sub-command lives in infermesh_cli/commands/<name>.py and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (args -> exit code). Errors an operator can fix (a bad
stack file, a bad flag) print one line on stderr and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from fleet.spec import SpecError
from infermesh_cli.errors import UserError
from infermesh_cli.inputs import one_line

# Order is the order of `infermesh --help`.
COMMANDS = [
    "up", "gateway", "keys", "usage", "billing", "slo",
    "plan", "check", "failover", "canary", "leases", "alerts",
    "bootstrap", "ops",
]


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{one_line(self.prog)}: {one_line(message)} (see {one_line(self.prog)} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="infermesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"infermesh_cli.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"infermesh_cli.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                  # --help (0) or a bad argument (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except (SpecError, UserError) as e:
        print(f"infermesh {args.command}: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A bug, not an input problem: still one line (INFERMESH_TRACEBACK=1 shows the traceback).
        if os.environ.get("INFERMESH_TRACEBACK"):
            raise
        print(f"infermesh {args.command}: internal error: {type(e).__name__}: {one_line(str(e))} "
              f"(INFERMESH_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
