"""WireGuard key pairs for the mesh nodes, kept by the controller that runs the playbooks.

On a deployed stack the keys are Pulumi secrets; `infermesh bootstrap` keeps the controller's
copy in one file (mode 0600) under the stack's state dir, the only place they are written.
The playbooks read it on the controller through a ``file`` lookup, so no key travels on a
command line, in an environment variable or in ansible-runner's artifacts.

Rotation writes a *next* file beside the current one; the rotate-keys playbook applies it and
``promote`` replaces the current file only once every node has handshaken with the new keys.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KeyPair = dict[str, str]    # {"private_key": base64, "public_key": base64}


def generate() -> KeyPair:
    """A WireGuard key pair (Curve25519, base64 like `wg genkey | wg pubkey`)."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"private_key": base64.b64encode(private).decode(), "public_key": base64.b64encode(public).decode()}


def public_key(private_key: str) -> str:
    raw = base64.b64decode(private_key)
    key = X25519PrivateKey.from_private_bytes(raw)
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()


def read(path: Path) -> dict[str, KeyPair]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def write(path: Path, keys: dict[str, KeyPair]) -> None:
    """Write atomically with mode 0600 from the first byte (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def ensure(path: Path, nodes: Iterable[str]) -> dict[str, KeyPair]:
    """The key file with a pair for every node: existing pairs kept, missing ones generated."""
    keys = read(path)
    missing = [n for n in nodes if n not in keys]
    for node in missing:
        keys[node] = generate()
    if missing or not path.exists():
        write(path, keys)
    return keys


def next_path(path: Path) -> Path:
    return path.with_name(path.stem + ".next" + path.suffix)


def prepare_rotation(path: Path, nodes: Iterable[str]) -> Path:
    """Fresh pairs for every node in the next file; the current file is left as it is."""
    target = next_path(path)
    write(target, {node: generate() for node in nodes})
    return target


def promote(path: Path) -> None:
    """After a successful rotation the next keys become the current ones."""
    os.replace(next_path(path), path)
