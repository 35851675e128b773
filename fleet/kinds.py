"""What each provider kind is: one table, read by the plan, the routing config and the carriers.

A new marketplace is one row here plus its adapter (fleet/marketplaces/). Facts per kind:

- ``local``: workers run as processes on this machine (`infermesh up`), no lease;
- ``leased``: GPUs are rented through a marketplace adapter (a GpuLease);
- ``upstream``: an external OpenAI-compatible API, called by the gateway itself;
- ``channel``: how the gateway reaches a container worker of this kind (``mtls``: the worker serves
  mutual TLS on the port the marketplace forwards, since no marketplace container may start
  WireGuard; ``https``: the upstream's public TLS; ``loopback``: plain HTTP on 127.0.0.1, for
  llama.cpp, whose server cannot require a client certificate). SSH hosts of any leased kind join the
  WireGuard mesh instead (``channel_for``);
- ``ssh``: whether leases of this kind may be SSH hosts bootstrapped by Ansible;
- ``udp``: whether the marketplace forwards a UDP port (WireGuard can be dialled into the host);
- ``adapter``: the marketplace adapter's name (fleet/marketplaces), None where nothing is rented;
- ``regions``: how a region is matched there (``countries``: the adapter filters offers by the
  region's countries; ``none``: not applicable);
- ``key_env``: where the adapter reads its API key when no stack secret is handed to it (CI, a shell).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Channel = Literal["mtls", "wireguard", "https", "loopback"]


@dataclass(frozen=True)
class Kind:
    name: str
    local: bool = False
    leased: bool = False
    upstream: bool = False
    channel: Channel = "mtls"
    ssh: bool = False
    udp: bool = False
    adapter: str | None = None
    regions: Literal["countries", "none"] = "none"
    key_env: str | None = None


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("sim", local=True, channel="mtls"),
    # llama.cpp's server cannot require a client certificate: it stays on loopback, plain
    Kind("llamacpp", local=True, channel="loopback"),
    Kind("vastai", leased=True, channel="mtls", ssh=True, udp=True, adapter="vastai", regions="countries",
         key_env="VASTAI_API_KEY"),
    Kind("runpod", leased=True, channel="mtls", ssh=True, udp=False, adapter="runpod", regions="countries",
         key_env="RUNPOD_API_KEY"),
    Kind("akash", leased=True, channel="mtls", ssh=True, udp=True, adapter="akash", regions="countries",
         key_env="AKASH_API_KEY"),
    Kind("openai", upstream=True, channel="https", adapter="openai", key_env="OPENAI_UPSTREAM_API_KEY"),
)}

LOCAL_KINDS = tuple(k for k, v in KINDS.items() if v.local)
LEASED_KINDS = tuple(k for k, v in KINDS.items() if v.leased)
UDP_KINDS = frozenset(k for k, v in KINDS.items() if v.udp)


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown provider kind {name!r}; known: {sorted(KINDS)}") from None


def is_upstream(kind_name: str) -> bool:
    """An external OpenAI-compatible upstream (no leases, no workers): the overflow's kind."""
    k = KINDS.get(kind_name)
    return k is not None and k.upstream


def channel_for(kind_name: str, connection: str = "container") -> Channel:
    """The channel the plan picks: WireGuard for SSH hosts (Ansible brings the mesh up there),
    else the kind's own (mutual TLS into marketplace containers and local workers)."""
    k = kind(kind_name)
    if connection == "ssh" and k.leased:
        return "wireguard"
    return k.channel
