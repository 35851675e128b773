"""Where a stack's local state lives: .infermesh/<stack>/ (keys, ledger, routing, logs).

INFERMESH_STATE_DIR overrides it (tests, several gateways on one machine).

The state dir holds key hashes (keys.db) and, for tenants who opted in, prompts and completions
(ledger.db): folders are created 0700 and those files 0600 (``private_dir``, ``private_file``),
whatever the umask. A folder that already exists is tightened only at the default location
(.infermesh/<stack>, ours); one named by INFERMESH_STATE_DIR is the operator's and is left as it
is, but the files in it are still 0600.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fleet import project


def state_dir(stack: str) -> Path:
    """.infermesh/<stack> beside the project's Pulumi.yaml (fleet/project.py), or INFERMESH_STATE_DIR."""
    env = os.environ.get("INFERMESH_STATE_DIR")
    return Path(env) if env else project.state_root() / stack


ADMIN_TOKEN_ENV = "INFERMESH_ADMIN_TOKEN"


def admin_token_path(state: Path) -> Path:
    """Where a stack's gateway keeps the operator's token for /admin/* (written at its first start)."""
    return state / "admin.token"


def admin_token(state: Path) -> str:
    """The operator's token for a stack's /admin/*: INFERMESH_ADMIN_TOKEN, else the one its gateway
    keeps in the state dir `state`. FileNotFoundError when there is neither."""
    env = os.environ.get(ADMIN_TOKEN_ENV)
    if env:
        return env
    return admin_token_path(state).read_text().strip()


def private_dir(path: Path, tighten: bool = False) -> Path:
    """Create `path` and any missing parents 0700; with `tighten`, also take group and other
    access away from `path` itself when it already exists (best effort: not ours, left as is)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)                   # mkdir's mode is filtered by the umask; this is not
    if tighten and not missing:
        try:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                os.chmod(path, 0o700)
        except OSError:
            pass
    return path


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    """`data` into `path` atomically, with `mode` from the first byte (0600: never readable by others,
    not even briefly), in a 0700 folder. A stale temp file is removed first: O_CREAT would keep its mode."""
    private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def private_file(path: Path) -> Path:
    """Create `path` (empty) 0600 in a 0700 folder unless it exists; an existing file readable by
    group or others is tightened to 0600. SQLite then gives its -wal and -shm files the same mode.

    An existing file is never opened here, only stat'ed and chmod'ed by name: closing any
    descriptor of a file drops every POSIX lock this process holds on it, SQLite's included
    (fcntl locks are per process and file, not per descriptor). A database this process already
    had open would be left unlocked while SQLite believes it holds its SHARED lock, and the next
    process to close a connection to it would take it for the last user: checkpoint, delete the
    -wal file, and every commit made here after that goes into an unlinked file (issue 17: a
    gateway replica's spool lost its rows that way when a survivor's adopter looked at it)."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600)   # new: no lock on it to drop
    except FileExistsError:
        try:
            if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                os.chmod(path, 0o600)
        except OSError:
            pass
        return path
    os.close(fd)
    return path


def ensure_state_dir(stack: str) -> Path:
    """The stack's state dir, created 0700 (tightened too when it is the default location)."""
    return private_dir(state_dir(stack), tighten=not os.environ.get("INFERMESH_STATE_DIR"))
