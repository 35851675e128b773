"""WireGuardMesh: a key pair per mesh node, kept as Pulumi secrets, and each node's WireGuard config.

Keys must be stable across runs (a new key on every ``pulumi up`` would cut every tunnel), and
must never be derived from something guessable. So each node's key pair is a small dynamic
resource: ``create`` generates the pair once (X25519 via ``cryptography``, like ``wg genkey``),
Pulumi stores the private key in the state as a secret, and later runs read it back unchanged.
Bumping ``rotation`` (the stack's ``mesh.rotation``) replaces every key.

These keys are the one source of a Pulumi-managed stack's mesh keys: the gateway pods take theirs
from ``interfaces``, and the SSH-host workers get theirs from Ansible, which reads them from the
stack's ``mesh_keys`` output (``key_pairs``) written to the controller's key file by
``infermesh bootstrap --from-pulumi`` (docs/mesh.md). No private key goes into a lease: a
marketplace stores what a lease is given.

What changes when the fleet changes is kept apart from what does not:

- ``interfaces``: per node, the secret ``[Interface]`` part (private key, address, listen port).
  Stable for a node for its whole life.
- ``key_pairs``: per node, ``{private_key, public_key}`` (secret): fleet/mesh_keys.py's key file shape.
- ``gateway_peers``: the gateways' peer list (one entry per worker: public key, allowed IP),
  not secret. It changes whenever a worker comes or goes, so it reaches the gateway pods in their
  ConfigMap (``peers_config``: wg(8) syntax), where each pod's mesh sidecar (images/mesh) applies it
  live with ``wg syncconf``, rather than in a Secret that would roll the pods (docs/mesh.md).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, Resource, ResourceProvider


class WireGuardKeyProvider(ResourceProvider):
    """Generates a node's key pair once; the private key is a secret output."""

    def create(self, props: dict[str, Any]) -> CreateResult:
        from fleet.mesh_keys import generate

        pair = generate()
        # The id names the key, not the node: a rotated key is a new resource id.
        key_id = "wg-" + hashlib.sha256(pair["public_key"].encode()).hexdigest()[:16]
        return CreateResult(id_=key_id, outs={**props, **pair})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = [k for k in ("node", "rotation") if olds.get(k) != news.get(k)]
        return DiffResult(changes=bool(replaces), replaces=replaces, stables=[], delete_before_replace=False)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        return ReadResult(id_, props)        # nothing outside the state to compare with

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        return None


class WireGuardKey(Resource, module="infermesh", name="WireGuardKey"):
    public_key: pulumi.Output[str]
    private_key: pulumi.Output[str]

    def __init__(self, name: str, node: str, rotation: int = 0, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(WireGuardKeyProvider(), name,
                         {"node": node, "rotation": rotation, "public_key": None, "private_key": None},
                         pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(
                             additional_secret_outputs=["private_key"])))


class MeshNodeSpec(TypedDict):
    name: str
    """The plan's node name (``gateway-0``, ``<pool>-<i>``)."""
    role: str
    """``gateway`` or ``worker``."""
    address: str
    """The node's mesh address (plan)."""
    peers: Sequence[str]
    """Names of the nodes it peers with (plan)."""


class WireGuardMeshArgs(TypedDict):
    nodes: Sequence[MeshNodeSpec]
    """Every node of the plan's mesh."""
    cidr: str
    """The mesh network; addresses carry its prefix length."""
    port: int
    """WireGuard's UDP port on the gateways."""
    rotation: NotRequired[int]
    """Bump to replace every key."""


def interface_config(private_key: str, address: str, prefix: int, listen_port: int | None) -> str:
    lines = ["[Interface]", f"PrivateKey = {private_key}", f"Address = {address}/{prefix}"]
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    return "\n".join(lines) + "\n"


def peer_config(public_key: str, address: str, endpoint: str | None = None, keepalive_s: int | None = None) -> str:
    lines = ["", "[Peer]", f"PublicKey = {public_key}", f"AllowedIPs = {address}/32"]
    if endpoint:
        lines.append(f"Endpoint = {endpoint}")
    if keepalive_s:
        lines.append(f"PersistentKeepalive = {keepalive_s}")
    return "\n".join(lines) + "\n"


def peers_config(peers: Sequence[Mapping[str, Any]]) -> str:
    """The gateways' peer list (``gateway_peers``) in wg(8) syntax: one [Peer] per worker, with no
    endpoint (a gateway learns a worker's from its handshake: workers dial). ``wg syncconf`` takes it
    after an [Interface] section, as the mesh sidecar does."""
    return "".join(f"[Peer]\n# {p['name']}\nPublicKey = {p['public_key']}\n"
                   f"AllowedIPs = {', '.join(p['allowed_ips'])}\n\n" for p in peers)


def _all(outputs: Mapping[str, Any]) -> pulumi.Output[dict[str, Any]]:
    """``Output.all`` over a dict that may be empty (``Output.all()`` of nothing is a list)."""
    return pulumi.Output.all(**outputs) if outputs else pulumi.Output.from_input({})


class WireGuardMesh(pulumi.ComponentResource):
    public_keys: pulumi.Output[dict[str, str]]
    interfaces: pulumi.Output[dict[str, str]]          # secret
    key_pairs: pulumi.Output[dict[str, dict[str, str]]]     # secret
    gateway_peers: pulumi.Output[list[dict[str, Any]]]

    def __init__(self, name: str, args: WireGuardMeshArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("infermesh:fleet:WireGuardMesh", name, None, opts)
        prefix = ipaddress.ip_network(args["cidr"]).prefixlen
        port = args["port"]
        nodes = {n["name"]: n for n in args["nodes"]}
        for n in nodes.values():
            if n["role"] not in ("gateway", "worker"):
                raise ValueError(f"WireGuardMesh: node {n['name']} has role {n['role']!r}; must be gateway or worker")
        self.keys = {
            n: WireGuardKey(f"{n}-wg", n, args.get("rotation", 0), pulumi.ResourceOptions(parent=self))
            for n in nodes
        }
        self.public_keys = _all({n: k.public_key for n, k in self.keys.items()})

        def interface(n: str, private_key: str) -> str:
            return interface_config(private_key, nodes[n]["address"], prefix,
                                    port if nodes[n]["role"] == "gateway" else None)

        self.interfaces = pulumi.Output.secret(_all({
            n: k.private_key.apply(functools.partial(interface, n)) for n, k in self.keys.items()
        }))

        # the stack's `mesh_keys` output (fleet/mesh_keys.py's key file): Ansible's keys for the SSH hosts
        self.key_pairs = pulumi.Output.secret(_all({
            n: pulumi.Output.all(k.private_key, k.public_key).apply(
                lambda a: {"private_key": a[0], "public_key": a[1]})
            for n, k in self.keys.items()
        }))
        workers = [n for n in nodes.values() if n["role"] == "worker"]
        self.gateway_peers = self.public_keys.apply(lambda pub: [
            {"name": w["name"], "public_key": pub[w["name"]], "allowed_ips": [f"{w['address']}/32"]}
            for w in workers
        ])
        self.register_outputs({"public_keys": self.public_keys, "interfaces": self.interfaces,
                               "key_pairs": self.key_pairs, "gateway_peers": self.gateway_peers})
