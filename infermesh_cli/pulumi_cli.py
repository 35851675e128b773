"""Running the Pulumi CLI for a JSON answer (`pulumi stack export`, `pulumi stack output --json`).

One place for what every caller needs: a time limit, pulumi's own reason on a failure (its last
stderr line), and one ``UserError`` line per failure that never quotes the output itself (stack
outputs shown with --show-secrets hold private keys).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from infermesh_cli.errors import UserError


def available() -> bool:
    return shutil.which("pulumi") is not None


def run_json(args: list[str], *, hint: str = "", timeout: float = 120) -> Any:
    """``pulumi <args>``'s stdout, parsed as JSON. ``hint`` (what to do instead) ends every error."""
    what = f"`pulumi {' '.join(args)}`"
    tail = f"; {hint}" if hint else ""
    try:
        done = subprocess.run(["pulumi", *args], capture_output=True, text=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as e:
        raise UserError(f"{what} failed ({type(e).__name__}: {e}){tail}") from None
    if done.returncode != 0:
        said = [line.strip() for line in done.stderr.splitlines() if line.strip()]      # pulumi's own reason
        why = f"exit status {done.returncode}" + (f": {said[-1][:200]}" if said else "")
        raise UserError(f"{what} failed ({why}){tail}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} printed no JSON ({e.msg} at line {e.lineno} column {e.colno}){tail}") from None
