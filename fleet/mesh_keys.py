"""WireGuard key pairs for the mesh nodes, kept by the controller that runs the playbooks.

One source per stack (docs/mesh.md):

- a Pulumi-managed stack: the keys are Pulumi's (``WireGuardKey`` resources, the stack's secret
  ``mesh_keys`` output); ``infermesh bootstrap --from-pulumi`` copies them into this file and
  leaves a *source marker* beside it (``mesh-keys.source``: ``{"source": "pulumi", "stack": S}``).
  With the marker, nothing here makes or rotates a key (``read_source``): a key missing is an error
  that says to run ``pulumi up`` and ``--from-pulumi`` again, and rotation is ``mesh.rotation``;
- a stack without Pulumi (SSH-host gateways, the mesh lab): ``ensure`` makes the keys here, and
  ``--playbook rotate-keys`` rotates them.

The file is mode 0600 in a 0700 folder under the stack's state dir, the only place the keys are
written on the controller. The playbooks read it through a ``file`` lookup, so no key travels on a
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

from fleet.paths import write_private

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
    write_private(path, json.dumps(keys, indent=1, sort_keys=True))


PULUMI = "pulumi"


def source_path(path: Path) -> Path:
    """The source marker beside the key file `path` (``mesh-keys.source``)."""
    return path.with_suffix(".source")


def mark_source(path: Path, source: str, stack: str) -> None:
    """Record that the key file `path` is a copy of `source`'s keys (``pulumi``) for `stack`."""
    write_private(source_path(path), json.dumps({"source": source, "stack": stack}) + "\n")


def read_source(path: Path) -> str | None:
    """Where the key file's keys come from (``"Pulumi stack S"``), or None: the controller's own (``ensure``)."""
    try:
        doc = json.loads(source_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{source_path(path)}: unreadable source marker ({e}); delete it and run "
                         "`infermesh bootstrap --from-pulumi` again") from None
    if not isinstance(doc, dict) or doc.get("source") != PULUMI:
        raise ValueError(f"{source_path(path)}: not a source marker ({{\"source\": \"pulumi\", ...}})")
    return f"Pulumi stack {doc.get('stack')}"


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
