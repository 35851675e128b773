"""`infermesh gateway --stack S`: run one gateway process in the foreground (see gateway/__main__.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the gateway in the foreground", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: __import__("gateway.__main__").__main__.main(args.rest))
