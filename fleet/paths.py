"""Where a stack's local state lives: .infermesh/<stack>/ (keys, ledger, routing, logs).

INFERMESH_STATE_DIR overrides it (tests, several gateways on one machine).
"""

from __future__ import annotations

import os
from pathlib import Path

from fleet.spec import ROOT


def state_dir(stack: str) -> Path:
    env = os.environ.get("INFERMESH_STATE_DIR")
    return Path(env) if env else ROOT / ".infermesh" / stack
