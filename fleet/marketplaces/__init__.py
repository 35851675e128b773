"""Marketplace adapters, one module per marketplace behind one interface (fleet/marketplaces/base.py).

``ADAPTERS`` maps a provider ``kind`` from the stack file to its adapter class. The GPU
marketplaces (``vastai``, ``runpod``, ``akash``) rent leases; ``openai`` is an external
OpenAI-compatible upstream that rents nothing and is only checked (key, model listed).
"""

from __future__ import annotations

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

LEASE_ADAPTERS: dict[str, type[Marketplace]] = {"vastai": VastAi, "runpod": RunPod, "akash": Akash}
ADAPTERS: dict[str, type] = {**LEASE_ADAPTERS, "openai": OpenAIUpstream}
# Where each adapter reads its key when no stack secret is handed to it (CI, a shell).
API_KEY_ENV: dict[str, str] = {"vastai": "VASTAI_API_KEY", "runpod": "RUNPOD_API_KEY", "akash": "AKASH_API_KEY",
                               "openai": "OPENAI_UPSTREAM_API_KEY"}


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
