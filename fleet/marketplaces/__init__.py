"""Marketplace adapters, one module per marketplace behind one interface (fleet/marketplaces/base.py).

``ADAPTERS`` maps a provider ``kind`` from the stack file to its adapter class. The GPU
marketplaces (``vastai``, ``runpod``, ``akash``) rent leases; ``openai`` is an external
OpenAI-compatible upstream that rents nothing and is only checked (key, model listed).
"""

from __future__ import annotations

from fleet.kinds import KINDS
from fleet.marketplaces.akash import Akash
from fleet.marketplaces.base import (
    AuthFailed,
    Endpoint,
    LeaseAbandoned,
    LeaseDied,
    LeaseRequest,
    LeaseState,
    Marketplace,
    MarketplaceError,
    ModelUnavailable,
    NoOffers,
    NotFound,
    Offer,
    OutOfCapacity,
    Port,
    PriceAboveCap,
    ProviderError,
    RateLimited,
    RetryPolicy,
    UnknownGpuType,
)
from fleet.marketplaces.openai_upstream import OpenAIUpstream
from fleet.marketplaces.runpod import RunPod
from fleet.marketplaces.vastai import VastAi

_CLASSES: dict[str, type] = {"vastai": VastAi, "runpod": RunPod, "akash": Akash, "openai": OpenAIUpstream}
# listed from the table of provider kinds (fleet/kinds.py): a kind names its adapter there
LEASE_ADAPTERS: dict[str, type[Marketplace]] = {k.name: _CLASSES[k.adapter] for k in KINDS.values()
                                                if k.leased and k.adapter}
ADAPTERS: dict[str, type] = {k.name: _CLASSES[k.adapter] for k in KINDS.values() if k.adapter}
# Where each adapter reads its key when no stack secret is handed to it (CI, a shell).
API_KEY_ENV: dict[str, str] = {k.name: k.key_env for k in KINDS.values() if k.key_env}


def adapter_class(kind: str) -> type:
    try:
        return ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"no marketplace adapter for kind {kind!r}; known: {sorted(ADAPTERS)}") from None


__all__ = [
    "ADAPTERS", "API_KEY_ENV", "LEASE_ADAPTERS", "Akash", "AuthFailed", "Endpoint", "LeaseAbandoned", "LeaseDied",
    "LeaseRequest", "LeaseState", "Marketplace", "MarketplaceError", "ModelUnavailable", "NoOffers", "NotFound",
    "Offer", "OpenAIUpstream", "OutOfCapacity", "Port", "PriceAboveCap", "ProviderError", "RateLimited",
    "RetryPolicy", "RunPod", "UnknownGpuType", "VastAi", "adapter_class",
]
